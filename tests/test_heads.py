"""Tests of the neighbour heads (simwarp.heads)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import simwarp
from simwarp.heads import (
    KNNRegressionHead,
    LinearClassificationHead,
    LinearHead,
    NeighborClassificationHead,
    NeighborRegressionHead,
    make_head,
)


def _data(n=12, d=5, e=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, e, generator=g, dtype=dtype) * 3.0 + 1.0
    return z, y


def _randomise(head: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("mode", ["global", "instance"])
@pytest.mark.parametrize("step", ["sigmoidal", "log", "none"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_leave_one_out_matches_brute_force_loop(mode, step, metric):
    z, y = _data()
    head = NeighborRegressionHead(5, 2, metric=metric, step=step, mode=mode, temperature=0.7).double()
    _randomise(head)
    out = head(z, y)
    mean, std = head.target_mean, head.target_std
    ys = (y - mean) / std
    for i in range(z.shape[0]):
        others = [j for j in range(z.shape[0]) if j != i]
        kw = {"step": step}
        if head.softstep is not None:
            a, b, t = head.softstep(z[i : i + 1] if mode == "instance" else None)
            kw.update(a=a, b=b, t=t)
        ref = simwarp.warp_attend(
            z[i : i + 1], z[others], ys[others], metric=metric, temperature=0.7, impl="dense", **kw
        )
        torch.testing.assert_close(out[i], (ref * std + mean)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_counts_each_batch_once(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    def run(checkpointed):
        torch.manual_seed(0)
        encoder, head = nn.Linear(4, 3).double(), NeighborRegressionHead(3, 2).double()
        for seed in range(2):
            x, y = _data(n=6, d=4, seed=seed)
            x, y = x.requires_grad_(), y * 10 + 3  # (reentrant checkpointing needs an input that requires grad)
            loss = (checkpoint(lambda x, y: head(encoder(x), y), x, y, use_reentrant=use_reentrant)
                    if checkpointed else head(encoder(x), y)).pow(2).sum()
            loss.backward()
        return head, [p.grad for p in (*encoder.parameters(), *head.parameters())]

    (plain, plain_grads), (ckpt, ckpt_grads) = run(False), run(True)
    assert int(ckpt.targets_seen) == 12
    for name in ("target_mean", "target_std", "_target_m2"):  # the exact statistics of the 12 targets
        torch.testing.assert_close(getattr(ckpt, name), getattr(plain, name))
    torch.testing.assert_close(ckpt_grads, plain_grads)
    # updated in place: references to the buffer (DDP's buffer lists, compiled graphs) stay valid
    seen = ckpt.targets_seen
    ckpt(*_data(n=4, d=3))
    assert ckpt.targets_seen is seen and int(seen) == 16


@pytest.mark.slow
def test_checkpointed_head_in_a_fullgraph_compile_with_the_documented_setting(monkeypatch):
    """docs/heads.md: Dynamo refuses the head's statistics (side effects) inside a checkpoint
    under fullgraph=True unless they are skipped in the recomputation, which is what the head
    wants (each batch counted once)."""
    from torch.utils.checkpoint import checkpoint

    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        pytest.skip("torch before 2.10 has no skip_fwd_side_effects_in_bwd_under_checkpoint (docs/heads.md)")
    monkeypatch.setattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint", True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    encoder, head = nn.Linear(5, 8), NeighborRegressionHead(8)
    x, y = torch.randn(32, 5), torch.randn(32) * 3 + 1

    def step(x, y):
        return checkpoint(head, encoder(x), y, use_reentrant=False)

    out = torch.compile(step, fullgraph=True)(x, y)
    out.pow(2).sum().backward()
    assert out.shape == (32,) and all(p.grad is not None for p in encoder.parameters())
    assert int(head.targets_seen) == 32
    torch.testing.assert_close(head.target_mean, y.mean().reshape(1))
    torch.testing.assert_close(head.target_std, y.std(unbiased=False).reshape(1))
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 12):  # before, dynamo dropped the
        assert 0 < head.sparsity["kept_fraction"] <= 1  # kept counts there too (docs/heads.md)
    torch._dynamo.reset()


def test_standardisation_is_exact_running_statistics():
    head = NeighborRegressionHead(3, 2).double()
    ys = []
    for seed in range(3):
        z, y = _data(n=7, d=3, seed=seed)
        head(z, y)
        ys.append(y)
    ally = torch.cat(ys)
    torch.testing.assert_close(head.target_mean, ally.mean(0))
    torch.testing.assert_close(head.target_std, ally.std(0, unbiased=False))
    assert int(head.targets_seen) == ally.shape[0]
    # set_bank resets the statistics to the bank's
    head.set_bank(*_data(n=9, d=3, seed=7))
    torch.testing.assert_close(head.target_mean, head.bank_y.mean(0))


def test_a_training_call_that_raises_leaves_the_target_statistics_as_they_were():
    """NaN embeddings under mode="instance" raise in the backend, after the statistics had
    taken the batch in: a loop that skipped the batch kept it in target_mean."""
    head = NeighborRegressionHead(3, 2, mode="instance")
    head(*_data(n=7, d=3, seed=0))
    before = {name: buf.clone() for name, buf in head.named_buffers()}
    z = torch.randn(8, 3)
    z[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        head(z, torch.full((8, 2), 1000.0))
    for name, buf in head.named_buffers():
        assert torch.equal(buf, before[name]), name


@pytest.mark.parametrize("value", [0.0, 0.1, 3e7])
def test_a_constant_target_keeps_std_1_and_a_small_one_its_own(value):
    """The threshold was absolute (1e-12): targets of size 1e-13 counted as constant, their
    "standardised" labels (~1e-13) underflowed float16 embeddings' dtype, and every prediction
    was the bank mean."""
    head = NeighborRegressionHead(4, 1, mode="global")
    for _ in range(3):  # equal values over several batches: the running mean may round
        head(torch.randn(7, 4), torch.full((7,), value))
    assert head.target_std.item() == 1.0
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(50, 4, generator=g), 1e-13 * torch.randn(50, 1, generator=g)
    head.eval().set_bank(z.half(), y)
    torch.testing.assert_close(head.target_std, y.double().std(0, unbiased=False).float())
    pred = head(z[:5].half() + 0.01)
    assert pred.unique().numel() == 5 and (pred - y[:5]).abs().max() < 0.5 * y.abs().max()


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_running_statistics_of_huge_targets(magnitude):
    # in float32 the squared deviations overflowed: std inf (NaN predictions) or m2 NaN (std reset to 1)
    g = torch.Generator().manual_seed(0)
    head = NeighborRegressionHead(4, 1)
    ys = [torch.randn(8, generator=g) * magnitude for _ in range(3)]  # several updates: m2 saturates
    for y in ys:
        out = head(torch.randn(8, 4, generator=g), y)
        assert torch.isfinite(out).all()
    ally = torch.cat(ys).double()
    assert head.target_std.dtype == torch.float32
    torch.testing.assert_close(head.target_std.double(), ally.std(unbiased=False)[None], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(head.target_mean.double(), ally.mean()[None], rtol=1e-6, atol=magnitude * 1e-6)
    head.set_bank(torch.randn(8, 4, generator=g), ys[0])
    torch.testing.assert_close(head.target_std.double(), ys[0].double().std(unbiased=False)[None], rtol=1e-6, atol=0.0)
    with torch.no_grad():
        assert torch.isfinite(head.eval()(torch.randn(3, 4, generator=g))).all()


def test_integer_targets_keep_the_precision_of_the_embeddings():
    big = 2**24 + 1  # not a float32
    head = NeighborRegressionHead(3, 1).eval()
    head.set_bank(torch.randn(1, 3, dtype=torch.float64), torch.tensor([big]))
    assert head.bank_y.dtype == torch.float64
    with torch.no_grad():
        assert head(torch.randn(2, 3, dtype=torch.float64)).flatten().tolist() == [big, big]
    head.train()
    out = head(torch.randn(4, 3, dtype=torch.float64), torch.full((4,), big))
    torch.testing.assert_close(out, torch.full((4,), float(big), dtype=torch.float64), rtol=0.0, atol=1e-6)
    head.set_bank(torch.randn(2, 3), torch.tensor([1, 2]))  # float32 (or half) embeddings: the default dtype
    assert head.bank_y.dtype == torch.float32
    head.set_bank(torch.randn(2, 3).half(), torch.tensor([70000, 2]))  # beyond float16: still finite
    assert head.bank_y.dtype == torch.float32 and head.bank_y[0].item() == 70000
    knn = KNNRegressionHead(3, 1, k=1)
    knn.set_bank(torch.randn(1, 3, dtype=torch.float64), torch.tensor([big]))
    assert knn.bank_y.dtype == torch.float64


def test_standardisation_does_not_change_predictions_and_no_clipping():
    z, y = _data()
    y = y * 100.0 + 500.0  # far outside [0, 1]
    h1 = NeighborRegressionHead(5, 2, standardize_targets=True).double()
    h2 = NeighborRegressionHead(5, 2, standardize_targets=False).double()
    h2.load_state_dict(h1.state_dict())
    torch.testing.assert_close(h1(z, y), h2(z, y))
    assert h1(z, y).max() > 1.0


def test_gradients_reach_encoder_and_step_parameters():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
    for mode in ("global", "instance"):
        head = NeighborRegressionHead(6, 1, mode=mode)
        x, y = torch.randn(16, 4), torch.randn(16)
        loss = F.mse_loss(head(enc(x), y), y)
        loss.backward()
        assert torch.isfinite(loss)
        for p in list(enc.parameters()) + list(head.parameters()):
            assert p.grad is not None and torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0
        enc.zero_grad()


def test_duplicate_rows_l2_no_nan_gradient():
    z = torch.randn(4, 3).repeat(2, 1).requires_grad_(True)  # zero distances off the diagonal too
    y = torch.randn(8)
    head = NeighborRegressionHead(3, 1)
    F.mse_loss(head(z, y), y).backward()
    assert torch.isfinite(z.grad).all()


def test_bank_roundtrip_through_torch_save():
    z, y = _data(n=20, d=5, e=2, dtype=torch.float32)
    head = NeighborRegressionHead(5, 2)
    _randomise(head)
    head.set_bank(z, y)
    head.eval()
    q = torch.randn(4, 5)
    expected = head(q)
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    fresh = NeighborRegressionHead(5, 2).eval()
    assert not fresh.has_bank
    fresh.load_state_dict(torch.load(buf))
    assert fresh.bank_size == 20
    torch.testing.assert_close(fresh(q), expected)
    # the whole module too
    buf = io.BytesIO()
    torch.save(head, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    torch.testing.assert_close(whole(q), expected)
    fresh.clear_bank()
    with pytest.raises(RuntimeError, match="no bank"):
        fresh(q)


def test_classification_bank_roundtrip_and_log_probs():
    z, _ = _data(n=20, d=5, dtype=torch.float32)
    labels = torch.arange(20) % 3
    head = NeighborClassificationHead(5, 3)
    lp = head(z, labels)
    assert lp.shape == (20, 3)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(20))
    loss = F.nll_loss(lp, labels)
    loss.backward()
    assert torch.isfinite(loss)
    head.set_bank(z, labels)
    head.eval()
    sd = head.state_dict()
    fresh = NeighborClassificationHead(5, 3).eval()
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(z[:3]), head(z[:3]))
    assert fresh.bank_y.dtype == torch.long
    torch.testing.assert_close(head.predict_proba(z[:3]).sum(-1), torch.ones(3))


def test_classification_log_prob_finite_when_no_kept_neighbour_has_class():
    # two tight clusters, class 2 only far away: a sharp step gives class 2 zero mass
    z = torch.cat([torch.zeros(5, 2), torch.full((5, 2), 10.0)]) + 0.01 * torch.randn(10, 2)
    z.requires_grad_(True)
    labels = torch.tensor([0] * 5 + [2] * 5)
    head = NeighborClassificationHead(2, 3, mode="global", init=(0.5, 0.6, 0.1))
    lp = head(z, labels)
    assert torch.isfinite(lp).all()
    F.nll_loss(lp, labels).backward()
    assert torch.isfinite(z.grad).all()


def test_classification_mass_matches_weights():
    z, _ = _data(n=10, d=4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    head = NeighborClassificationHead(4, 3, mode="global", smoothing=1e-3).double()
    head.set_bank(z, labels)
    head.eval()
    q = torch.randn(3, 4, dtype=torch.float64)
    a, b, t = head.softstep()
    w = simwarp.warp_weights(q, z, metric="l2", a=a, b=b, t=t)
    mass = w @ F.one_hot(labels, 3).double()
    torch.testing.assert_close(head(q), torch.log(mass * (1 - 1e-3) + 1e-3 / 3))


def test_predict_with_uncertainty_is_weighted_variance():
    z, y = _data(n=15, d=4, e=2)
    head = NeighborRegressionHead(4, 2, mode="global").double()
    head.set_bank(z, y)
    head.eval()
    q = torch.randn(5, 4, dtype=torch.float64)
    mean, var = head.predict_with_uncertainty(q)
    a, b, t = head.softstep()
    w = simwarp.warp_weights(q, z, metric="l2", a=a, b=b, t=t)
    ref_mean = w @ y
    ref_var = torch.einsum("nm,nme->ne", w, (y[None] - ref_mean[:, None]) ** 2)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    torch.testing.assert_close(head(q), ref_mean)


def test_explain_matches_dense_weights_and_chunks(monkeypatch):
    z, y = _data(n=30, d=4, e=1)
    head = NeighborRegressionHead(4, 1).double()
    _randomise(head)
    head.set_bank(z, y)
    q = torch.randn(7, 4, dtype=torch.float64)
    a, b, t = head.softstep(q)
    w = simwarp.warp_weights(q, z, metric="l2", a=a, b=b, t=t)
    top = torch.topk(w, 4, dim=-1)
    monkeypatch.setattr(simwarp.heads, "EXPLAIN_BUDGET", 60)  # 2 queries per block
    idx, wt = head.explain(q, k=4)
    torch.testing.assert_close(wt, top.values)
    assert torch.equal(idx, top.indices)
    idx, wt = head.explain(q, k=100)
    assert idx.shape == (7, 30)
    torch.testing.assert_close(wt.sum(-1), torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["regression", "classification"])
@pytest.mark.parametrize("mode,step", [("global", "sigmoidal"), ("instance", "poly"), ("instance", "log"), ("global", "none"), ("global", "bump")])
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_explain_is_the_top_of_the_dense_weights(monkeypatch, kind, mode, step, metric):
    """explain streams for the built-in steps (top-k weights = top-k similarities) and falls
    back to dense weights for a user step (here non-monotone): both give the dense top-k."""
    simwarp.register_step("bump", lambda u, a, b, t: -((u - 0.5) ** 2) / t, overwrite=True)
    monkeypatch.setattr(simwarp.heads, "EXPLAIN_BUDGET", 60)  # key blocks of 4 in the streaming top-k
    gen = torch.Generator().manual_seed(7)
    bank = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    if kind == "regression":
        head = NeighborRegressionHead(5, 1, metric=metric, mode=mode, step=step).double()
        labels = torch.randn(40, generator=gen, dtype=torch.float64)
    else:
        head = NeighborClassificationHead(5, 3, metric=metric, mode=mode, step=step).double()
        labels = torch.randint(0, 3, (40,), generator=gen)
    _randomise(head)
    head.set_bank(bank, labels)
    q = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    kwargs = head._step_kwargs(q)
    w = simwarp.warp_weights(q, bank, metric=metric, scale=head.scale, temperature=head.temperature, **kwargs)
    want = torch.topk(w, 4, dim=-1)
    idx, wt = head.explain(q, k=4)
    torch.testing.assert_close(wt, want.values)
    torch.testing.assert_close(w.gather(-1, idx), wt)  # the indices hold those weights
    head.eval()
    assert head.explain(q[:0], k=4)[0].shape == (0, 4)


def test_explain_weights_stay_exact_at_large_logits():
    """|s|/τ ~ 1e7 in float32: weights normalised from two separately computed similarity sets
    (a streaming top-k rescaled by exp(lse_k - lse), tried and reverted) were off by factors up
    to e^8; explain's weights must be the dense weights."""
    torch.manual_seed(0)
    head = NeighborRegressionHead(5, 1, metric="sqeuclidean", step="sigmoidal", temperature=0.05)
    bank = torch.randn(40, 5) * 1e3
    head.set_bank(bank, torch.randn(40))
    z = torch.randn(9, 5) * 1e3
    idx, w = head.explain(z, k=3)
    dense = simwarp.warp_weights(z, bank, metric="sqeuclidean", temperature=0.05, **head._step_kwargs(z))
    torch.testing.assert_close(w, dense.topk(3, dim=-1).values)
    assert (w.sum(-1) <= 1 + 1e-6).all()


