"""What the GPU compiler makes of the fused kernels, checked without a GPU.

Triton's interpreter (``tests/test_triton.py``) rounds every operation on its own, so it cannot
see what the GPU compiler does to the arithmetic: contracting ``a * b + c`` into one fused
multiply-add, for one. ``tools/check_kernels_sm90.py`` compiles the kernels for sm_90 on this
machine; these tests read the PTX it writes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend (ptxas)")

from simwarp.backend.triton import version_problem  # noqa: E402

if version_problem() is not None:
    pytest.skip(version_problem(), allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
#: float32's smallest normal number as PTX writes it: ``row_stats_kernel`` calls a row flat
#: (``inv_r = 0``, every key at ``u = 1``) when its range is below it.
SMALLEST_NORMAL = "0f00800000"


@pytest.fixture(scope="module")
def ptx_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # d = 48: the dot scale 1/sqrt(48) is not a power of two, so scaled scores round
    command = [sys.executable, str(ROOT / "tools" / "check_kernels_sm90.py"), "--dims", "48", "--steps", "poly",
               "sigmoidal", "--dtypes", "float32", "bfloat16", "--causal", "--forward-only", "--ptx-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _definition(ptx: str, register: str) -> tuple[str, list[str]]:
    """Opcode and source operands of the instruction that writes ``register`` (PTX from LLVM
    writes each register once)."""
    found = re.findall(rf"^\s*([a-z][\w.]*)\s+{re.escape(register)},\s*([^;]*);", ptx, flags=re.MULTILINE)
    assert len(found) == 1, f"{register} is written by {found}"
    opcode, operands = found[0]
    return opcode, [x.strip() for x in operands.split(",")]


def test_flat_rows_get_an_exact_zero_range(ptx_dir):
    """A row with one valid key (the first row of every causal sequence) or all scores equal
    must get a range of exactly 0. Computed as ``hi - lo`` from the scaled extremes, the
    compiler contracted it into ``fma(hi_raw, factor, -lo)``: the rounding error of ``lo``, a
    "steep" row with ``inv_r`` ~ 1/ulp and garbage weights on an H100 (not in the interpreter)."""
    files = sorted(ptx_dir.glob("*.row_stats_kernel.ptx"))
    assert len(files) == 8  # 2 dtypes x 2 steps x causal or not
    for path in files:
        ptx = path.read_text()
        flat_tests = re.findall(rf"setp\.ge\.f32\s+%p\d+,\s+(%[rf]\d+),\s+{SMALLEST_NORMAL};", ptx)
        assert flat_tests, f"no flat-row test in {path.name}"
        for register in flat_tests:
            # (max r - min r) * factor: a product of a difference, which no FMA can fuse (ptxas
            # may still fuse a plain mul and sub in the other order, so the shape is checked)
            opcode, operands = _definition(ptx, register)
            assert opcode.startswith("mul."), f"{path.name}: the range {register} comes from {opcode}"
            sources = [_definition(ptx, x)[0] for x in operands if re.fullmatch(r"%[rf]\d+", x)]
            assert any(op.startswith("sub.") for op in sources), f"{path.name}: the range is {opcode} of {sources}"
