"""SoftStep attention vs SDPA (torch.nn.functional.scaled_dot_product_attention) on CPU.

Both are measured in the same run on the same inputs ``(B, H, L, E)``, self-attention,
non-causal and causal. ``--peers`` adds the sparse-attention peers of the ``entmax`` package
(``pip install entmax``, in the ``bench`` extra): ``entmax15(QKᵀ/√E) V`` and
``sparsemax(QKᵀ/√E) V``, the way they are used in attention (the full score matrix
materialised; masked scores set to ``-inf``). Reported per configuration:

* time: median wall-clock seconds of ``--repeats`` calls (after one warm-up call);
* peak memory: the extra peak resident memory of one call, measured in a *fresh subprocess*
  per (method, shape): the inputs are allocated, the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs`` ← 5, Linux), the call runs, and the new peak (``VmHWM``) minus the
  RSS before the call is reported. This is the real peak of everything the call touched
  (tensors, allocator caches, temporaries), at the price of one process start per cell.

Usage::

    python benchmarks/bench_attention.py                 # L in {512, 2048, 8192}, a few minutes on 2 cores
    python benchmarks/bench_attention.py --full          # more heads, backward too
    python benchmarks/bench_attention.py --out results.json
    python benchmarks/bench_attention.py --peers --lengths 512 2048 --backward

The GPU numbers come with the fused-kernel issue.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simwarp import softstep_attention  # noqa: E402
from simwarp._io import write_json  # noqa: E402
from simwarp.cli import positive_int  # noqa: E402

METHODS = ("sdpa", "softstep")
PEERS = ("entmax15", "sparsemax")


def materialised(mapping, q, k, v, causal: bool):
    """``mapping(QKᵀ/√E) V`` with the whole score matrix in memory (how entmax is used in attention)."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
    return mapping(scores, dim=-1) @ v


def make_inputs(b: int, h: int, n: int, e: int, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, e, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def call(method: str, q, k, v, causal: bool, step: str):
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if method in PEERS:
        import entmax

        return materialised(getattr(entmax, method), q, k, v, causal)
    return softstep_attention(q, k, v, is_causal=causal, step=step)


def run_once(method, q, k, v, causal, step, backward):
    if backward:
        out = call(method, q, k, v, causal, step)
        out.sum().backward()
    else:
        with torch.no_grad():
            call(method, q, k, v, causal, step)


def time_it(method, shape, causal, step, backward, repeats, warmup=True):
    q, k, v = make_inputs(*shape, requires_grad=backward)
    if warmup:
        run_once(method, q, k, v, causal, step, backward)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once(method, q, k, v, causal, step, backward)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _reset_peak() -> bool:
    """Linux: reset the process's peak-RSS mark (VmHWM) to the current RSS (proc(5), clear_refs "5")."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    try:  # VmHWM honours the reset above
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def peak_memory_child(method, shape, causal, step, backward) -> int:
    """Runs in a fresh process: extra peak RSS (bytes) of one call."""
    q, k, v = make_inputs(*shape, requires_grad=backward)
    if not _reset_peak():
        print("warning: cannot reset the peak RSS mark; the import peak may hide the call's peak", file=sys.stderr)
    before = _rss_peak_bytes()
    run_once(method, q, k, v, causal, step, backward)
    return max(0, _rss_peak_bytes() - before)


def peak_memory(method, shape, causal, step, backward, threads) -> int:
    args = json.dumps(dict(method=method, shape=list(shape), causal=causal, step=step, backward=backward,
                           threads=threads))
    res = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=2)
    p.add_argument("--dim", type=positive_int, default=64)
    p.add_argument("--step", default="sigmoidal")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--no-causal", action="store_true", help="skip the causal rows")
    p.add_argument("--full", action="store_true", help="8 heads, forward and forward+backward")
    p.add_argument("--peers", action="store_true", help=f"also time {', '.join(PEERS)} (package entmax)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/out/bench_attention.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        c = json.loads(args.child)
        if c["threads"]:
            torch.set_num_threads(c["threads"])
        print(peak_memory_child(c["method"], tuple(c["shape"]), c["causal"], c["step"], c["backward"]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = METHODS
    if args.peers:
        try:
            import entmax  # noqa: F401
        except ImportError:
            p.error("--peers needs the entmax package: pip install entmax (or the bench extra)")
        methods = (*METHODS, *PEERS)
    heads = 8 if args.full else args.heads
    modes = [False, True] if args.full else [args.backward]
    rows = []
    for backward in modes:
        for n in args.lengths:
            for causal in (False,) if args.no_causal else (False, True):
                shape = (args.batch, heads, n, args.dim)
                reps = args.repeats if n <= 2048 else 1
                cell = {"B": args.batch, "H": heads, "L": n, "E": args.dim, "causal": causal,
                        "pass": "fwd+bwd" if backward else "fwd"}
                for method in methods:
                    cell[f"{method}_s"] = time_it(method, shape, causal, args.step, backward, reps, warmup=n <= 2048)
                    cell[f"{method}_peak_mib"] = peak_memory(method, shape, causal, args.step, backward,
                                                              args.threads) / 2**20
                for method in methods[1:]:
                    suffix = "" if method == "softstep" else f"_{method}"
                    cell[f"time_ratio{suffix}"] = cell[f"{method}_s"] / cell["sdpa_s"]
                    cell[f"mem_ratio{suffix}"] = cell[f"{method}_peak_mib"] / max(cell["sdpa_peak_mib"], 1e-9)
                rows.append(cell)
                print(
                    f"{cell['pass']:7s} L={n:5d} causal={causal!s:5s} | "
                    + " | ".join(f"{m} {cell[f'{m}_s']*1e3:9.1f} ms {cell[f'{m}_peak_mib']:8.1f} MiB" for m in methods),
                    flush=True,
                )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "step": args.step,
        "methods": list(methods),
        "memory": "extra peak RSS of one call in a fresh subprocess (VmHWM after reset, minus RSS before)",
        "time": "median wall-clock of repeated calls after a warm-up (L > 2048: one call, no warm-up)",
    }
    print()
    names = {"sdpa": "SDPA", "softstep": "SoftStep", "entmax15": "entmax15", "sparsemax": "sparsemax"}
    print("| pass | L | causal | SDPA ms | " + " | ".join(f"{names[m]} ms (ratio)" for m in methods[1:])
          + " | " + " | ".join(f"{names[m]} peak MiB" for m in methods) + " |")
    print("|---|---|---|---|" + "---|" * (2 * len(methods) - 1))
    for r in rows:
        times = " | ".join(f"{r[f'{m}_s']*1e3:.1f} ({r[f'{m}_s'] / r['sdpa_s']:.1f}x)" for m in methods[1:])
        mems = " | ".join(f"{r[f'{m}_peak_mib']:.1f}" for m in methods)
        print(f"| {r['pass']} | {r['L']} | {r['causal']} | {r['sdpa_s']*1e3:.1f} | {times} | {mems} |")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "out" / "bench_attention.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"meta": meta, "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