def test_large_bank_streams_through_chunked_backend():
    torch.manual_seed(0)
    bank_z, bank_y = torch.randn(3000, 8), torch.randn(3000, 1)
    head = NeighborRegressionHead(8, 1, mode="global", chunk_size=256).eval()
    head.set_bank(bank_z, bank_y)
    q = torch.randn(100, 8)  # 300k scores > DENSE_AUTO_LIMIT -> chunked
    out = head(q)
    head.impl = "dense"
    torch.testing.assert_close(out, head(q), rtol=1e-4, atol=1e-5)


def test_sparsity_statistics():
    z, y = _data(n=12)
    head = NeighborRegressionHead(5, 2, mode="global", init=(0.6, 0.9, 0.5)).double()
    assert head.sparsity == {}
    head(z, y)
    s = head.sparsity
    assert s["neighbours"] == 11
    assert 0 < s["kept_fraction_min"] <= s["kept_fraction"] <= s["kept_fraction_max"] < 1
    nona = NeighborRegressionHead(5, 2, step="none").double()
    nona(z, y)
    assert nona.sparsity["kept_fraction"] == 1.0
    head.eval().set_bank(z, y)
    queries = z[:3].clone()
    queries[1, 0] = math.nan  # a NaN query has no count: the statistics are over the others
    head(queries)
    assert all(math.isfinite(value) for value in head.sparsity.values())


