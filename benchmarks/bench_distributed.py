"""Sharded-bank inference on torch.distributed: time and per-rank peak memory vs ranks.

For each world size (CPU processes, gloo over loopback) every rank generates *only its shard*
of a bank ``(M, d)`` (fixed seeded blocks, so the concatenated bank is the same for every world
size) and runs :func:`simwarp.distributed.sharded_warp_attend` for ``Q`` replicated queries.
The baseline, in the same run, is one process calling :func:`simwarp.warp_attend`
(``impl="chunked"``) on the whole bank. Reported per configuration: wall time of the call
(max over ranks), per-rank peak RSS (``ru_maxrss``) and its growth over the RSS after imports,
and the max deviation of the output from the baseline's.

    python benchmarks/bench_distributed.py            # quick: bank 131072 x 64, 1024 queries
    python benchmarks/bench_distributed.py --full     # bank 1M x 64, 8192 queries (slow on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simwarp._io import write_json
from simwarp.cli import positive_int

BLOCKS = 16  # the bank is generated as BLOCKS seeded blocks; ranks own contiguous blocks


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _block(j: int, rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + j)
    return torch.randn(rows, dim, generator=g), torch.randn(rows, 1, generator=g)


def _shard(rank: int, world: int, bank: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    per = bank // BLOCKS
    lo, hi = rank * BLOCKS // world, (rank + 1) * BLOCKS // world
    k = torch.empty((hi - lo) * per, dim)
    v = torch.empty((hi - lo) * per, 1)
    for i, j in enumerate(range(lo, hi)):
        k[i * per : (i + 1) * per], v[i * per : (i + 1) * per] = _block(j, per, dim)
    return k, v


def _queries(n: int, dim: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(7))


def _worker(rank: int, world: int, cfg: dict, init_file: str, out_dir: str) -> None:
    from simwarp.distributed import sharded_warp_attend

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    base = _rss_mb()
    k, v = _shard(rank, world, cfg["bank"], cfg["dim"])
    q = _queries(cfg["queries"], cfg["dim"])
    dist.barrier()
    t0 = time.perf_counter()
    out = sharded_warp_attend(q, k, v, metric="l2", chunk_size=cfg["chunk"])
    dist.barrier()
    elapsed = time.perf_counter() - t0
    rec = {"rank": rank, "time_s": elapsed, "peak_mb": _peak_mb(), "base_mb": base, "shard_rows": k.shape[0]}
    recs = [None] * world
    dist.all_gather_object(recs, rec)
    if rank == 0:
        torch.save({"records": recs, "out": out}, os.path.join(out_dir, f"world{world}.pt"))
    dist.barrier()  # no rank tears down while another still talks to it (gloo aborted now and then)
    dist.destroy_process_group()


def _baseline(cfg: dict, out_dir: str) -> None:
    """One process, the whole bank, simwarp.warp_attend (chunked): the reference."""
    import simwarp

    torch.set_num_threads(cfg["threads"])
    base = _rss_mb()
    k, v = _shard(0, 1, cfg["bank"], cfg["dim"])
    q = _queries(cfg["queries"], cfg["dim"])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = simwarp.warp_attend(q, k, v, metric="l2", impl="chunked", chunk_size=cfg["chunk"])
    elapsed = time.perf_counter() - t0
    rec = {"rank": 0, "time_s": elapsed, "peak_mb": _peak_mb(), "base_mb": base, "shard_rows": k.shape[0]}
    torch.save({"records": [rec], "out": out}, os.path.join(out_dir, "baseline.pt"))


def _baseline_entry(_rank: int, cfg: dict, out_dir: str) -> None:
    _baseline(cfg, out_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", type=positive_int, default=131072)
    p.add_argument("--dim", type=positive_int, default=64)
    p.add_argument("--queries", type=positive_int, default=1024)
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    p.add_argument("--chunk", type=int, default=1024, help="bank rows per block (0: the backend default)")
    p.add_argument("--full", action="store_true", help="bank 1M x 64, 8192 queries")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_distributed.json"))
    args = p.parse_args()
    if args.full:
        args.bank, args.queries = 1 << 20, 8192
    if args.bank % BLOCKS:
        raise SystemExit(f"--bank must be a multiple of {BLOCKS}")
    cfg = {"bank": args.bank, "dim": args.dim, "queries": args.queries, "threads": args.threads, "chunk": args.chunk or None}
    try:
        ranks = [positive_int(r) for r in args.ranks.split(",")]
    except argparse.ArgumentTypeError as err:
        p.error(f"--ranks: comma-separated positive ints, {err}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_baseline_entry, args=(cfg, tmp), nprocs=1, join=True, start_method="spawn")
        ref = torch.load(os.path.join(tmp, "baseline.pt"))
        configs = [("warp_attend (1 proc, no dist)", ref)]
        for w in ranks:
            mp.start_processes(_worker, args=(w, cfg, os.path.join(tmp, f"store{w}"), tmp), nprocs=w, join=True,
                               start_method="spawn")
            configs.append((f"sharded, {w} rank{'s' if w > 1 else ''}", torch.load(os.path.join(tmp, f"world{w}.pt"))))
        base_time = ref["records"][0]["time_s"]
        base_peak = ref["records"][0]["peak_mb"] - ref["records"][0]["base_mb"]
        for name, res in configs:
            recs = res["records"]
            t = max(r["time_s"] for r in recs)
            peak = max(r["peak_mb"] for r in recs)
            growth = max(r["peak_mb"] - r["base_mb"] for r in recs)
            rows.append({
                "config": name, "ranks": len(recs), "time_s": t, "time_ratio": t / base_time,
                "peak_rss_mb_per_rank": peak, "rss_growth_mb_per_rank": growth, "growth_ratio": growth / base_peak,
                "shard_rows": max(r["shard_rows"] for r in recs),
                "max_abs_diff_vs_baseline": float((res["out"] - ref["out"]).abs().max()),
            })
    print(f"bank {args.bank} x {args.dim}, {args.queries} queries, {args.threads} thread(s)/process, metric l2, sigmoidal")
    hdr = f"{'config':32s} {'time s':>8s} {'x base':>7s} {'peak RSS MB':>12s} {'growth MB':>10s} {'x base':>7s} {'max|diff|':>10s}"
    print(hdr)
    for r in rows:
        print(f"{r['config']:32s} {r['time_s']:8.2f} {r['time_ratio']:7.2f} {r['peak_rss_mb_per_rank']:12.0f} "
              f"{r['rss_growth_mb_per_rank']:10.0f} {r['growth_ratio']:7.2f} {r['max_abs_diff_vs_baseline']:10.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, {"config": cfg, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
