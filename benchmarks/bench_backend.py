"""Backend benchmark: chunked vs dense on CPU (time and peak memory, same run).

Each case runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) can be read
without interference; "extra" memory is the peak minus the resident size just before the call
(inputs already allocated). Times are medians over repeats in that subprocess, after a warm-up
call: CPU time of the process (``time.process_time``, robust on a shared machine; use
``--threads 1`` so it equals compute time) and wall time.

    python benchmarks/bench_backend.py                 # n=4096, d=64, m in {16k, 64k, 256k}, forward
    python benchmarks/bench_backend.py --quick         # small shapes, seconds
    python benchmarks/bench_backend.py --backward      # also forward+backward at the smallest m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(impl: str, n: int, m: int, d: int, e: int, step: str, backward: bool, repeats: int, threads: int) -> dict:
    """Runs in the child process."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(ROOT))
    import simwarp

    torch.manual_seed(0)
    q = torch.randn(n, d, requires_grad=backward)
    k = torch.randn(m, d, requires_grad=backward)
    v = torch.randn(m, e, requires_grad=backward)
    kw = dict(metric="dot", step=step, a=0.2, b=0.8, t=0.5, impl=impl)

    def call():
        if backward:
            out = simwarp.warp_attend(q, k, v, **kw)
            out.sum().backward()
        else:
            with torch.no_grad():
                simwarp.warp_attend(q, k, v, **kw)

    before = _rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    call()  # warm-up (its peak memory counts; its time does not)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "impl": impl, "n": n, "m": m, "d": d, "e": e, "step": step, "backward": backward, "threads": threads,
        "median_s": statistics.median(times), "times_s": times,
        "median_cpu_s": statistics.median(cpu_times), "cpu_times_s": cpu_times,
        "peak_extra_mib": max(peak, peak_before) - before,
    }


def spawn(args: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**args, "error": f"timeout after {timeout:.0f}s"}
    if res.returncode != 0:
        tail = (res.stderr or "").strip().splitlines()[-1:] or [f"exit {res.returncode}"]
        return {**args, "error": tail[0][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from simwarp._io import write_json
    from simwarp.cli import non_negative_int
    from simwarp.steps import BUILTIN_STEPS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward at the smallest m")
    parser.add_argument("--step", default="sigmoidal", choices=list(BUILTIN_STEPS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=non_negative_int, default=1, help="torch threads per case (0 = torch default)")
    parser.add_argument("--dense-limit-gib", type=float, default=9.0,
                        help="skip dense when one n*m float32 matrix would exceed this / 8")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_backend.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(**json.loads(args.child))))
        return

    n, d, e = (512, 64, 1) if args.quick else (4096, 64, 1)
    ms = (2048, 8192, 32768) if args.quick else (16384, 65536, 262144)
    rows = []
    for i, m in enumerate(ms):
        for backward in ((False, True) if args.backward and i == 0 else (False,)):
            case = {}
            for impl in ("dense", "chunked"):
                dense_gib = n * m * 4 / 2**30
                if impl == "dense" and dense_gib * 8 > args.dense_limit_gib:
                    case[impl] = {"impl": impl, "n": n, "m": m, "skipped": f"needs ~{dense_gib * 8:.0f} GiB (8 n*m copies)"}
                    continue
                case[impl] = spawn(dict(impl=impl, n=n, m=m, d=d, e=e, step=args.step, backward=backward,
                                        repeats=args.repeats, threads=args.threads), timeout=1800)
            rows.append((m, backward, case))
            print(f"done m={m} backward={backward}", file=sys.stderr)

    table = ["| m | pass | dense CPU s (wall) | chunked CPU s (wall) | CPU-time ratio | dense extra MiB | chunked extra MiB | memory ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for m, backward, case in rows:
        dn, ch = case["dense"], case["chunked"]
        def cell(r, key, fmt):
            return fmt.format(r[key]) if key in r else r.get("skipped", r.get("error", "-"))
        tr = f"{ch['median_cpu_s'] / dn['median_cpu_s']:.2f}x" if "median_cpu_s" in dn and "median_cpu_s" in ch else "-"
        mr = f"{ch['peak_extra_mib'] / dn['peak_extra_mib']:.3f}" if "peak_extra_mib" in dn and "peak_extra_mib" in ch else "-"
        def tcell(r):
            return f"{r['median_cpu_s']:.2f} ({r['median_s']:.2f})" if "median_s" in r else r.get("skipped", r.get("error", "-"))
        table.append(f"| {m} | {'fwd+bwd' if backward else 'fwd'} | {tcell(dn)} | {tcell(ch)} | {tr} | "
                     f"{cell(dn, 'peak_extra_mib', '{:.0f}')} | {cell(ch, 'peak_extra_mib', '{:.0f}')} | {mr} |")
    header = (f"bench_backend: n={n}, d={d}, e={e}, step={args.step}, float32, {args.threads or 'default'} thread(s), CPU "
              f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print(header)
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"header": header, "rows": [c for _, _, c in rows]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