def test_determinism_with_fixed_seed():
    def run():
        torch.manual_seed(123)
        enc = nn.Linear(4, 6)
        head = NeighborRegressionHead(6, 1)
        opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=1e-2)
        x, y = torch.randn(32, 4), torch.randn(32)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(head(enc(x), y), y).backward()
            opt.step()
        head.eval()
        head.set_bank(enc(x).detach(), y)
        return head(enc(x[:5])).detach()

    assert torch.equal(run(), run())


def test_training_reduces_loss_on_nonlinear_target():
    torch.manual_seed(0)
    x = torch.rand(128, 1) * 6.0
    y = torch.sin(2 * x).squeeze(-1)
    enc = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 4))
    head = NeighborRegressionHead(4, 1)
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=1e-2)
    losses = []
    for _ in range(60):
        perm = torch.randperm(128)[:64]
        opt.zero_grad()
        loss = F.mse_loss(head(enc(x[perm]), y[perm]), y[perm])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_fit_bank_with_loader_restores_encoder_mode():
    enc = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    enc.train()
    x, y = torch.randn(10, 3), torch.randn(10)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    head = NeighborRegressionHead(4, 1)
    head.fit_bank(enc, loader, progress=False)
    assert enc.training
    assert head.bank_size == 10
    enc.eval()
    torch.testing.assert_close(head.bank_z, enc(x).detach())
    with pytest.raises(ValueError, match="empty loader"):
        head.fit_bank(enc, [], progress=False)


def test_fit_bank_restores_each_submodule_mode():
    """A frozen BatchNorm in a training encoder (fine-tuning) stays in eval mode."""
    enc = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Dropout(0.5)))
    enc.train()
    enc[1].eval()
    enc[2].eval()
    before = [m.training for m in enc.modules()]
    x, y = torch.randn(10, 3), torch.randn(10)
    NeighborRegressionHead(4, 1).fit_bank(enc, [(x[:4], y[:4]), (x[4:], y[4:])], progress=False)
    assert [m.training for m in enc.modules()] == before == [True, True, False, False, False]


def test_fit_bank_without_encoder_names_non_tensor_batches():
    np = pytest.importorskip("numpy")
    head = NeighborRegressionHead(4)
    batches = [(np.zeros((5, 4), dtype=np.float32), np.zeros(5))]
    with pytest.raises(TypeError, match=r"without an encoder each batch's x .* must be a tensor, got ndarray"):
        head.fit_bank(None, batches, progress=False)

    class ToList(nn.Module):
        def forward(self, x):
            return x.tolist()

    with pytest.raises(TypeError, match="the encoder must return the embeddings z"):
        head.fit_bank(ToList(), [(torch.zeros(5, 4), torch.zeros(5))], progress=False)


def test_clear_errors():
    head = NeighborRegressionHead(4, 2)
    z = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="no bank"):
        head.eval()(z)
    head.train()
    with pytest.raises(ValueError, match="out_features=2"):
        head(z, torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"N=6"):
        head(z, torch.randn(5, 2))
    with pytest.raises(ValueError, match="NaN"):
        head(z, torch.tensor([[float("nan"), 0.0]] * 6))
    with pytest.raises(ValueError, match=r"N=6"):
        head.set_bank(z, torch.randn(7, 2))
    with pytest.raises(ValueError, match="NaN"):
        head.set_bank(z, torch.full((6, 2), float("nan")))
    with pytest.raises(ValueError, match="in_features=4"):
        head(torch.randn(6, 5), torch.randn(6, 2))
    with pytest.raises(ValueError, match="at least 2 rows"):
        head(torch.randn(1, 4), torch.randn(1, 2))
    with pytest.raises(ValueError, match="mode"):
        NeighborRegressionHead(4, mode="per_row")
    with pytest.raises(ValueError, match="out_features"):
        NeighborRegressionHead(4, 0)
    clf = NeighborClassificationHead(4, 3)
    with pytest.raises(ValueError, match="num_classes=3"):
        clf(z, torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        clf(z, torch.tensor([0.0, 1.0, float("nan"), 0.0, 1.0, 2.0]))


def test_one_dimensional_targets_keep_their_shape():
    head = NeighborRegressionHead(3, 1)
    z, y = torch.randn(8, 3), torch.randn(8)
    assert head(z, y).shape == (8,)
    head.set_bank(z, y)
    head.eval()
    assert head(z).shape == (8, 1)
    assert head(z, y).shape == (8,)
    lin = LinearHead(3, 1)
    assert lin(z, y).shape == (8,)
    assert lin(z).shape == (8, 1)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_heads_on_features_far_from_the_origin_match_scikit_learn(offset):
    """Raw float32 features far from the origin: the kNN head picked other neighbours than
    scikit-learn's KNeighborsRegressor (97 % of the rows at offset 1000) and the SoftStep head's
    prediction moved with the offset, as the distances were lost to cancellation."""
    neighbors = pytest.importorskip("sklearn.neighbors")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=gen)
    y = torch.sin(x.sum(-1, keepdim=True))
    q = torch.randn(60, 4, generator=gen)
    knn = KNNRegressionHead(4, 1, k=5).eval()
    knn.set_bank(x + offset, y)
    want = neighbors.KNeighborsRegressor(5).fit((x + offset).double().numpy(), y.double().numpy())
    torch.testing.assert_close(knn(q + offset).double(), torch.from_numpy(want.predict((q + offset).double().numpy())))
    head = NeighborRegressionHead(4, 1, mode="global", step="none").eval()
    head.set_bank(x + offset, y)
    centred = NeighborRegressionHead(4, 1, mode="global", step="none").eval()
    centred.set_bank(x, y)
    torch.testing.assert_close(head(q + offset), centred(q), atol=1e-4, rtol=0)


def test_knn_head_is_hard_topk_average():
    z, y = _data(n=10, d=3, e=1)
    head = KNNRegressionHead(3, 1, k=3)
    out = head(z, y)
    d = torch.cdist(z, z)
    d.fill_diagonal_(float("inf"))
    idx = d.topk(3, largest=False).indices
    torch.testing.assert_close(out, y[idx].mean(1))
    head.set_bank(z, y)
    head.eval()
    d = torch.cdist(z[:4], z)
    torch.testing.assert_close(head(z[:4]), y[d.topk(3, largest=False).indices].mean(1))


