"""Per-call overhead at small shapes: simwarp's front ends against their PyTorch peers.

At small shapes a call costs its operator count, not its arithmetic: each PyTorch operator
takes a few microseconds on a CPU (and a kernel launch on a GPU) whatever its size. This
script times one training step (forward + backward) or one forward of each front end next
to the peer a user would otherwise call, at shapes where that overhead dominates, and counts
the ATen operators each call dispatches (the machine-independent part of the cost):

* ``head``: :class:`~simwarp.NeighborRegressionHead` (leave-one-out over the batch) against
  ``nn.Linear``, batch ``N`` of ``d = 16`` embeddings, one target, an MSE loss;
* ``attention``: :func:`~simwarp.softstep_attention` against
  ``torch.nn.functional.scaled_dot_product_attention``, shape ``2·4·L·32``;
* ``loss``: :class:`~simwarp.losses.SoftStepNCALoss` against pytorch-metric-learning's
  ``NCALoss``, batch ``N``, ``d = 16``, 4 classes.

Timing: the peer and every variant of a case alternate in one process (round ``r`` runs each
for ``--seconds`` and keeps its mean per call), and the table reports the median over
``--rounds`` rounds, so a ratio compares calls made under the same conditions.

Usage::

    python benchmarks/bench_overhead.py                       # all cases, ~1 minute; benchmarks/out/overhead.json
    python benchmarks/bench_overhead.py --cases head --rounds 9 --out /tmp/overhead.json
    python benchmarks/bench_overhead.py --compile            # also under torch.compile
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import simwarp  # noqa: E402
from simwarp._io import write_json  # noqa: E402
from simwarp.cli import positive_int  # noqa: E402

CASES = ("head", "attention", "loss")


class _OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operator_count(call: Callable[[], object]) -> int:
    with _OperatorCount() as counter:
        call()
    return counter.count


def _time_per_call(call: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call over at least ``seconds`` (and at least 5 calls)."""
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 5:
            return elapsed / calls


def _head_calls(n: int, compiled: bool) -> dict[str, Callable[[], object]]:
    d = 16
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen, requires_grad=True)
    y = torch.randn(n, 1, generator=gen)
    linear = torch.nn.Linear(d, 1)
    calls = {"nn.Linear": lambda: F.mse_loss(linear(z), y).backward()}
    for step_name in ("sigmoidal", "poly", "none"):
        head = simwarp.NeighborRegressionHead(d, 1, step=step_name).train()
        calls[f"head {step_name}"] = lambda head=head: F.mse_loss(head(z, y), y).backward()
    if compiled:
        head = torch.compile(simwarp.NeighborRegressionHead(d, 1).train())
        calls["head sigm. compiled"] = lambda: F.mse_loss(head(z, y), y).backward()
    return calls


def _attention_calls(length: int, compiled: bool) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, length, 32, generator=gen, requires_grad=True) for _ in range(3))

    def train(attend):
        return lambda: attend(q, k, v).sum().backward()

    sdpa = F.scaled_dot_product_attention
    calls = {"SDPA fwd": lambda: sdpa(q, k, v), "SDPA fwd+bwd": train(sdpa)}
    for step_name in ("poly", "none"):
        def attend(q, k, v, step_name=step_name):
            return simwarp.softstep_attention(q, k, v, step=step_name)
        calls[f"{step_name} fwd"] = lambda attend=attend: attend(q, k, v)
        calls[f"{step_name} fwd+bwd"] = train(attend)
    if compiled:
        calls["poly fwd+bwd compiled"] = train(torch.compile(functools.partial(simwarp.softstep_attention, step="poly")))
    return calls


def _loss_calls(n: int, compiled: bool) -> dict[str, Callable[[], object]]:
    # (no compiled variant: the losses break the graph where pytorch-metric-learning's do)
    from pytorch_metric_learning.losses import NCALoss

    from simwarp.losses import SoftStepNCALoss

    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(n, 16, generator=gen, requires_grad=True)
    labels = torch.arange(n) % 4

    def step(loss_fn):
        return lambda: loss_fn(emb, labels).backward()

    return {
        "PML NCALoss": step(NCALoss()),
        "NCA sigmoidal": step(SoftStepNCALoss()),
        "NCA none": step(SoftStepNCALoss(step="none")),
    }


def run_case(name: str, size: int, rounds: int, seconds: float, compiled: bool = False) -> list[dict]:
    """Time every call of one case (the peer first) over alternating rounds; one row per call.
    ``compiled``: also the head and attention under ``torch.compile`` (compiled in the warm-up)."""
    calls = {"head": _head_calls, "attention": _attention_calls, "loss": _loss_calls}[name](size, compiled)
    for call in calls.values():  # warm-up: first-call costs (dispatch caches, lazy imports)
        for _ in range(3):
            call()
    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        for label, call in calls.items():
            times[label].append(_time_per_call(call, seconds))
    peer = next(iter(calls))
    peer_us = statistics.median(times[peer]) * 1e6
    rows = []
    for label, call in calls.items():
        us = statistics.median(times[label]) * 1e6
        baseline = peer_us
        if name == "attention":  # forward against SDPA's forward, training step against its training step
            baseline = statistics.median(times["SDPA fwd+bwd" if "bwd" in label else "SDPA fwd"]) * 1e6
        rows.append({
            "case": name, "size": size, "call": label, "us": us, "baseline_us": baseline,
            # (a compiled call runs generated kernels, not ATen operators one by one)
            "ratio": us / baseline, "operators": None if "compiled" in label else operator_count(call),
        })
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--sizes", nargs="+", type=positive_int, default=[32, 256],
                        help="batch N for head and loss, sequence length L for attention")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--seconds", type=float, default=0.2, help="time per call and round")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: steadier)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "overhead.json",
                        help="where the rows are written as JSON")
    parser.add_argument("--compile", action="store_true",
                        help="also time the default head and poly attention under torch.compile")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.cases:
        for size in args.sizes:
            rows.extend(run_case(name, size, args.rounds, args.seconds, args.compile))
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'case':10s} {'size':>5s} {'call':22s} {'us/call':>9s} {'ratio':>7s} {'operators':>9s}")
    for row in rows:
        print(f"{row['case']:10s} {row['size']:5d} {row['call']:22s} {row['us']:9.1f} "
              f"{row['ratio']:6.2f}x {'-' if row['operators'] is None else row['operators']:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"torch": torch.__version__, "threads": args.threads, "rows": rows})
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
