"""Benchmark simwarp's SoftStep metric-learning losses against pytorch-metric-learning (PML).

Two parts, both measured against their PML baselines in the same run:

* ``speed``: loss forward+backward time and peak memory at batch sizes 1024 and 4096
  (``--full`` adds 16384), d = 128, 4 samples per class, on CPU. Every case runs in a fresh
  subprocess; peak memory = the child's peak RSS (``ru_maxrss``) minus its RSS just before
  the first loss call (after a small warm-up batch that pages in the code), so it counts
  everything the loss allocates (forward graph, backward,
  allocator slack) and nothing from the interpreter or the inputs. Time = median of ``--reps``
  forward+backward calls after one warm-up call. PML's NTXentLoss builds a
  (positive pairs × negative pairs) matrix; cases whose estimated size exceeds ``--mem-cap-gib``
  are reported as skipped with the estimate rather than run.
* ``--interleave``: time only, all cases of a batch size in *one* subprocess, their calls
  alternating (case 1, case 2, ..., case 1, ...), ``--reps`` calls each after a warm-up, median
  per case. Fresh processes differ by up to ~30 % in speed on a shared VM (memory layout, host
  load); alternating calls in one process see the same conditions, so their ratios are the
  steadier ones. Memory needs one process per case: use the default mode for it.
* ``quality``: a small MLP embedding network trained on scikit-learn's digits (8×8 images,
  10 classes; packaged, no download) with each loss; Precision@1 and MAP@R of the test split
  against the training split, from PML's ``AccuracyCalculator`` (torch k-NN, no faiss), over
  ``--seeds`` seeds, mean ± sd.

Usage::

    python benchmarks/bench_losses.py                 # both parts, defaults (a few minutes)
    python benchmarks/bench_losses.py --part speed --full
    python benchmarks/bench_losses.py --part speed --sizes 1024 --interleave --reps 60 --stable-malloc
    python benchmarks/bench_losses.py --part quality --seeds 5      # writes benchmarks/out/losses_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simwarp._io import write_json  # noqa: E402
from simwarp.cli import non_negative_int, positive_int  # noqa: E402

SPEED_CASES = ("pml_nca", "softstep_nca", "softstep_nca_poly", "softstep_nca_none", "pml_ntxent",
               "softstep_contrastive", "softstep_contrastive_none")
#: Cases run only when named in ``--cases``: SoftStep NCA with ``impl="dense"`` (the weight
#: matrix materialised at any batch size: the fast, memory-hungry choice) and with
#: ``impl="chunked"`` (streamed at any batch size: the lean choice; ``"auto"`` streams on CPU
#: above batch 4096).
EXTRA_CASES = ("softstep_nca_dense", "softstep_nca_chunked")


def _cases(arg: str | None) -> tuple[str, ...]:
    cases = SPEED_CASES if not arg else tuple(arg.split(","))
    unknown = [c for c in cases if c not in SPEED_CASES + EXTRA_CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {SPEED_CASES + EXTRA_CASES}")
    return cases


# ---------------------------------------------------------------------------------------
# Speed and memory (one subprocess per case)
# ---------------------------------------------------------------------------------------


def _make_loss(case: str):
    from pytorch_metric_learning import losses as pml

    import simwarp.losses as sl

    return {
        "pml_nca": lambda: pml.NCALoss(),
        "softstep_nca": lambda: sl.SoftStepNCALoss(),
        "softstep_nca_none": lambda: sl.SoftStepNCALoss(step="none"),
        "softstep_nca_poly": lambda: sl.SoftStepNCALoss(step="poly"),
        "softstep_nca_dense": lambda: sl.SoftStepNCALoss(impl="dense"),
        "softstep_nca_chunked": lambda: sl.SoftStepNCALoss(impl="chunked"),
        "pml_ntxent": lambda: pml.NTXentLoss(),
        "softstep_contrastive": lambda: sl.SoftStepContrastiveLoss(),
        "softstep_contrastive_none": lambda: sl.SoftStepContrastiveLoss(step="none"),
    }[case]()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(case: str, n: int, d: int, reps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=gen)
    y = torch.randperm(n, generator=gen) // 4
    loss_fn = _make_loss(case)
    # Page in the code paths (libtorch kernels, lazy imports) on a small batch first, so that
    # the peak below counts the loss's allocations, not code loading.
    small = torch.randn(64, d, generator=gen, requires_grad=True)
    loss_fn(small, torch.arange(64) // 4).backward()
    del small
    emb = x.clone().requires_grad_()
    rss0 = _rss_bytes()
    times = []
    for i in range(reps + 1):
        emb.grad = None
        t0 = time.perf_counter()
        value = loss_fn(emb, y)
        value.backward()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({
        "case": case, "n": n, "d": d, "loss": float(value.detach()),
        "time_s": statistics.median(times[1:]) if reps > 0 else times[0], "warmup_s": times[0], "reps": reps,
        "peak_mib": max(0, peak - rss0) / 2**20,
    }))


def _child_interleaved(cases: list[str], n: int, d: int, reps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=gen)
    y = torch.randperm(n, generator=gen) // 4
    losses = {case: _make_loss(case) for case in cases}

    def call(loss_fn) -> float:
        emb = x.clone().requires_grad_()
        t0 = time.perf_counter()
        loss_fn(emb, y).backward()
        return time.perf_counter() - t0

    for loss_fn in losses.values():  # warm-up
        call(loss_fn)
    times: dict[str, list[float]] = {case: [] for case in cases}
    for i in range(max(reps, 1)):
        order = cases if i % 2 == 0 else cases[::-1]  # no case always runs right after the same one
        for case in order:
            times[case].append(call(losses[case]))
    print(json.dumps([
        {"case": case, "n": n, "d": d, "time_s": statistics.median(ts), "reps": len(ts), "peak_mib": float("nan")}
        for case, ts in times.items()
    ]))


def run_interleaved(sizes, d: int, reps: int, threads: int, timeout: int, cases, stable_malloc: bool) -> list[dict]:
    """Per batch size, all (runnable) cases in one subprocess with alternating calls."""
    rows = []
    for n in sizes:
        runnable = [c for c in cases if not (c == "pml_ntxent" and _ntxent_estimate_gib(n) > 8.0)]
        cmd = [sys.executable, __file__, "--child-interleave", ",".join(runnable), "--n", str(n), "--d", str(d),
               "--reps", str(reps), "--threads", str(threads)]
        env = {**os.environ, **STABLE_MALLOC} if stable_malloc else None
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"interleaved child failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        for r in got:
            print(f"  n={n:6d} {r['case']:26s} {r['time_s'] * 1e3:10.1f} ms (interleaved, {r['reps']} calls)", flush=True)
        rows += got
    return rows


def _ntxent_estimate_gib(n: int) -> float:
    """PML NTXentLoss on labels arange(n)//4: pos pairs × neg pairs entries, in at least a float
    and a bool matrix plus two float temporaries (13 bytes per entry)."""
    pos, neg = n * 3, n * (n - 4)
    return pos * neg * 13 / 2**30


def _dense_estimate_gib(n: int) -> float:
    """SoftStep NCA with ``impl="dense"``: about seven float32 ``n × n`` matrices at peak."""
    return 7 * 4 * n * n / 2**30


#: glibc settings that stop the heap from being trimmed and re-faulted between calls: on a
#: virtual machine each page fault of a fresh allocation costs ~1 µs, which adds several ms of
#: run-to-run noise to a 20-40 ms loss call (``--stable-malloc``).
STABLE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _run_child(case: str, n: int, d: int, reps: int, threads: int, timeout: int, stable_malloc: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--n", str(n), "--d", str(d), "--reps", str(reps),
           "--threads", str(threads)]
    env = {**os.environ, **STABLE_MALLOC} if stable_malloc else None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"case": case, "n": n, "d": d, "skipped": f"timeout {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"case": case, "n": n, "d": d, "skipped": f"failed: {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_speed(
    sizes, d: int, reps: int, threads: int, mem_cap_gib: float, timeout: int, cases=SPEED_CASES, rounds: int = 1,
    stable_malloc: bool = False,
) -> list[dict]:
    """Each case in a fresh subprocess; with ``rounds > 1`` all cases run once per round, in
    turn, and each case reports the median over rounds (load on a shared machine then hits
    every case alike)."""
    runs: dict[tuple[int, str], list[dict]] = {}
    for round_ in range(rounds):
        for n in sizes:
            for case in cases:
                if case == "pml_ntxent" and _ntxent_estimate_gib(n) > mem_cap_gib:
                    runs[(n, case)] = [{"case": case, "n": n, "d": d, "skipped": f"needs ~{_ntxent_estimate_gib(n):.0f} GiB"}]
                    continue
                if case == "softstep_nca_dense" and _dense_estimate_gib(n) > mem_cap_gib:
                    runs[(n, case)] = [{"case": case, "n": n, "d": d, "skipped": f"needs ~{_dense_estimate_gib(n):.0f} GiB"}]
                    continue
                row = _run_child(case, n, d, reps, threads, timeout, stable_malloc)
                runs.setdefault((n, case), []).append(row)
                shown = row.get("skipped") or f"{row['time_s']*1e3:10.1f} ms {row['peak_mib']:10.1f} MiB"
                print(f"  round {round_ + 1}/{rounds} n={n:6d} {case:26s} {shown}", flush=True)
    rows = []
    for rs in runs.values():
        done = [r for r in rs if "skipped" not in r]
        if not done:
            rows.append(rs[0])
            continue
        merged = dict(done[0])
        merged["time_s"] = statistics.median(r["time_s"] for r in done)
        merged["peak_mib"] = statistics.median(r["peak_mib"] for r in done)
        merged["rounds"] = len(done)
        merged["time_s_per_round"] = [r["time_s"] for r in done]
        rows.append(merged)
    return rows


def speed_table(rows: list[dict]) -> str:
    base = {(r["n"], r["case"]): r for r in rows if "skipped" not in r}
    peer = {"softstep_nca": "pml_nca", "softstep_nca_none": "pml_nca", "softstep_nca_poly": "pml_nca", "softstep_nca_dense": "pml_nca",
            "softstep_nca_chunked": "pml_nca", "softstep_contrastive": "pml_ntxent", "softstep_contrastive_none": "pml_ntxent"}
    lines = ["| batch | loss | fwd+bwd ms | peak MiB | time vs PML | memory: PML / ours |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n']} | {r['case']} | — | — | skipped: {r['skipped']} | |")
            continue
        ratio_t = ratio_m = ""
        ref = base.get((r["n"], peer.get(r["case"], "")))
        measured_memory = r["peak_mib"] == r["peak_mib"]  # NaN in interleaved mode
        if ref is not None:
            ratio_t = f"{r['time_s'] / ref['time_s']:.3g}x"
            if measured_memory:
                ratio_m = f"{ref['peak_mib'] / max(r['peak_mib'], 1e-9):.1f}x"
        memory = f"{r['peak_mib']:.1f}" if measured_memory else "—"
        lines.append(f"| {r['n']} | {r['case']} | {r['time_s']*1e3:.1f} | {memory} | {ratio_t} | {ratio_m} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Quality on digits
# ---------------------------------------------------------------------------------------

QUALITY_LOSSES = ("softstep_nca", "softstep_contrastive", "softstep_regression", "pml_nca", "pml_ntxent",
                  "pml_contrastive", "pml_triplet")


def _quality_loss(name: str, emb_dim: int):
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning import miners

    import simwarp.losses as sl

    miner = None
    if name == "softstep_nca":
        loss = sl.SoftStepNCALoss(softmax_scale=8.0)
    elif name == "softstep_contrastive":
        loss = sl.SoftStepContrastiveLoss(temperature=0.1)
    elif name == "softstep_regression":
        loss = sl.SoftStepNeighborRegressionLoss(softmax_scale=8.0)
    elif name == "pml_nca":
        loss = pml.NCALoss(softmax_scale=8.0)
    elif name == "pml_ntxent":
        loss = pml.NTXentLoss(temperature=0.1)
    elif name == "pml_contrastive":
        loss = pml.ContrastiveLoss()
    elif name == "pml_triplet":
        loss, miner = pml.TripletMarginLoss(margin=0.1), miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")
    else:
        raise ValueError(name)
    return loss, miner


def _train_eval(name: str, seed: int, epochs: int, batch: int, emb_dim: int, data) -> dict:
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], 128), torch.nn.GELU(), torch.nn.Linear(128, emb_dim))
    loss_fn, miner = _quality_loss(name, emb_dim)
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for start in range(0, len(xtr) - batch + 1, batch):
            idx = perm[start : start + batch]
            emb = net(xtr[idx])
            lab = ytr[idx]
            if name == "softstep_regression":
                value = loss_fn(emb, F.one_hot(lab, 10).float())
            else:
                value = loss_fn(emb, lab, miner(emb, lab) if miner is not None else None)
            opt.zero_grad()
            value.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        etr, ete = net(xtr), net(xte)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              knn_func=CustomKNN(CosineSimilarity()))
    acc = calc.get_accuracy(ete, yte, etr, ytr, ref_includes_query=False)
    out = {"loss": name, "seed": seed, "p_at_1": acc["precision_at_1"], "map_at_r": acc["mean_average_precision_at_r"],
           "train_s": train_s}
    ss = getattr(loss_fn, "softstep", None)
    if ss is not None:
        out["softstep"] = [float(p.detach()) for p in ss()]
    return out


def run_quality(seeds: int, epochs: int, batch: int, emb_dim: int, threads: int) -> list[dict]:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(threads)
    X, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    data = tuple(torch.tensor(a, dtype=torch.float32 if a.dtype.kind == "f" else torch.long)
                 for a in ((xtr - mu) / sd, ytr, (xte - mu) / sd, yte))
    rows = []
    for name in QUALITY_LOSSES:
        for seed in range(seeds):
            r = _train_eval(name, seed, epochs, batch, emb_dim, data)
            rows.append(r)
            print(f"  {name:22s} seed {seed}: P@1 {r['p_at_1']:.4f}  MAP@R {r['map_at_r']:.4f}  ({r['train_s']:.1f}s)",
                  flush=True)
    return rows


def quality_table(rows: list[dict]) -> str:
    lines = ["| loss | Precision@1 | MAP@R | train s / seed |", "|---|---|---|---|"]
    for name in QUALITY_LOSSES:
        rs = [r for r in rows if r["loss"] == name]
        if not rs:
            continue

        def ms(key, rs=rs):
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.4f} ± {sd:.4f}"

        lines.append(f"| {name} | {ms('p_at_1')} | {ms('map_at_r')} | {statistics.mean(r['train_s'] for r in rs):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    ap.add_argument("--full", action="store_true", help="speed: add batch 16384")
    ap.add_argument("--sizes", type=positive_int, nargs="*", default=None, help="speed: batch sizes (overrides --full)")
    ap.add_argument("--d", type=positive_int, default=128)
    ap.add_argument("--reps", type=non_negative_int, default=3, help="speed: timed calls after the warm-up (0: time the warm-up)")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--stable-malloc", action="store_true",
                    help="speed: run the cases with glibc heap trimming off (less page-fault noise)")
    ap.add_argument("--rounds", type=positive_int, default=1, help="speed: run all cases this many times, in turn; report medians")
    ap.add_argument("--interleave", action="store_true",
                    help="speed: time all cases of a size in one process, calls alternating (no memory)")
    ap.add_argument("--cases", default=None, help="speed: comma-separated cases from " + ",".join(SPEED_CASES + EXTRA_CASES))
    ap.add_argument("--mem-cap-gib", type=float, default=8.0)
    ap.add_argument("--timeout", type=positive_int, default=900, help="speed: seconds per case")
    ap.add_argument("--seeds", type=positive_int, default=5)
    ap.add_argument("--epochs", type=positive_int, default=20)
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--emb-dim", type=positive_int, default=32)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/out/losses_<part>.json: one file per part)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-interleave", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.n, args.d, args.reps, args.threads)
        return
    if args.child_interleave:
        _child_interleaved(args.child_interleave.split(","), args.n, args.d, args.reps, args.threads)
        return
    result = {"machine": "CPU", "threads": args.threads}
    if args.part in ("speed", "all"):
        sizes = args.sizes or ([256, 1024, 4096, 16384] if args.full else [256, 1024, 4096])
        print(f"speed: batch {sizes}, d={args.d}, 4 per class, median of {args.reps} after a warm-up, "
              f"{args.rounds} round(s)", flush=True)
        if args.interleave:
            rows = run_interleaved(sizes, args.d, args.reps, args.threads, args.timeout, _cases(args.cases),
                                   args.stable_malloc)
        else:
            rows = run_speed(sizes, args.d, args.reps, args.threads, args.mem_cap_gib, args.timeout,
                             _cases(args.cases), args.rounds, args.stable_malloc)
        result["stable_malloc"], result["interleave"] = args.stable_malloc, args.interleave
        result["speed"] = rows
        print(speed_table(rows))
    if args.part in ("quality", "all"):
        print(f"quality: digits, {args.seeds} seeds, {args.epochs} epochs, batch {args.batch}", flush=True)
        rows = run_quality(args.seeds, args.epochs, args.batch, args.emb_dim, args.threads)
        result["quality"] = rows
        print(quality_table(rows))
    out = args.out if args.out is not None else ROOT / "benchmarks" / "out" / f"losses_{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