def test_knn_head_warns_when_it_is_trained_on():
    """A loss on the kNN head's output cannot reach the encoder: backward failed later with
    PyTorch's "does not require grad" and no word of the head; it now warns where it is called,
    and only then (embeddings without gradient are its documented use)."""
    import warnings

    z, y = _data(n=10, d=3, e=1)
    head = KNNRegressionHead(3, 1, k=3)
    with pytest.warns(UserWarning, match="no gradient with respect to z") as record:
        out = head(z.clone().requires_grad_(), y)
    assert record[0].filename == __file__  # the caller's line, not torch's Module.__call__
    assert not out.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head(z, y)
        with torch.no_grad():
            head(z.clone().requires_grad_(), y)


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2", "sqeuclidean", "l1"])
@pytest.mark.parametrize("budget", [6, 12, 1 << 22])  # key blocks of k = 4 (the narrowest), 6 and all 25 keys
def test_knn_head_ranks_like_the_metric(monkeypatch, metric, budget):
    monkeypatch.setattr(simwarp.heads, "KNN_ROWS", 2)
    monkeypatch.setattr(simwarp.heads, "EXPLAIN_BUDGET", budget)
    gen = torch.Generator().manual_seed(3)
    bank, bank_y = torch.randn(25, 6, generator=gen, dtype=torch.float64), torch.randn(25, 2, generator=gen, dtype=torch.float64)
    queries = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    head = KNNRegressionHead(6, 2, k=4, metric=metric).double().eval()
    head.set_bank(bank, bank_y)
    top = simwarp.pairwise_similarity(queries, bank, metric=metric).topk(4, dim=-1).indices
    torch.testing.assert_close(head(queries), bank_y[top].mean(1))
    head.train()  # leave-one-out over the batch: each row's own key may fall in any block
    s = simwarp.pairwise_similarity(bank, bank, metric=metric).fill_diagonal_(-math.inf)
    torch.testing.assert_close(head(bank, bank_y), bank_y[s.topk(4, dim=-1).indices].mean(1))


def test_make_head_kinds():
    for kind in simwarp.heads.HEAD_KINDS:
        h = make_head(kind, 4, 1)
        z, y = torch.randn(6, 4), torch.randn(6)
        assert h(z, y).shape == (6,)
    assert make_head("nona", 4).softstep is None
    for kind in ("mlp", None):  # (None: an AttributeError before)
        with pytest.raises(ValueError, match="kind must be one of"):
            make_head(kind, 4)
    # an argument the kind fixes: a message, not Python's "got multiple values for keyword argument"
    with pytest.raises(ValueError, match="kind='softstep-global' fixes mode"):
        make_head("softstep-global", 8, mode="instance")
    with pytest.raises(ValueError, match="kind='nona' fixes step"):
        make_head("nona", 8, step="poly")
    # arguments that contradict the kind were ignored (a NONA head built as "softstep-instance")
    with pytest.raises(ValueError, match="step='none' .* is kind='nona'"):
        make_head("softstep-instance", 8, step="none")
    with pytest.raises(ValueError, match="kind='nona' has no step, so no mode"):
        make_head("nona", 8, mode="global")


@pytest.mark.parametrize("standardize", [True, False])
def test_two_forwards_before_one_backward(standardize):
    # the running target statistics are updated in place by every training forward; the
    # graph of the first call must not depend on the buffers themselves
    head = NeighborRegressionHead(4, 1, standardize_targets=standardize)
    z = torch.randn(8, 4, requires_grad=True)
    y, y2 = torch.randn(8), torch.randn(8) * 5 + 3
    (head(z, y).sum() + head(z, y2).sum()).backward()
    assert torch.isfinite(z.grad).all()
    head.set_bank(z.detach(), y)
    head.eval()
    q = torch.randn(3, 4, requires_grad=True)
    head.train()
    (head.eval()(q).sum() + head.train()(z, y2).sum()).backward()
    assert torch.isfinite(q.grad).all()


