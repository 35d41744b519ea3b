"""Compile every fused-kernel variant for sm_90 (H100/H200) on a machine without a GPU.

Triton's interpreter (``tests/test_triton.py``) checks the kernels' arithmetic but compiles
nothing, so a kernel can pass every test and still be rejected by the GPU compiler. This script
runs the real launch code on CPU tensors with Triton's active driver replaced by a stand-in that
reports a CUDA sm_90 target; every launch only compiles (JIT warm-up, no execution), and
``ptxas -v`` (shipped with Triton) reports registers and spills per kernel, and Triton's metadata
the shared memory of a block (a launch fails above the card's limit). The launcher's
post-processing runs on the unwritten outputs, so its values are meaningless; only compilation
is checked.

Usage::

    python tools/check_kernels_sm90.py                 # bf16 + float32, d = 64 / 128 / 256, all steps
    python tools/check_kernels_sm90.py --dims 64 --steps poly --causal --no-skipping
    python tools/check_kernels_sm90.py --pipeline-range --dtypes bfloat16   # pass 1 software-pipelined
    python tools/check_kernels_sm90.py --dims 64 128 --dropout 0.1          # with dropout in the kernels
    python tools/check_kernels_sm90.py --dims 64 --metrics l2 cosine --ragged --splits 3 --dtypes float16
                                       # distances, ragged tiles with a padding mask, split keys
    python tools/check_kernels_sm90.py --dims 48 --steps poly --ptx-dir ptx   # keep each kernel's PTX

Exit status 1 if any variant fails to compile or needs more shared memory than an H100 block has. Relies on Triton internals
(``triton.runtime.driver``, ``JITFunction.run(warmup=True)``); tested with Triton 3.6 (the GPU
machines') and 3.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _CompileOnlyDriver:
    """Just enough of Triton's CUDA driver for compilation against sm_90."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return None

    def is_active(self):
        return True

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


def _ptxas_report(ptx: str, capability: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        res = subprocess.run([get_ptxas(capability).path, "-v", "--gpu-name", arch, str(src), "-o", str(Path(tmp, "k.o"))],
                             capture_output=True, text=True)
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return (int(regs[-1]) if regs else -1), (int(spills[-1]) if spills else -1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--steps", nargs="+", default=["none", "sigmoidal", "poly", "log"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--causal", action="store_true", help="also compile the causal variants")
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--no-skipping", action="store_true", help="also compile KernelConfig(block_skipping=False)")
    p.add_argument("--pipeline-range", action="store_true", help="compile with KernelConfig(pipeline_range=True)")
    p.add_argument("--heavy-first", action="store_true", help="compile with KernelConfig(heavy_first=True)")
    p.add_argument("--dropout", type=float, default=0.0, help="compile the dropout variants (dropout_p > 0)")
    p.add_argument("--metrics", nargs="+", default=["dot"], help="dot, cosine, sqeuclidean, l2")
    p.add_argument("--ragged", action="store_true",
                   help="n = 500 queries, m = 777 keys (tiles that do not divide them) and a key-padding mask")
    p.add_argument("--splits", type=int, default=1, help="key splits per query block (the neighbour-bank grids)")
    p.add_argument("--smem-limit", type=int, default=232448, help="bytes of shared memory per block (H100/H200)")
    p.add_argument("--forward-only", action="store_true", help="compile the inference forward's kernels only")
    p.add_argument("--ptx-dir", type=Path, default=None,
                   help="write each compiled kernel's PTX there, as VARIANT.KERNEL.ptx (tests/test_kernel_ptx.py reads them)")
    args = p.parse_args(argv)

    from triton.runtime import driver as triton_driver
    from triton.runtime.jit import JITFunction

    import simwarp.backend.triton as fused
    from simwarp.backend.common import make_spec, resolve_params
    from simwarp.backend.triton import KernelConfig, launch

    triton_driver.set_active(_CompileOnlyDriver(args.capability))
    compiled: list[tuple[str, int, int, int]] = []
    original_run = JITFunction.run

    variant = ""

    def compile_only(self, *a, grid, warmup, **kw):
        kernel = original_run(self, *a, grid=grid, warmup=True, **kw)
        compiled.append((self.__name__, *_ptxas_report(kernel.asm["ptx"], args.capability), kernel.metadata.shared))
        if args.ptx_dir is not None:
            Path(args.ptx_dir, f"{variant}.{self.__name__}.ptx").write_text(kernel.asm["ptx"])
        return kernel

    JITFunction.run = compile_only
    # CPU tensors take the GPU kernels (the launcher would pick the interpreter for them).
    fused.unsupported_reason = lambda *a, **k: None
    make_plan = launch.make_plan
    launch.make_plan = lambda *a, **k: dataclasses.replace(make_plan(*a, **k), interpret=False)
    launch._num_splits = lambda cfg, programs, n_kb, device: min(args.splits, n_kb)

    if args.ptx_dir is not None:
        args.ptx_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    causal_options = (False, True) if args.causal else (False,)
    skipping_options = (True, False) if args.no_skipping else (True,)
    for dtype_name, metric, d, step, causal, skipping in itertools.product(
        args.dtypes, args.metrics, args.dims, args.steps, causal_options, skipping_options
    ):
        dtype = getattr(torch, dtype_name)
        compiled.clear()
        variant = f"{dtype_name}_{metric}_d{d}_{step}_causal{int(causal)}_skipping{int(skipping)}"
        n, m = (500, 777) if args.ragged else (512, 512)
        q = torch.randn(1, 2, n, d, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, 2, m, d, dtype=dtype, requires_grad=True) for _ in range(2))
        mask = (torch.arange(m) < m - 5).view(1, 1, 1, m) if args.ragged else None
        spec = make_spec(metric, None, step, 1.0, causal, False, False)
        prm = resolve_params(0.1, 0.9, 0.5, batch=torch.Size((1, 2)), n=n, dtype=torch.float32, device=torch.device("cpu"))
        config = KernelConfig(block_skipping=skipping, pipeline_range=args.pipeline_range, heavy_first=args.heavy_first)
        error = note = ""
        try:
            with torch.set_grad_enabled(not args.forward_only):
                out, _ = fused.triton_warp_attend(q, k, v, *prm, mask, spec, config=config, dropout_p=args.dropout)
            if not args.forward_only:
                out.float().sum().backward()
        except Exception as exc:  # noqa: BLE001 - compile errors are the report; the rest is shown
            message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[-1][:200]}"
            if type(exc).__name__ == "CompilationError" or "compil" in str(exc).lower():
                error = message
            else:  # post-processing of unwritten outputs (garbage lists, indices) may fail: not a compile error
                note = f"(launch code raised after compiling {len(compiled)} kernels: {message}) "
        too_big = [name for name, *_, smem in compiled if smem > args.smem_limit]
        if too_big and not error:
            error = f"shared memory above {args.smem_limit} B in {', '.join(too_big)}"
        failures += bool(error)
        report = " | ".join(f"{name} {regs} regs, {spill} B spilled, {smem // 1024} KiB smem"
                            for name, regs, spill, smem in compiled)
        print(f"{dtype_name:8s} {metric:11s} d={d:<3d} {step:9s} causal={int(causal)} skipping={int(skipping)}: "
              f"{error + ' | ' if error else ''}{note}{report}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
