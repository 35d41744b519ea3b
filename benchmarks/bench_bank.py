"""Neighbour-bank inference: simwarp's heads vs scikit-learn's neighbour regressors (CPU, same run).

The inference half of a neighbour head is what scikit-learn's ``KNeighborsRegressor`` does:
predict each query from a stored bank of embeddings and labels. Same bank, same queries, same
thread count; reported per bank size:

* ``softstep``: ``NeighborRegressionHead(step="sigmoidal", mode="global")`` in eval mode with
  the bank set (``impl="auto"``: the chunked streaming path once the problem is large);
* ``poly``: the same head with ``step="poly"``;
* ``knn``: simwarp's ``KNNRegressionHead(k)`` (hard top-k through ``torch.topk``);
* ``sklearn-brute``: ``KNeighborsRegressor(k, algorithm="brute")`` (BLAS distances + partition);
* ``sklearn-auto``: ``KNeighborsRegressor(k)`` with its default tree choice (a KD-tree or ball
  tree, built in ``fit``; the build time is reported separately, it is paid once per bank).

Time: median wall-clock of ``--repeats`` predictions of all queries after one warm-up.
Peak memory: extra peak RSS of one prediction in a fresh subprocess (as ``bench_attention.py``).
The data: bank and queries are drawn from a mixture of 64 Gaussian clusters in ``--dim``
dimensions (embedding-like, so trees are not at their worst), labels a smooth function of the
cluster centre plus noise.

    python benchmarks/bench_bank.py                         # banks of 10k, 100k, 1M; 1000 queries; d = 32
    python benchmarks/bench_bank.py --banks 10000 --quick   # seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simwarp._io import write_json  # noqa: E402
from simwarp.cli import positive_int  # noqa: E402

METHODS = ("softstep", "poly", "knn", "sklearn-brute", "sklearn-auto")


def make_data(m: int, n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d)).astype(np.float32) * 3.0
    weights = rng.normal(size=d).astype(np.float32)

    def draw(count):
        c = rng.integers(0, 64, size=count)
        x = centres[c] + rng.normal(size=(count, d)).astype(np.float32)
        y = np.sin(centres[c] @ weights / np.sqrt(d)) + 0.1 * rng.normal(size=count).astype(np.float32)
        return x.astype(np.float32), y.astype(np.float32)

    (bank_x, bank_y), (query_x, _) = draw(m), draw(n)
    return bank_x, bank_y, query_x


def build(method: str, bank_x: np.ndarray, bank_y: np.ndarray, k: int):
    """A ``predict(queries) -> (n,)`` callable and the seconds its set-up took."""
    t0 = time.perf_counter()
    if method.startswith("sklearn"):
        from sklearn.neighbors import KNeighborsRegressor

        model = KNeighborsRegressor(k, algorithm="brute" if method == "sklearn-brute" else "auto").fit(bank_x, bank_y)
        return model.predict, time.perf_counter() - t0
    from simwarp.heads import KNNRegressionHead, NeighborRegressionHead

    d = bank_x.shape[1]
    if method == "knn":
        head = KNNRegressionHead(d, 1, k=k)
    else:
        head = NeighborRegressionHead(d, 1, mode="global", step="poly" if method == "poly" else "sigmoidal")
    head.eval()
    head.set_bank(torch.from_numpy(bank_x), torch.from_numpy(bank_y))

    def predict(queries):
        with torch.no_grad():
            return head(torch.from_numpy(queries)).squeeze(-1).numpy()

    return predict, time.perf_counter() - t0


def _peak_child(method: str, m: int, n: int, d: int, k: int, threads: int) -> int:
    """Runs in a fresh process: extra peak RSS (bytes) of one prediction."""
    torch.set_num_threads(threads)
    bank_x, bank_y, query_x = make_data(m, n, d)
    predict, _ = build(method, bank_x, bank_y, k)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark (Linux)
    except OSError:
        print("warning: cannot reset the peak RSS mark", file=sys.stderr)

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    before = rss("VmRSS:")
    predict(query_x)
    return max(0, rss("VmHWM:") - before)


def peak_memory(method: str, m: int, n: int, d: int, k: int, threads: int) -> int:
    args = json.dumps(dict(method=method, m=m, n=n, d=d, k=k, threads=threads))
    res = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--banks", type=positive_int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--queries", type=positive_int, default=1000)
    p.add_argument("--dim", type=positive_int, default=32)
    p.add_argument("--k", type=positive_int, default=10, help="neighbours for knn and scikit-learn")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (scikit-learn's BLAS follows OMP_NUM_THREADS)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--no-memory", action="store_true", help="skip the per-cell peak-memory subprocesses")
    p.add_argument("--quick", action="store_true", help="1 repeat, no memory")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_bank.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        c = json.loads(args.child)
        print(_peak_child(c["method"], c["m"], c["n"], c["d"], c["k"], c["threads"]))
        return 0
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    rows = []
    for m in args.banks:
        bank_x, bank_y, query_x = make_data(m, args.queries, args.dim)
        row = {"bank": m, "queries": args.queries, "dim": args.dim, "k": args.k}
        preds = {}
        for method in args.methods:
            predict, setup = build(method, bank_x, bank_y, args.k)
            preds[method] = predict(query_x)  # warm-up, and the predictions for the sanity check
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                predict(query_x)
                times.append(time.perf_counter() - t0)
            row[f"{method}_s"] = statistics.median(times)
            row[f"{method}_setup_s"] = setup
            if not (args.quick or args.no_memory):
                row[f"{method}_peak_mib"] = peak_memory(method, m, args.queries, args.dim, args.k, args.threads) / 2**20
        if "knn" in preds and "sklearn-brute" in preds:  # the same estimator: predictions must agree
            row["knn_vs_sklearn_max_abs_diff"] = float(np.abs(preds["knn"] - preds["sklearn-brute"]).max())
        base = row.get("sklearn-brute_s")
        cells = []
        for method in args.methods:
            ratio = f" ({row[f'{method}_s'] / base:.2f}x)" if base else ""
            cells.append(f"{method} {row[f'{method}_s'] * 1e3:.1f} ms{ratio}")
        print(f"bank {m:>8d} | " + " | ".join(cells), flush=True)
        rows.append(row)
    print()
    mem = not (args.quick or args.no_memory)
    header = ["bank"] + [f"{m} ms" for m in args.methods] + ([f"{m} MiB" for m in args.methods] if mem else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        base = r.get("sklearn-brute_s")
        times = [f"{r[f'{m}_s'] * 1e3:.1f}" + (f" ({r[f'{m}_s'] / base:.2f}x)" if base else "") for m in args.methods]
        mems = [f"{r[f'{m}_peak_mib']:.0f}" for m in args.methods] if mem else []
        print("| " + " | ".join([str(r["bank"]), *times, *mems]) + " |")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "torch": torch.__version__,
            "threads": args.threads, "repeats": repeats, "command": " ".join(["python", "benchmarks/bench_bank.py", *(argv or sys.argv[1:])])}
    write_json(Path(args.out), {"meta": meta, "rows": rows})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