def test_bank_embeddings_must_be_finite():
    head = NeighborRegressionHead(4)
    zb = torch.randn(5, 4)
    zb[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"z \(bank embeddings, shape \(5, 4\)\) has NaN or inf in 1 row"):
        head.set_bank(zb, torch.randn(5))
    zb[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        NeighborClassificationHead(4, 3).set_bank(zb, torch.tensor([0, 1, 2, 0, 1]))


def test_nan_queries_in_instance_mode_name_the_cause():
    head = NeighborRegressionHead(4, mode="instance")
    head.set_bank(torch.randn(6, 4), torch.randn(6))
    q = torch.randn(2, 4)
    q[0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN.*queries"):
        head.eval()(q)


@pytest.mark.parametrize("standardize", [True, False])
def test_predict_with_uncertainty_large_offset_does_not_cancel(standardize):
    g = torch.Generator().manual_seed(0)
    zb = torch.randn(40, 3, generator=g)
    yb = 1e4 + torch.randn(40, 1, generator=g)
    head = NeighborRegressionHead(3, mode="global", standardize_targets=standardize)
    head.set_bank(zb, yb)
    head.eval()
    q = torch.randn(4, 3, generator=g)
    mean, var = head.predict_with_uncertainty(q)
    head64 = NeighborRegressionHead(3, mode="global", standardize_targets=standardize).double()
    head64.load_state_dict(head.state_dict())
    head64.eval()
    mean64, var64 = head64.predict_with_uncertainty(q.double())
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(var.double(), var64, rtol=1e-3, atol=1e-4)


def test_predict_with_uncertainty_half_precision_queries_do_not_overflow():
    g = torch.Generator().manual_seed(0)
    zb = torch.randn(30, 3, generator=g)
    yb = 1000 + 300 * zb[:, :1].sign() + 100 * torch.randn(30, 1, generator=g)  # std² > fp16 max > local var
    head = NeighborRegressionHead(3, mode="global", temperature=0.2)
    head.set_bank(zb, yb)
    head.eval()
    q = torch.randn(3, 3, generator=g)
    mean16, var16 = head.predict_with_uncertainty(q.half())
    mean32, var32 = head.predict_with_uncertainty(q)
    assert head.target_std.item() ** 2 > torch.finfo(torch.float16).max > var32.max() > 1e3
    assert torch.isfinite(var16).all()
    torch.testing.assert_close(var16.float(), var32, rtol=2e-2, atol=1.0)
    torch.testing.assert_close(mean16.float(), mean32, rtol=2e-3, atol=1.0)


def test_load_state_dict_rejects_a_bank_of_another_configuration():
    src = KNNRegressionHead(4, 1)
    src.set_bank(torch.randn(5, 4), torch.randn(5))
    with pytest.raises(RuntimeError, match=r"bank_y has shape \(5, 1\), the head expects \(M, 2\)"):
        KNNRegressionHead(4, 2).load_state_dict(src.state_dict())
    glob = NeighborRegressionHead(4, mode="global")
    glob.set_bank(torch.randn(5, 4), torch.randn(5))
    with pytest.raises(RuntimeError, match=r"bank_z has shape \(5, 4\).*in_features=5"):
        NeighborRegressionHead(5, mode="global").load_state_dict(glob.state_dict())
    clf = NeighborClassificationHead(4, 5, mode="global")
    clf.set_bank(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(RuntimeError, match=r"labels in \[0, 4\], outside \[0, num_classes=3\)"):
        NeighborClassificationHead(4, 3, mode="global").load_state_dict(clf.state_dict())
    fresh = NeighborClassificationHead(4, 5, mode="global")  # a bank of another size is data: fine
    fresh.load_state_dict(clf.state_dict())
    assert fresh.bank_size == 5


def test_eval_mode_checks_the_shape_of_y():
    z = torch.randn(5, 4)
    reg = NeighborRegressionHead(4)
    reg.set_bank(torch.randn(6, 4), torch.randn(6))
    reg.eval()
    assert reg(z, torch.randn(5)).shape == (5,)
    with pytest.raises(ValueError, match=r"N=5"):
        reg(z, torch.randn(3))
    knn = KNNRegressionHead(4, 1, k=2)
    knn.set_bank(torch.randn(6, 4), torch.randn(6))
    with pytest.raises(ValueError, match=r"N=5"):
        knn.eval()(z, torch.randn(3))
    clf = NeighborClassificationHead(4, 3)
    clf.set_bank(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match=r"N=5"):
        clf.eval()(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="5 rows"):
        LinearHead(4, 1)(z, torch.randn(3))


def test_constructor_arguments():
    np = pytest.importorskip("numpy")
    head = NeighborRegressionHead(np.int64(4), np.int64(2))
    assert (head.in_features, head.out_features) == (4, 2) and type(head.in_features) is int
    assert KNNRegressionHead(np.int32(3), k=np.int64(2)).k == 2
    with pytest.raises(ValueError, match="impl must be one of"):
        NeighborRegressionHead(4, impl="fast")
    with pytest.raises(ValueError, match="temperature must be a positive finite float"):
        NeighborRegressionHead(4, temperature=float("inf"))
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        NeighborRegressionHead(True)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        NeighborClassificationHead(4, 1)
    with pytest.raises(ValueError, match="inf labels"):
        NeighborClassificationHead(4, 3)(torch.randn(3, 4), torch.tensor([0.0, float("inf"), 1.0]))


def test_instance_head_accepts_queries_of_another_float_dtype():
    head = NeighborRegressionHead(4)  # float32 parameters
    z, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    out = head(z, y)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="step_params needs z"):
        head.step_params()


def test_half_precision_head_keeps_float32_target_statistics():
    head = NeighborRegressionHead(4).half()
    assert head.target_mean.dtype == head._target_m2.dtype == torch.float32
    assert head.bank_z.dtype == torch.float16
    y = (1000 + 300 * torch.randn(200)).half()  # Σ y² ≈ 2e8: inf in float16
    head.set_bank(torch.randn(200, 4).half(), y)
    assert torch.isfinite(head.target_std).all() and 250 < head.target_std.item() < 350
    fresh = NeighborRegressionHead(4).half()
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh.target_std, head.target_std)
    half_state = {k: v.half() if v.is_floating_point() else v for k, v in head.state_dict().items()}
    assigned = NeighborRegressionHead(4)
    assigned.load_state_dict(half_state, assign=True)
    assert assigned.target_mean.dtype == assigned._target_m2.dtype == torch.float32


def test_partial_state_dicts_and_lenient_y():
    head = NeighborRegressionHead(4, 1)
    z = torch.randn(5, 4)
    result = head.load_state_dict({"bank_z": z}, strict=False)  # a bank_z alone still loads
    assert head.bank_z.shape == (5, 4) and "bank_y" in result.missing_keys
    with pytest.raises(RuntimeError, match="different numbers of entries"):
        NeighborRegressionHead(4, 1).load_state_dict({"bank_z": z, "bank_y": torch.randn(3, 1)}, strict=False)
    head.set_bank(z, torch.randn(5))
    head.eval()
    np = pytest.importorskip("numpy")
    assert head(torch.randn(2, 4), np.zeros(2)).shape == (2, 1)  # non-tensor y: ignored, as documented
    lin = LinearHead(4, 1)
    assert lin(torch.randn(3, 4), torch.tensor(0.0)).shape == (3, 1)
    assert lin(torch.randn(3, 4), torch.zeros(3)).shape == (3,)


def test_one_row_training_batches_point_to_drop_last_in_every_head():
    z, y = torch.randn(1, 4), torch.randn(1)
    for head in (NeighborRegressionHead(4), KNNRegressionHead(4)):
        with pytest.raises(ValueError, match="drop_last=True"):
            head(z, y)


def test_linear_head_is_interchangeable_with_the_neighbour_heads():
    """It took any number of targets (a later mse_loss broadcast the mismatch away) and had no
    has_bank / bank_size, which code written for the neighbour heads reads."""
    z = torch.randn(6, 4)
    for head in (LinearHead(4, 1), NeighborRegressionHead(4, 1)):
        with pytest.raises(ValueError, match="y has 3 targets but the head has out_features=1"):
            head(z, torch.randn(6, 3))
    assert LinearHead(4, 2)(z, torch.randn(6, 2)).shape == (6, 2)
    with pytest.raises(ValueError, match="one target per row; the head has out_features=6"):
        LinearHead(4, 6)(z, torch.randn(6))  # (6, 6) predictions against (6,) targets: mse_loss broadcast
    assert LinearHead(4, 1).has_bank is False and LinearHead(4, 1).bank_size == 0
    assert repr(KNNRegressionHead(4, k=3)) == "KNNRegressionHead(in_features=4, out_features=1, k=3, metric='l2', bank=0)"


def test_linear_classification_head_swaps_with_the_neighbour_classifier():
    """LinearHead is a regression baseline: class-index labels were refused ("one target per
    row") and its logits are not the log-probabilities NeighborClassificationHead's nll_loss
    expects. LinearClassificationHead takes the same labels, loss and predict_proba."""
    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(24, 4, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    linear = LinearClassificationHead(4, 3)
    assert repr(linear) == "LinearClassificationHead(in_features=4, num_classes=3, bias=True)"
    for head in (NeighborClassificationHead(4, 3), linear):
        head.set_bank(z, y)  # (a no-op for the linear head)
        out = head(z, y)
        assert out.shape == (24, 3) and out.dtype == torch.float32
        F.nll_loss(out, y).backward()
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(24))
        with pytest.raises(ValueError, match=r"y labels must lie in \[0, num_classes=3\), got range \[3, 3\]"):
            head(z, torch.full((24,), 3))
        with pytest.raises(ValueError, match=r"y must have shape \(N=24,\) of class indices, got \(24, 3\)"):
            head(z, torch.zeros(24, 3))
        head.eval()
        with pytest.raises(ValueError, match=r"y must have shape \(N=24,\) of class indices"):
            head(z, torch.zeros(24, 1))
        torch.testing.assert_close(head.predict_proba(z), head(z).exp())
    torch.testing.assert_close(linear(z), torch.log_softmax(z @ linear.weight.T + linear.bias, -1))
    assert linear.has_bank is False and linear.bank_size == 0
    assert LinearClassificationHead(4, 3).to(torch.float16)(z.half()).dtype == torch.float32  # as the neighbour head
    with pytest.raises(ValueError, match="num_classes must be"):
        LinearClassificationHead(4, 1)


def test_label_type_errors_name_the_argument():
    z = torch.randn(6, 4)
    with pytest.raises(ValueError, match="y must hold class labels: floating-point labels must be whole numbers"):
        NeighborClassificationHead(4, 3)(z, torch.tensor([0.5, 1, 2, 0, 1, 2]))  # as the losses say
    with pytest.raises(TypeError, match="y must hold real targets, got dtype torch.complex64"):
        NeighborRegressionHead(4)(z, torch.randn(6, dtype=torch.cfloat))
    with pytest.raises(TypeError, match="smoothing must be a float in"):
        NeighborClassificationHead(4, 3, smoothing="a")


def test_a_bank_loaded_without_its_other_half_is_refused_before_use():
    src = NeighborRegressionHead(4, 2).eval()
    src.set_bank(torch.randn(30, 4), torch.randn(30, 2))
    state = src.state_dict()
    head = NeighborRegressionHead(4, 2).eval()
    head.load_state_dict({k: v for k, v in state.items() if k != "bank_y"}, strict=False)
    message = r"NeighborRegressionHead: bank_z \(30, 4\) and bank_y \(0, 2\) hold different numbers of entries"
    for call in (head, head.predict_with_uncertainty, head.explain):
        with pytest.raises(ValueError, match=message):
            call(torch.randn(3, 4))
    clf = NeighborClassificationHead(4, 3).eval()
    clf.load_state_dict({"bank_y": torch.tensor([0, 1, 2])}, strict=False)  # labels without embeddings
    with pytest.raises(ValueError, match=r"bank_z \(0, 4\) and bank_y \(3,\)"):
        clf(torch.randn(2, 4))
    knn = KNNRegressionHead(4, 2).eval()
    knn.load_state_dict({"bank_z": state["bank_z"]}, strict=False)
    with pytest.raises(ValueError, match=r"KNNRegressionHead: bank_z \(30, 4\) and bank_y \(0, 2\)"):
        knn(torch.randn(2, 4))
    head.set_bank(torch.randn(5, 4), torch.randn(5, 2))  # a new bank mends it
    assert head(torch.randn(3, 4)).shape == (3, 2)


def test_loading_a_state_dict_keeps_the_heads_bank_dtype():
    src = NeighborRegressionHead(4, 2, mode="global").double().eval()
    src.set_bank(torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64))
    head = NeighborRegressionHead(4, 2, mode="global").eval()
    head.load_state_dict(src.state_dict())  # like the parameters: cast to the head's float32
    assert head.bank_z.dtype == head.bank_y.dtype == next(head.parameters()).dtype == torch.float32
    assert head.bank_size == 10
    q = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(head(q.float()), src(q).float())
    wide = NeighborRegressionHead(4, 2, mode="global").double()
    wide.load_state_dict(head.state_dict())
    assert wide.bank_z.dtype == wide.bank_y.dtype == torch.float64
    clf = NeighborClassificationHead(4, 3)
    clf.load_state_dict({"bank_z": torch.randn(3, 4, dtype=torch.float64), "bank_y": torch.tensor([0, 2, 1], dtype=torch.int32)},
                        strict=False)
    assert clf.bank_z.dtype == torch.float32 and clf.bank_y.dtype == torch.long


def test_heads_train_under_autocast():
    encoder = nn.Linear(6, 4)
    for head in (NeighborRegressionHead(4), NeighborClassificationHead(4, 3)):
        x = torch.randn(16, 6)
        y = torch.randn(16) if isinstance(head, NeighborRegressionHead) else torch.randint(0, 3, (16,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(encoder(x), y)
        loss = F.mse_loss(out.float(), y) if y.is_floating_point() else F.nll_loss(out.float(), y)
        loss.backward()
        assert torch.isfinite(encoder.weight.grad).all()


def test_fit_bank_takes_dict_batches_and_warns_on_drop_last():
    class DictEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 4)

        def forward(self, features, scale):
            return self.linear(features) * scale

    rows = [{"features": torch.randn(5, 3), "scale": torch.ones(5, 1), "labels": torch.randn(5)} for _ in range(3)]
    head = NeighborRegressionHead(4)
    encoder = DictEncoder()
    head.fit_bank(encoder, rows, device="cpu", progress=False)
    assert head.bank_size == 15
    with torch.no_grad():
        want = torch.cat([encoder(r["features"], r["scale"]) for r in rows])
    torch.testing.assert_close(head.bank_z, want)
    with pytest.raises(KeyError, match="label_key='target'"):
        head.fit_bank(encoder, rows, progress=False, label_key="target")
    data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.randn(10))
    with pytest.warns(UserWarning, match="drop_last"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, batch_size=4, drop_last=True), progress=False)
    assert head.bank_size == 8
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(10)), 3, drop_last=True)
    with pytest.warns(UserWarning, match="drop_last"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, batch_sampler=sampler), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped: no warning
        head.fit_bank(None, torch.utils.data.DataLoader(data, batch_size=5, drop_last=True), progress=False)
    assert head.bank_size == 10


def test_explain_with_a_bank_of_another_dtype():
    head = NeighborRegressionHead(4, mode="global")
    head.set_bank(torch.randn(12, 4).bfloat16(), torch.randn(12))
    idx, w = head.explain(torch.randn(3, 4), k=2)
    assert idx.shape == w.shape == (3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx2, _ = head.explain(torch.randn(3, 4), k=2)
    assert idx2.shape == (3, 2)


@pytest.mark.fullgraph
def test_training_forward_traces_without_graph_breaks():
    # no host read-backs on the training path: torch.compile keeps one graph
    head = NeighborRegressionHead(8, mode="global")
    explanation = torch._dynamo.explain(head)(torch.randn(32, 8), torch.randn(32))
    assert explanation.graph_break_count == 0, [str(b.reason)[:120] for b in explanation.break_reasons]
    assert int(head.targets_seen) == 32


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_learn_scale_is_a_learned_factor_on_the_embeddings(metric):
    torch.manual_seed(0)
    z, y, zb, yb = torch.randn(6, 4), torch.randn(6), torch.randn(20, 4), torch.randn(20)
    head = NeighborRegressionHead(4, 1, metric=metric, mode="global", learn_scale=True)
    plain = NeighborRegressionHead(4, 1, metric=metric, mode="global")
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if k != "log_scale"})
    assert "log_scale" in head.state_dict() and "log_scale" not in plain.state_dict()
    with torch.no_grad():
        head.log_scale.fill_(0.7)
    factor = math.exp(0.7)
    out = head(z, y)  # training: leave-one-out in the batch
    torch.testing.assert_close(out, plain(z * factor, y))
    out.sum().backward()
    assert head.log_scale.grad is not None and float(head.log_scale.grad) != 0.0
    head.eval()
    plain.eval()
    head.set_bank(zb, yb)
    plain.set_bank(zb * factor, yb)
    torch.testing.assert_close(head(z), plain(z * factor))
    for got, want in zip(head.explain(z, 3), plain.explain(z * factor, 3)):
        torch.testing.assert_close(got, want)
    assert "learn_scale=True" in repr(head)
    with pytest.raises(ValueError, match="cosine"):
        NeighborRegressionHead(4, 1, metric="cosine", learn_scale=True)
    classifier = NeighborClassificationHead(4, 3, learn_scale=True)
    classifier(z, torch.tensor([0, 1, 2, 0, 1, 2])).sum().backward()
    assert classifier.log_scale.grad is not None


# ----------------------------------------------------------------------------- audit (session 13)


def test_cosine_heads_give_nan_for_nan_embeddings_instead_of_hiding_them():
    """unit_rows took a NaN norm for a zero row: a NaN query got a finite prediction, and in
    training the loss looked finite while the encoder's gradients were NaN."""
    head = NeighborRegressionHead(4, metric="cosine", mode="global").eval()
    head.set_bank(torch.randn(50, 4), torch.randn(50))
    q = torch.randn(3, 4)
    q[0, 0] = math.nan
    out = head(q)
    assert out[0].isnan().all() and torch.isfinite(out[1:]).all()
    z, y = torch.randn(8, 4), torch.randn(8)
    z[3, 1] = math.nan
    assert head.train()(z, y).isnan().any()


def test_knn_head_never_picks_nan_rows_and_gives_nan_for_nan_queries():
    """torch.topk ranks NaN first: one NaN row was every row's nearest neighbour."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(100, 4, generator=g), torch.randn(100, generator=g)
    z[5, 0] = math.nan
    head = KNNRegressionHead(4, k=3)
    clean = torch.ones(100, dtype=torch.bool)
    clean[5] = False
    got = head.train()(z, y)
    want = KNNRegressionHead(4, k=3).train()(z[clean], y[clean])
    assert got[5].isnan()
    neighbours = simwarp.heads.streaming_topk(z, z, "l2", 3, exclude_self=True)
    assert not (neighbours[clean] == 5).any()
    assert torch.isfinite(got[clean]).all() and got[clean].shape == want.shape


def test_knn_head_explains_its_neighbours_like_the_softstep_heads(monkeypatch):
    g = torch.Generator().manual_seed(0)
    bank, y, q = torch.randn(30, 4, generator=g), torch.randn(30, generator=g), torch.randn(5, 4, generator=g)
    head = KNNRegressionHead(4, k=3).eval()
    head.set_bank(bank, y)
    idx, w = head.explain(q, k=5)
    assert idx.shape == w.shape == (5, 5)
    torch.testing.assert_close(idx, torch.cdist(q, bank).topk(5, largest=False).indices)  # nearest first
    assert torch.equal(w[:, :3], torch.full((5, 3), 1 / 3)) and torch.equal(w[:, 3:], torch.zeros(5, 2))
    torch.testing.assert_close((w[:, :, None] * head.bank_y[idx]).sum(1), head(q))
    assert head.explain(q, k=100)[0].shape == (5, 30)
    q[1, 0] = math.inf
    assert head.explain(q)[1][1].isnan().all()
    # ties (duplicated entries with different labels) in key blocks as wide as k (a search for
    # 7 breaks them otherwise than one for 3): explain names the entries the prediction averages
    monkeypatch.setattr(simwarp.heads, "EXPLAIN_BUDGET", 1)
    head.set_bank(bank[:10].repeat(3, 1), torch.randn(30, generator=g))
    q = bank[:5] + 0.01
    for k in (2, 3, 7):
        idx, w = head.explain(q, k=k)
        assert all(row.unique().numel() == k for row in idx)  # k distinct entries
        if k >= 3:
            torch.testing.assert_close((w[:, :, None] * head.bank_y[idx]).sum(1), head(q))


def test_knn_head_gives_nan_for_infinite_queries():
    """An inf feature made every score NaN, then -inf: the kNN head picked arbitrary rows."""
    head = KNNRegressionHead(2, k=2).eval()
    head.set_bank(torch.randn(10, 2), torch.arange(10.0))
    out = head(torch.tensor([[math.inf, 0.0], [math.nan, 0.0], [-math.inf, 0.0], [0.0, 0.0]]))
    assert out[:3].isnan().all() and torch.isfinite(out[3]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_knn_head_ranks_half_precision_embeddings_in_float32(dtype):
    """Half-precision embeddings were ranked in their own precision: with embeddings offset
    from 0 (l2's norms dominate the GEMM form) every bf16 prediction picked other neighbours
    than the same values ranked in float32."""
    g = torch.Generator().manual_seed(0)
    bank, queries = ((torch.randn(n, 16, generator=g) + 10).to(dtype) for n in (2000, 200))
    head = KNNRegressionHead(16, k=5).eval()
    head.set_bank(bank, torch.randn(2000, generator=g))
    assert torch.equal(head(queries), head(queries.float()))


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_type", [NeighborRegressionHead, KNNRegressionHead])
def test_a_head_cast_to_half_keeps_its_bank_labels(head_type, cast):
    """.half() cast bank_y with the rest: prices of 1e5 became inf, predictions NaN (inf for
    the kNN head), silently. The labels now stay float32, from their values before the cast."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(64, 4, generator=g), 5e4 + 1e5 * torch.rand(64, 1, generator=g)
    head = head_type(4).eval()
    head.set_bank(z, y)
    want = head(z[:3])
    state = head.state_dict()
    head.to(cast)
    assert head.bank_z.dtype == cast and head.bank_y.dtype == torch.float32
    torch.testing.assert_close(head.bank_y, y)  # not a round trip through float16
    torch.testing.assert_close(head(z[:3].to(cast)), want, rtol=2e-2, atol=0)
    loaded = head_type(4).eval().to(cast)
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.bank_y, y)
    torch.testing.assert_close(loaded(z[:3].to(cast)), want, rtol=2e-2, atol=0)


@pytest.mark.parametrize("head_type", ["softstep", "knn"])
def test_float16_embeddings_with_targets_beyond_float16_range(head_type):
    """The labels were cast to the embeddings' float16 before standardisation: 2e5 became inf
    and every prediction NaN (inf for the kNN head)."""
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(64, 8, generator=g).half().float(), 2e5 + 5e4 * torch.randn(64, generator=g)  # same z in both
    make = (lambda: NeighborRegressionHead(8, mode="global")) if head_type == "softstep" else (lambda: KNNRegressionHead(8, k=5))
    head16, head32 = make(), make()
    out16, out32 = head16(z.half(), y), head32(z, y)
    assert out16.dtype == torch.float32 and torch.isfinite(out16).all()
    torch.testing.assert_close(out16, out32, rtol=2e-2, atol=0)
    head16.eval().set_bank(z.half(), y)
    head32.eval().set_bank(z, y)
    torch.testing.assert_close(head16(z[:5].half()), head32(z[:5]), rtol=2e-2, atol=0)
    if head_type == "softstep":
        mean, var = head16.predict_with_uncertainty(z[:5].half())
        assert mean.dtype == var.dtype == torch.float32 and torch.isfinite(var).all()


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_float16_head_trains_on_targets_in_the_thousands(mode):
    """The in-batch average ran in float16, and the gradient reaching it (the loss's times the
    targets' std, ~1e5 here) overflowed: every gradient of z and the step network was NaN,
    although the true gradients fit float16."""
    torch.manual_seed(0)
    head32 = NeighborRegressionHead(8, mode=mode)
    head16 = copy.deepcopy(head32).half()
    z, y = torch.randn(32, 8).half(), 1000 * torch.randn(32)
    grads = {}
    for head, x in ((head16, z.clone()), (head32, z.float())):
        x.requires_grad_()
        F.mse_loss(head(x, y), y).backward()
        grads[head] = [x.grad.float(), *(p.grad.float() for p in head.parameters())]
    for g16, g32 in zip(grads[head16], grads[head32]):
        assert torch.isfinite(g16).all()
        torch.testing.assert_close(g16, g32, rtol=2e-2, atol=2e-3 * g32.abs().max().item())


def test_classification_head_in_float16_with_many_classes_keeps_log_probs_finite():
    """ε / C underflowed float16 above ~3400 classes: -inf log-probabilities, NaN gradients."""
    head = NeighborClassificationHead(8, 5000, mode="global").half()
    z = torch.randn(64, 8, dtype=torch.float16, requires_grad=True)
    logp = head(z, torch.randint(0, 5000, (64,)))
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
    F.nll_loss(logp, torch.randint(0, 5000, (64,))).backward()
    assert torch.isfinite(z.grad).all()


def test_fit_bank_takes_any_callable_encoder():
    model = nn.Linear(3, 4)
    x, y = torch.randn(10, 3), torch.randn(10)
    head = NeighborRegressionHead(4, 1)
    head.fit_bank(lambda batch: model(batch) * 2.0, [(x[:6], y[:6]), (x[6:], y[6:])], progress=False)
    torch.testing.assert_close(head.bank_z, model(x).detach() * 2.0)


def test_fit_bank_runs_the_module_of_a_method_encoder_in_eval_mode():
    """fit_bank(model.encode, ...): only module encoders were switched to eval, so the bank of
    a method encoder was drawn with dropout on (94 of 100 rows held dropout zeros)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5))

        def encode(self, x):
            return self.net(x)

    model = Model().train()
    x, y = torch.randn(100, 6), torch.randn(100)
    head = NeighborRegressionHead(4).eval()
    head.fit_bank(model.encode, [(x, y)], progress=False)
    assert model.training  # restored
    torch.testing.assert_close(head.bank_z, model.eval().encode(x))


def test_fit_bank_warns_on_a_shuffling_loader_and_names_single_sample_batches():
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randn(12))
    head = NeighborRegressionHead(4).eval()
    with pytest.warns(UserWarning, match="shuffles"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, batch_size=4, shuffle=True), progress=False)
    shard = torch.utils.data.distributed.DistributedSampler(data, num_replicas=2, rank=0)  # shuffle=True by default
    with pytest.warns(UserWarning, match="shuffles"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, batch_size=4, sampler=shard), progress=False)
    batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data), batch_size=4, drop_last=False)
    with pytest.warns(UserWarning, match="shuffles"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, batch_sampler=batches), progress=False)
    with pytest.raises(ValueError, match=r"each batch must hold rows.*shape \(4,\).*batch_size=None"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, batch_size=None), progress=False)
    # random samplers other than RandomSampler went unnoticed (a reused training loader)
    with pytest.warns(UserWarning, match=r"SubsetRandomSampler\) shuffles"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, 4, sampler=torch.utils.data.SubsetRandomSampler(range(12))),
                      progress=False)
    weighted = torch.utils.data.WeightedRandomSampler(torch.ones(12), 12)
    with pytest.warns(UserWarning, match="with replacement, so the bank repeats some rows and misses others"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, 4, sampler=weighted), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head.fit_bank(None, torch.utils.data.DataLoader(data, 4), progress=False)  # sequential: nothing to say
        even = torch.utils.data.distributed.DistributedSampler(data, num_replicas=3, rank=0, shuffle=False)
        head.fit_bank(None, torch.utils.data.DataLoader(data, 4, sampler=even), progress=False)  # 12 rows: no padding
    # the fixed-order DistributedSampler that the shuffle warning used to suggest pads 11 rows to
    # 12 with a repeat of the first: the union of the shards held it twice, without a word
    eleven = torch.utils.data.Subset(data, range(11))
    padding = torch.utils.data.distributed.DistributedSampler(eleven, num_replicas=2, rank=1, shuffle=False)
    with pytest.warns(UserWarning, match=r"pads the data set's 11 rows to 12 with repeats") as record:
        head.fit_bank(None, torch.utils.data.DataLoader(eleven, 4, sampler=padding), progress=False)
    assert record[0].filename == __file__  # the caller's line, not torch.no_grad's wrapper
    dropping = torch.utils.data.distributed.DistributedSampler(eleven, num_replicas=2, rank=0, shuffle=False, drop_last=True)
    with pytest.warns(UserWarning, match=r"drops the last 1 of the data set's 11 rows"):
        head.fit_bank(None, torch.utils.data.DataLoader(eleven, 4, sampler=dropping), progress=False)


def test_a_bank_set_in_inference_mode_serves_predictions_with_gradients():
    torch.manual_seed(0)
    encoder, head = nn.Linear(3, 4), NeighborRegressionHead(4).eval()
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10))
    with torch.inference_mode():
        head.fit_bank(encoder, torch.utils.data.DataLoader(data, 5), progress=False)
    assert not head.bank_z.is_inference() and not head.bank_y.is_inference()
    head(encoder(torch.randn(2, 3))).sum().backward()  # "Inference tensors cannot be saved for backward"
    assert encoder.weight.grad is not None


def test_knn_l1_blocks_are_sized_by_the_differences_they_hold(monkeypatch):
    """l1 scores materialise (rows, keys, d) differences: the key blocks were sized as if each
    score were one number (8 GiB for a 20 000-entry bank at d = 256)."""
    import simwarp.heads as heads

    seen = []
    original = heads.PreparedKeys.scores
    monkeypatch.setattr(heads.PreparedKeys, "scores", lambda self, q, a=0, b=None: seen.append((q.shape[0], min(b, self.keys.shape[0]) - a)) or original(self, q, a, b))
    q, keys = torch.randn(300, 64), torch.randn(5000, 64)
    heads.streaming_topk(q, keys, "l1", 3)
    assert max(rows * width * 64 for rows, width in seen) <= heads.EXPLAIN_BUDGET
    want = torch.cdist(q, keys, p=1).topk(3, largest=False).indices
    torch.testing.assert_close(heads.streaming_topk(q, keys, "l1", 3).sort(-1).values, want.sort(-1).values)


def test_constructors_check_backend_options_and_accept_numpy_and_tensor_reals():
    """Bad impl / chunk_size / scale and l1 with the chunked path failed only at the first
    forward (a loss only once a batch outgrew the dense path); numpy and 0-d tensor
    temperatures were refused; strings became True flags."""
    np = pytest.importorskip("numpy")
    assert NeighborRegressionHead(4, temperature=np.float32(0.5)).temperature == 0.5
    assert NeighborRegressionHead(4, temperature=torch.tensor(0.5)).temperature == 0.5
    bad = [
        (dict(impl="fast"), ValueError, "impl must be one of"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(scale=-1.0), ValueError, "scale must be a positive finite float"),
        (dict(metric="l1", impl="chunked"), ValueError, "only available with impl='dense'"),
        (dict(standardize_targets="no"), TypeError, "standardize_targets must be a bool"),
        # refused by the first forward before: values the backend cannot take
        (dict(temperature=1e-40), ValueError, "temperature must be at least"),
        (dict(scale=torch.tensor(2.0, requires_grad=True)), TypeError, "scale must be a positive finite float"),
        (dict(step="none", mode="bogus"), ValueError, "mode must be one of"),
        (dict(mode="none"), ValueError, "mode must be one of"),  # only a step="none" head reports mode "none"
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            NeighborRegressionHead(4, **kwargs)
    assert NeighborRegressionHead(4, scale=torch.tensor(2.0)).scale == 2.0  # a float, as the backend takes it
    nona = NeighborRegressionHead(4, step="none")
    assert NeighborRegressionHead(4, step="none", mode=nona.mode).mode == "none"  # its own reported mode
    huge = NeighborRegressionHead(4, 1, scale=1e39, mode="global")  # fine for float64 embeddings ...
    z = torch.randn(6, 4)
    assert torch.isfinite(huge.double()(z.double(), torch.randn(6, 1, dtype=torch.float64))).all()
    with pytest.raises(ValueError, match="scale must be between .* for torch.float32"):  # ... not for float32
        huge.float()(z, torch.randn(6, 1))
    for cls, kwargs, error, match in [
        (simwarp.SoftStepNCALoss, dict(impl="fast"), ValueError, "impl must be one of"),
        (simwarp.SoftStepNCALoss, dict(chunk_size=-5), ValueError, "chunk_size must be a positive int"),
        (simwarp.SoftStepNCALoss, dict(detach_range="no"), TypeError, "detach_range must be a bool"),
        (simwarp.SoftStepNCALoss, dict(softmax_scale=1e39), ValueError, "softmax_scale must be between"),
        # (a finite float32 whose double is not: the squared distance's GEMM overflowed in forward)
        (simwarp.SoftStepNCALoss, dict(softmax_scale=2e38), ValueError, "softmax_scale must be between"),
        (simwarp.SoftStepNCALoss, dict(softmax_scale=1e-40), ValueError, "softmax_scale must be between"),
        (simwarp.SoftStepContrastiveLoss, dict(temperature=1e-40), ValueError, "temperature must be at least"),
    ]:
        with pytest.raises(error, match=match):
            cls(**kwargs)


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_classification_bank_with_many_classes_is_weighed_block_by_block(monkeypatch, mode):
    """Above ONE_HOT_CLASSES the bank's class masses come from warp_weights per block of
    queries, added to each entry's class (the one-hot bank was M × C values per call): the same
    log-probabilities, gradients and sparsity as the one-hot path."""
    import simwarp.heads as heads

    g = torch.Generator().manual_seed(4)
    head = NeighborClassificationHead(6, 100, mode=mode).double()
    head.eval().set_bank(torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randint(0, 100, (50,), generator=g))
    monkeypatch.setattr(heads, "EXPLAIN_BUDGET", 50 * 3)  # blocks of 3 queries
    results = []
    for limit in (1000, 64):  # the one-hot path, then blocks
        monkeypatch.setattr(heads, "ONE_HOT_CLASSES", limit)
        z = torch.randn(7, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
        out = head(z)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 100, dtype=torch.float64)).sum(), (z, *head.parameters()))
        results.append((out, grads, head.sparsity))
    (out1, g1, s1), (out2, g2, s2) = results
    torch.testing.assert_close(out2, out1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)
    assert s1 == pytest.approx(s2)


def test_predict_with_uncertainty_checks_z_as_forward_does():
    head = NeighborRegressionHead(4).eval()
    head.set_bank(torch.randn(10, 4), torch.randn(10))
    with pytest.raises(TypeError, match="z must be a torch.Tensor, got ndarray"):
        head.predict_with_uncertainty(torch.zeros(2, 4).numpy())


def test_classification_training_leaves_each_row_out():
    """In training each row's class masses come from the *other* rows of the batch."""
    g = torch.Generator().manual_seed(0)
    head = NeighborClassificationHead(4, 3, mode="global").double().train()
    z = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    a, b, t = head.softstep()
    w = simwarp.warp_weights(z, z, metric="l2", a=a, b=b, t=t, exclude_self=True)
    eps = head.smoothing
    want = torch.log((1 - eps) * (w @ F.one_hot(y, 3).double()) + eps / 3)
    torch.testing.assert_close(head(z, y), want)


def test_target_statistics_edge_cases():
    """A constant target keeps std 1 (its rounding spread is no scale); without
    standardisation the uncertainty's mean is still the prediction; an empty bank is refused."""
    z = torch.randn(3, 4, dtype=torch.float64)
    head = NeighborRegressionHead(4, 1).double()
    head.set_bank(z, torch.full((3, 1), 0.1, dtype=torch.float64))
    assert head.target_std.eq(1).all()
    raw = NeighborRegressionHead(4, 1, standardize_targets=False).double().eval()
    raw.set_bank(torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64) + 100)
    with torch.no_grad():
        torch.testing.assert_close(raw.predict_with_uncertainty(z)[0], raw(z))
    with pytest.raises(ValueError, match=r"at least one entry, got z of shape \(0, 4\)"):  # (a literal "(0, D)" before)
        head.set_bank(torch.zeros(0, 4), torch.zeros(0, 1))


def test_reset_parameters_and_running_statistics_details():
    head = NeighborRegressionHead(4, learn_scale=True)
    with torch.no_grad():
        head.log_scale.fill_(1.0)
    head.reset_parameters()
    assert head.log_scale.item() == 0.0
    # a spread far above the constant-target floor is the std, whatever the mean
    y = 1000 + 0.5 * torch.randn(200, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wide = NeighborRegressionHead(4).double()
    wide.set_bank(torch.randn(200, 4, dtype=torch.float64), y)
    torch.testing.assert_close(wide.target_std, y.std(0, unbiased=False), rtol=1e-4, atol=0)


def test_bad_inputs_found_by_an_audit_raise_errors_that_name_them():
    head = NeighborRegressionHead(4).eval()
    data = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.randn(6))
    with pytest.raises(TypeError, match="encoder must be callable"):
        head.fit_bank(5, torch.utils.data.DataLoader(data, 3), progress=False)
    with pytest.raises(TypeError, match="loader must be an iterable of batches"):
        head.fit_bank(None, None, progress=False)
    with pytest.raises(ValueError, match=r"batch 2 has z of shape \(2, 4\) and labels of shape \(2, 1\), batch 1"):
        head.fit_bank(None, [(torch.randn(2, 4), torch.randn(2)), (torch.randn(2, 4), torch.randn(2, 1))], progress=False)
    with pytest.raises(TypeError, match="progress must be a bool"):
        head.fit_bank(None, torch.utils.data.DataLoader(data, 3), progress="no")
    with pytest.raises(TypeError, match="z must be a floating-point tensor, got dtype torch.int64"):
        LinearHead(4, 1)(torch.ones(2, 4, dtype=torch.long))
    import numpy as np

    assert NeighborRegressionHead(4, gather=np.False_)(torch.randn(3, 4), torch.randn(3)).shape == (3,)
    assert NeighborRegressionHead(4, gather=0)(torch.randn(3, 4), torch.randn(3)).shape == (3,)
    with pytest.raises(TypeError, match="gather must be a bool or a torch.distributed.ProcessGroup, got str"):
        NeighborRegressionHead(4, gather="x")
    cls = NeighborClassificationHead(4, 3)
    with pytest.raises(TypeError, match="must hold integer class labels, got dtype torch.complex64"):
        cls(torch.randn(4, 4), torch.zeros(4, dtype=torch.complex64))
