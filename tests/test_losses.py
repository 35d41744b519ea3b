"""simwarp.losses: exact agreement with PML's NCALoss / NTXentLoss at step="none" (values and
gradients), SoftStep losses against a dense float64 reference built from warp_weights, the
blocked (many classes) and streaming paths, PML integration, degenerate batches, errors."""

import math

import pytest
import torch
from pytorch_metric_learning import distances as D
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners, reducers, regularizers
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

import simwarp
import simwarp.losses as sl
from simwarp.losses import SoftStepContrastiveLoss, SoftStepNCALoss, SoftStepNeighborRegressionLoss

f64 = torch.float64

DISTANCES = {
    "default": None,
    "lp1": lambda: D.LpDistance(power=1),
    "lp2_raw": lambda: D.LpDistance(normalize_embeddings=False, power=2),
    "cosine": lambda: D.CosineSimilarity(),
    "dot_raw": lambda: D.DotProductSimilarity(normalize_embeddings=False),
    "dot_norm": lambda: D.DotProductSimilarity(),
}


def _kw(name):
    return {} if DISTANCES[name] is None else {"distance": DISTANCES[name]()}


def _pair(ours, ref, x, *args, **kwargs):
    """Loss values and embedding gradients of two losses on the same inputs."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = ours(xa, *args, **kwargs), ref(xb, *args, **kwargs)
    ga = torch.autograd.grad(la, xa, allow_unused=True)[0]
    gb = torch.autograd.grad(lb, xb, allow_unused=True)[0]
    ga = torch.zeros_like(x) if ga is None else ga
    gb = torch.zeros_like(x) if gb is None else gb
    return la.detach(), lb.detach(), ga, gb


def _close(la, lb, ga, gb, tol):
    assert torch.isfinite(la) and torch.isfinite(ga).all()
    torch.testing.assert_close(la, lb, atol=tol, rtol=tol)
    torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------
# Exactness against PML (step="none")
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("n_classes", [3, 150])  # 150 > MAX_CLASS_COLUMNS: the blocked path
def test_nca_matches_pml(dist, n_classes):
    n = 160 if n_classes > 100 else 48
    x = torch.randn(n, 8, dtype=f64)
    y = torch.randint(0, n_classes, (n,))
    ours, ref = SoftStepNCALoss(0.7, step="none", **_kw(dist)), pml_losses.NCALoss(0.7, **_kw(dist))
    _close(*_pair(ours, ref, x, y), tol=1e-10)


@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("n_classes", [3, 150])
def test_ntxent_matches_pml(dist, n_classes):
    n = 160 if n_classes > 100 else 48
    x = torch.randn(n, 8, dtype=f64)
    y = torch.randint(0, n_classes, (n,))
    ours, ref = SoftStepContrastiveLoss(0.3, step="none", **_kw(dist)), pml_losses.NTXentLoss(0.3, **_kw(dist))
    _close(*_pair(ours, ref, x, y), tol=1e-8)


@pytest.mark.parametrize("dist", ["default", "cosine", "dot_norm"])
def test_float32_matches_pml_to_1e6(dist):
    x = torch.randn(64, 16)
    y = torch.randint(0, 5, (64,))
    for ours, ref in (
        (SoftStepNCALoss(2.0, step="none", **_kw(dist)), pml_losses.NCALoss(2.0, **_kw(dist))),
        (SoftStepContrastiveLoss(0.1, step="none", **_kw(dist)), pml_losses.NTXentLoss(0.1, **_kw(dist))),
    ):
        la, lb, ga, gb = _pair(ours, ref, x, y)
        assert abs(float(la - lb)) <= 1e-6 * max(1.0, abs(float(lb)))
        assert float((ga - gb).abs().max()) <= 1e-6


@pytest.mark.parametrize(
    "miner",
    [lambda: miners.TripletMarginMiner(margin=0.5), lambda: miners.MultiSimilarityMiner(), lambda: miners.PairMarginMiner()],
)
def test_miner_indices_match_pml(miner):
    x = torch.randn(24, 8, dtype=f64)
    y = torch.randint(0, 4, (24,))
    it = miner()(x, y)
    for ours, ref in (
        (SoftStepNCALoss(step="none"), pml_losses.NCALoss()),
        (SoftStepContrastiveLoss(step="none"), pml_losses.NTXentLoss()),
    ):
        _close(*_pair(ours, ref, x, y, it), tol=1e-8)


def test_indices_tuple_must_hold_integer_indices():
    """Float (or bool) index tensors raised torch's IndexError from inside the loss."""
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    a, p, n = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([4, 5]))
    for bad in (a.float(), a.bool()):
        with pytest.raises(TypeError, match="indices_tuple entries must be integer index tensors"):
            SoftStepContrastiveLoss()(x, y, (bad, p, n))
    SoftStepContrastiveLoss()(x, y, (a.int(), p, n))


def test_indices_tuple_without_labels_matches_pml():
    x = torch.randn(16, 6, dtype=f64)
    y = torch.randint(0, 3, (16,))
    it = miners.TripletMarginMiner(margin=1.0, type_of_triplets="all")(x, y)
    _close(*_pair(SoftStepContrastiveLoss(step="none"), pml_losses.NTXentLoss(), x, None, it), tol=1e-8)


def test_ref_emb_matches_pml():
    x, r = torch.randn(20, 8, dtype=f64), torch.randn(35, 8, dtype=f64)
    y, ry = torch.randint(0, 4, (20,)), torch.randint(0, 4, (35,))
    for ours, ref in (
        (SoftStepNCALoss(step="none"), pml_losses.NCALoss()),
        (SoftStepContrastiveLoss(step="none"), pml_losses.NTXentLoss()),
    ):
        _close(*_pair(ours, ref, x, y, None, r, ry), tol=1e-10)


@pytest.mark.parametrize(
    "reducer", [lambda: reducers.SumReducer(), lambda: reducers.AvgNonZeroReducer(), lambda: reducers.ThresholdReducer(low=0.5)]
)
def test_reducers_and_regularizer_match_pml(reducer):
    x = torch.randn(32, 8, dtype=f64)
    y = torch.randint(0, 4, (32,))
    extra = {"embedding_regularizer": regularizers.LpRegularizer(), "embedding_reg_weight": 0.1}
    for ours, ref in (
        (SoftStepNCALoss(step="none", reducer=reducer(), **extra), pml_losses.NCALoss(reducer=reducer(), **extra)),
        (
            SoftStepContrastiveLoss(step="none", reducer=reducer(), **extra),
            pml_losses.NTXentLoss(reducer=reducer(), **extra),
        ),
    ):
        _close(*_pair(ours, ref, x, y), tol=1e-8)


@pytest.mark.parametrize("n_classes", [2, 40])  # few: the class-match matrix; many: the gather
def test_own_class_mass(n_classes):
    gen = torch.Generator().manual_seed(n_classes)
    w = torch.rand(30, 50, generator=gen, dtype=f64, requires_grad=True)
    q_cls = torch.randint(0, n_classes + 3, (30,), generator=gen)  # some anchors' classes have no reference
    r_cls = torch.randint(0, n_classes, (50,), generator=gen)
    same = q_cls[:, None] == r_cls[None, :]
    want_own, want_other = (w * same).sum(1), (w * ~same).sum(1)
    got_own, got_other = (sl._class_mass(w, q_cls, r_cls, own=own) for own in (True, False))
    columns = sl._own_class_columns(q_cls, r_cls)
    if columns is not None:  # the gathered form used when only the own-class mass is wanted
        torch.testing.assert_close((w.gather(1, columns[0]) * columns[1]).sum(1), want_own, rtol=1e-12, atol=0)
    for got, want in ((got_own, want_own), (got_other, want_other)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        seed = torch.randn(30, generator=gen, dtype=f64)
        grads = (torch.autograd.grad(y, w, seed)[0] for y in (got, want))
        torch.testing.assert_close(*grads, rtol=0, atol=0)


def test_other_class_mass_does_not_cancel():
    # two views of each image: the own class holds all but ~e^-40 of each row's weight, and the
    # negatives' mass must still be resolved (it was w.sum(1) - own, i.e. 0, before)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 32, generator=gen)
    x = torch.cat([base, base + 0.02 * torch.randn(16, 32, generator=gen)])
    y = torch.arange(4).repeat_interleave(4).repeat(2)
    for temperature in (0.07, 0.03, 0.02):
        pml = pml_losses.NTXentLoss(temperature, reducer=reducers.DoNothingReducer())(x.double(), y)["loss"]["losses"]
        for impl in ("dense", "chunked"):
            ours = SoftStepContrastiveLoss(temperature, step="none", impl=impl, reducer=reducers.DoNothingReducer())(x, y)
            torch.testing.assert_close(ours["loss"]["losses"].double(), pml, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("step", ["sigmoidal", "log", "none"])
@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_unresolved_masses_give_no_nan_gradient(step, impl):
    # a large softmax_scale puts some anchors' own-class mass below float32's normal range
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(8, 4, generator=gen, requires_grad=True)
        y = torch.randint(0, 3, (8,), generator=gen)
        loss_fn = SoftStepNCALoss(64.0, step=step, impl=impl)
        loss = loss_fn(x, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        for p in loss_fn.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
    # a mass below the floor is dropped on every path alike
    x = torch.tensor([[0.0], [1.0], [10.0], [10.5]])
    y = torch.tensor([0, 1, 0, 1])
    losses = [
        SoftStepNCALoss(10.0, step=step, impl=i, distance=D.LpDistance(power=2, normalize_embeddings=False))(x, y)
        for i in ("dense", "chunked")
    ]
    assert losses[0].item() == losses[1].item() == 0.0


def test_labels_and_scalar_arguments():
    np = pytest.importorskip("numpy")
    x, y = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    for loss_fn in (SoftStepNCALoss(), SoftStepContrastiveLoss()):
        torch.testing.assert_close(loss_fn(x, y.bool()), loss_fn(x, y))
        with pytest.raises(ValueError, match=r"labels must have shape \(10,\).*got \(4,\)"):
            loss_fn(x, y[:4])
        with pytest.raises(TypeError, match="must share a dtype"):
            loss_fn(x, y, ref_emb=x.double(), ref_labels=y)
    assert SoftStepNCALoss(np.float32(0.5)).softmax_scale == 0.5
    assert SoftStepContrastiveLoss(torch.tensor(0.25)).temperature == 0.25
    for bad in (float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be a positive finite float"):
            SoftStepContrastiveLoss(bad)
    for bad in (True, "0.1"):
        with pytest.raises(TypeError, match="temperature must be a positive finite float, got (bool|str)"):
            SoftStepContrastiveLoss(bad)
    with pytest.raises(ValueError, match="mode='instance' needs embedding_size"):
        SoftStepNCALoss(mode="instance")
    with pytest.raises(ValueError, match=r"1-D index tensors, got a tensor of shape \(1, 1\)"):
        SoftStepContrastiveLoss()(x, y, (torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[2]])))
    half = x.bfloat16()
    for impl in ("dense", "chunked"):
        assert SoftStepNCALoss(impl=impl)(half, y).dtype == torch.bfloat16


def test_chunked_backend_matches_pml():
    x = torch.randn(96, 8, dtype=f64)
    y = torch.randint(0, 6, (96,))
    opts = {"step": "none", "impl": "chunked", "chunk_size": 17}
    _close(*_pair(SoftStepNCALoss(**opts), pml_losses.NCALoss(), x, y), tol=1e-10)
    _close(*_pair(SoftStepContrastiveLoss(**opts), pml_losses.NTXentLoss(), x, y), tol=1e-8)


# ---------------------------------------------------------------------------------------
# SoftStep (sigmoidal) against a dense float64 reference from warp_weights
# ---------------------------------------------------------------------------------------


def _dense_reference(kind, x, y, step, params, metric="sqeuclidean", scale=1.0, temperature=1.0):
    a, b, t = params
    xn = torch.nn.functional.normalize(x, dim=1) if metric == "sqeuclidean" else x
    w, stats = simwarp.warp_weights(
        xn, xn, metric=metric, scale=scale, temperature=temperature, step=step, a=a, b=b, t=t,
        exclude_self=True, return_stats=True,
    )
    same = y[:, None] == y[None, :]
    if kind == "nca":
        own = (w * same).sum(1)
        keep = own > 0
        return -torch.log(own[keep]).mean()
    eye = torch.eye(len(y), dtype=torch.bool)
    neg = (w * ~same).sum(1)
    pos_a, pos_p = torch.where(same & ~eye)
    s = simwarp.pairwise_similarity(xn, xn, metric=metric, scale=1.0) / temperature
    neg_lse = stats.lse + torch.log(neg)
    return torch.nn.functional.softplus(neg_lse[pos_a] - s[pos_a, pos_p]).mean()


@pytest.mark.parametrize("many_classes", [False, True])
def test_softstep_nca_matches_dense_reference(many_classes, monkeypatch):
    if many_classes:
        monkeypatch.setattr(sl, "MAX_CLASS_COLUMNS", 2)
    x = torch.randn(40, 6, dtype=f64)
    y = torch.randint(0, 5, (40,))
    loss = SoftStepNCALoss(3.0, init=(0.2, 0.7, 0.4)).double()
    params = tuple(loss.softstep())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = loss(xa, y)
    lb = _dense_reference("nca", xb, y, "sigmoidal", params, scale=3.0)
    ga = torch.autograd.grad(la, [xa, loss.softstep.raw])
    gb = torch.autograd.grad(lb, [xb, loss.softstep.raw])
    torch.testing.assert_close(la, lb, atol=1e-12, rtol=1e-12)
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("many_classes", [False, True])
def test_softstep_contrastive_matches_dense_reference(many_classes, monkeypatch):
    if many_classes:
        monkeypatch.setattr(sl, "MAX_CLASS_COLUMNS", 2)
    x = torch.randn(30, 6, dtype=f64)
    y = torch.randint(0, 4, (30,))
    loss = SoftStepContrastiveLoss(0.2, init=(0.3, 0.8, 0.3)).double()
    params = tuple(loss.softstep())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = loss(xa, y)
    lb = _dense_reference("ntxent", xb, y, "sigmoidal", params, metric="cosine", temperature=0.2)
    ga = torch.autograd.grad(la, [xa, loss.softstep.raw])
    gb = torch.autograd.grad(lb, [xb, loss.softstep.raw])
    torch.testing.assert_close(la, lb, atol=1e-12, rtol=1e-12)
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)


def test_contrastive_tuple_path_equals_label_path_with_softstep():
    # All pairs from labels given as an indices_tuple take the dense path; same loss and gradients.
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    x = torch.randn(24, 5, dtype=f64)
    y = torch.randint(0, 3, (24,))
    loss = SoftStepContrastiveLoss(0.5, init=(0.25, 0.75, 0.5)).double()
    it = lmu.get_all_pairs_indices(y)
    la, lb, ga, gb = _pair(loss, loss, x, y)
    xa = x.clone().requires_grad_()
    lt = loss(xa, y, it)
    gt = torch.autograd.grad(lt, xa)[0]
    torch.testing.assert_close(lt.detach(), la, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gt, ga, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("miner", ["BatchHardMiner", "BatchEasyHardMiner", "TripletMarginMiner"])
def test_contrastive_mined_pairs_are_warped_on_the_whole_rows_range(miner):
    """The range was taken over the mined candidates alone: with one positive and one negative
    per anchor every negative sat at u = 0 or 1, so BatchEasyHardMiner gave a zero loss and
    BatchHardMiner a step that never learned. The miner now only selects the pairs."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 6, generator=g, dtype=f64)
    y = torch.randint(0, 4, (32,), generator=g)
    tuple_ = getattr(miners, miner)()(x, y)
    loss = SoftStepContrastiveLoss(0.2, init=(0.3, 0.8, 0.3)).double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = loss(xa, y, tuple_)

    a1, p, a2, neg = lmu.convert_to_pairs(tuple_, y)
    xn = torch.nn.functional.normalize(xb, dim=1)
    a, b, t = loss.softstep()
    w, stats = simwarp.warp_weights(xn, xn, scale=1.0, temperature=0.2, a=a, b=b, t=t, exclude_self=True, return_stats=True)
    neg_count = torch.zeros(32, 32, dtype=f64).index_put_((a2, neg), torch.ones(len(a2), dtype=f64), accumulate=True)
    mass = (w * neg_count).sum(1)  # 0 where the step dropped an anchor's mined negatives
    neg_lse = stats.lse + torch.where(mass > 0, torch.log(torch.where(mass > 0, mass, 1.0)), -math.inf)
    lb = torch.nn.functional.softplus(neg_lse[a1] - (xn[a1] * xn[p]).sum(1) / 0.2).mean()
    torch.testing.assert_close(la, lb, atol=1e-12, rtol=1e-12)
    ga = torch.autograd.grad(la, [xa, loss.softstep.raw])
    gb = torch.autograd.grad(lb, [xb, loss.softstep.raw])
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)
    assert la > 0  # a training signal, for the step too (BatchHard's negatives often sit at u = 1)
    assert miner == "BatchHardMiner" or ga[1].abs().min() > 0


def test_contrastive_mined_pairs_far_below_the_rows_best_key_do_not_underflow():
    """The whole row's weights of mined negatives 87·τ below its best key underflow in float32:
    their mass became 0 and the loss and gradient 0. They are now summed in log space
    (warp_weights(log=True)); step="none" equals PML's NTXentLoss there too."""
    angles = torch.tensor([0.0, 1.0, 120.0, 125.0]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], 1)
    y = torch.tensor([0, 0, 0, 1])
    pairs = (torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([0, 1]), torch.tensor([3, 3]))
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = SoftStepContrastiveLoss(0.01, step="none")(ours, y, pairs)
    want = pml_losses.NTXentLoss(0.01)(theirs, y, pairs)
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-4) and got.item() > 1e-4
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-3, atol=1e-5)  # float32: PML rounds too



@pytest.mark.parametrize("cls", [SoftStepNCALoss, SoftStepContrastiveLoss, SoftStepNeighborRegressionLoss])
def test_gradcheck_instance_mode(cls):
    x = torch.randn(8, 3, dtype=f64, requires_grad=True)
    loss = cls(mode="instance", embedding_size=3, init=(0.2, 0.8, 0.5)).double()
    with torch.no_grad():
        loss.softstep.net.weight.normal_(0, 0.3)
    y = torch.randint(0, 3, (8,)) if cls is not SoftStepNeighborRegressionLoss else torch.randn(8, 2, dtype=f64)
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,), atol=1e-6)
    out = loss(x, y)
    out.backward()
    assert loss.softstep.net.weight.grad is not None and loss.softstep.net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("distance", [D.CosineSimilarity(), D.LpDistance(normalize_embeddings=True)])
@pytest.mark.parametrize("cls", [SoftStepNCALoss, SoftStepContrastiveLoss])
def test_instance_mode_reads_the_normalised_embeddings(cls, distance):
    """The instance network sees the embeddings after the distance's normalisation (docs), so a
    loss whose similarities ignore the embeddings' scale ignores it in instance mode too."""
    x = torch.randn(32, 8, dtype=f64)
    y = torch.randint(0, 4, (32,))
    loss = cls(mode="instance", embedding_size=8, distance=distance).double()
    with torch.no_grad():
        for p in loss.softstep.parameters():
            p.add_(0.5 * torch.randn_like(p))
        torch.testing.assert_close(loss(10 * x, y), loss(x, y), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["global", "instance"])
@pytest.mark.parametrize("distance", [D.LpDistance(power=2), D.LpDistance(), D.CosineSimilarity()])
@pytest.mark.parametrize("cls", [SoftStepNCALoss, SoftStepContrastiveLoss])
def test_a_zero_embedding_gets_gradient_zero(cls, distance, mode, dtype):
    """A zero embedding (padding, a dead ReLU) has no direction: the normalising distances give
    it gradient 0, as the backend's cosine does. PML's ``F.normalize`` gave it ``1 / eps`` (1e12,
    inf in float16) under ``normalize_embeddings``, the default."""
    torch.manual_seed(0)
    x = torch.randn(16, 6, dtype=dtype)
    x[3] = 0.0
    x.requires_grad_()
    y = torch.arange(16) % 4
    loss = cls(mode=mode, embedding_size=6, distance=distance) if mode == "instance" else cls(distance=distance)
    (g,) = torch.autograd.grad(loss(x, y), x)
    assert torch.isfinite(g).all() and g.abs().max() < 1e3
    assert g[3].abs().max() == 0.0


@pytest.mark.parametrize("limit", [100, 40 * 40])
def test_regression_loss_materialises_up_to_the_loss_limit(monkeypatch, limit):
    """"auto" takes the dense backend up to LOSS_DENSE_LIMIT pairs (faster than streaming on
    CPU at batch 4096) and streams beyond; same loss and gradients."""
    import simwarp.losses as sl

    monkeypatch.setattr(sl, "LOSS_DENSE_LIMIT", limit)
    calls = []
    original = sl.warp_attend
    monkeypatch.setattr(sl, "warp_attend", lambda *a, **k: calls.append(k["impl"]) or original(*a, **k))
    x, y = torch.randn(40, 6, dtype=f64), torch.randn(40, 2, dtype=f64)
    la, lb, ga, gb = _pair(SoftStepNeighborRegressionLoss(impl="auto"), SoftStepNeighborRegressionLoss(impl="chunked"), x, y)
    assert calls == ["dense" if limit >= 40 * 40 else "auto", "chunked"]
    torch.testing.assert_close(la, lb, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ga, gb, atol=1e-10, rtol=1e-8)


def test_nca_dense_materialises_beyond_the_auto_limit(monkeypatch):
    """impl="dense" takes the weight-matrix path at any size; "auto" streams past the limit;
    both give the same loss and gradients."""
    import simwarp.losses as sl

    monkeypatch.setattr(sl, "LOSS_DENSE_LIMIT", 100)
    calls = []
    original = sl.warp_weights
    monkeypatch.setattr(sl, "warp_weights", lambda *a, **k: calls.append(k["impl"]) or original(*a, **k))
    x = torch.randn(40, 6, dtype=f64)
    y = torch.randint(0, 5, (40,))
    la, lb, ga, gb = _pair(SoftStepNCALoss(impl="dense"), SoftStepNCALoss(impl="auto"), x, y)
    assert calls == ["dense"]
    torch.testing.assert_close(la, lb, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ga, gb, atol=1e-10, rtol=1e-8)


def test_streaming_equals_dense_at_larger_batch():
    x = torch.randn(240, 16)
    y = torch.randint(0, 90, (240,))
    for cls in (SoftStepNCALoss, SoftStepContrastiveLoss):
        dense, chunked = cls(impl="dense"), cls(impl="chunked", chunk_size=128)
        la, lb, ga, gb = _pair(dense, chunked, x, y)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Neighbour regression
# ---------------------------------------------------------------------------------------


def test_regression_loss_is_leave_one_out_mse():
    x = torch.randn(20, 5, dtype=f64)
    y = torch.randn(20, 3, dtype=f64)
    loss = SoftStepNeighborRegressionLoss(2.0, distance=D.LpDistance(power=1), init=(0.1, 0.6, 0.5)).double()
    a, b, t = loss.softstep()
    xn = torch.nn.functional.normalize(x, dim=1)
    pred = simwarp.warp_attend(xn, xn, y, metric="l2", scale=2.0, a=a, b=b, t=t, exclude_self=True, impl="dense")
    torch.testing.assert_close(loss(x, y), (pred - y).pow(2).mean(), atol=1e-12, rtol=1e-12)
    y1 = y[:, 0]
    torch.testing.assert_close(loss(x, y1), (pred[:, 0] - y1).pow(2).mean(), atol=1e-12, rtol=1e-12)
    r, ry = torch.randn(7, 5, dtype=f64), torch.randn(7, 3, dtype=f64)
    rn = torch.nn.functional.normalize(r, dim=1)
    pred_r = simwarp.warp_attend(xn, rn, ry, metric="l2", scale=2.0, a=a, b=b, t=t)
    torch.testing.assert_close(loss(x, y, ref_emb=r, ref_labels=ry), (pred_r - y).pow(2).mean())


def test_regression_loss_trains_softstep_and_embeddings():
    torch.manual_seed(1)
    x = torch.randn(64, 4)
    y = x[:, :1] * 2 + 0.1 * torch.randn(64, 1)
    net = torch.nn.Linear(4, 4)
    loss_fn = SoftStepNeighborRegressionLoss(5.0, distance=D.LpDistance(normalize_embeddings=False))
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=0.05)
    first = None
    raw0 = loss_fn.softstep.raw.detach().clone()
    for _ in range(40):
        opt.zero_grad()
        value = loss_fn(net(x), y)
        first = float(value.detach()) if first is None else first
        value.backward()
        opt.step()
    assert float(value.detach()) < 0.7 * first
    assert not torch.equal(raw0, loss_fn.softstep.raw.detach())


# ---------------------------------------------------------------------------------------
# Degenerate batches: defined, never NaN
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SoftStepNCALoss, SoftStepContrastiveLoss])
@pytest.mark.parametrize(
    "case",
    ["single_class", "single_sample", "all_unique", "some_without_positive", "empty_miner", "duplicates"],
)
def test_degenerate_batches_are_finite(cls, case):
    n = 1 if case == "single_sample" else 12
    x = torch.randn(n, 6, requires_grad=True)
    if case == "duplicates":
        x = torch.randn(1, 6).repeat(n, 1).requires_grad_()
    y = {
        "single_class": torch.zeros(n, dtype=torch.long),
        "single_sample": torch.zeros(1, dtype=torch.long),
        "all_unique": torch.arange(n),
        "some_without_positive": torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5, 5, 6, 7]),
        "empty_miner": torch.randint(0, 3, (n,)),
        "duplicates": torch.randint(0, 3, (n,)),
    }[case]
    it = None
    if case == "empty_miner":
        e = torch.empty(0, dtype=torch.long)
        it = (e, e, e)
    for step in ("sigmoidal", "none"):
        value = cls(step=step)(x, y, it)
        (g,) = torch.autograd.grad(value, x)
        assert torch.isfinite(value) and torch.isfinite(g).all(), (case, step)
        if case in ("single_sample", "all_unique") or (case == "single_class" and cls is SoftStepContrastiveLoss):
            assert float(value.detach()) == 0.0


@pytest.mark.parametrize(("cls", "n"), [(SoftStepNCALoss, 1), (SoftStepContrastiveLoss, 1), (SoftStepContrastiveLoss, 4)])
def test_a_zero_loss_is_zero_whatever_the_embeddings_hold(cls, n):
    """A batch without pairs to score has loss 0, linked to the embeddings' graph; the link was
    ``x.sum() * 0``, NaN for an inf embedding. (A loss that scores an inf embedding is NaN.)"""
    x = torch.randn(n, 3)
    x[0, 0] = float("inf")
    x.requires_grad_()
    value = cls(distance=D.DotProductSimilarity(normalize_embeddings=False))(x, torch.arange(n))
    (g,) = torch.autograd.grad(value, x)
    assert float(value) == 0.0 and torch.equal(g, torch.zeros_like(x))


@pytest.mark.parametrize("cls", [SoftStepNCALoss, SoftStepContrastiveLoss, SoftStepNeighborRegressionLoss])
@pytest.mark.parametrize("dtype", [torch.float16, f64])
def test_a_zero_loss_comes_in_the_losses_dtype(cls, dtype):
    """Without anything that requires grad to connect it to, the zero was PML's, float32 (for
    float64 embeddings too); the losses come in the embeddings' dtype (the regression loss's in
    float32 for half embeddings, as its nonzero losses)."""
    want = torch.float32 if cls is SoftStepNeighborRegressionLoss and dtype == torch.float16 else dtype
    for n, step in ((0, "none"), (1, "none"), (1, "sigmoidal")):
        x = torch.randn(n, 4).to(dtype)
        y = torch.randn(n) if cls is SoftStepNeighborRegressionLoss else torch.zeros(n, dtype=torch.long)
        assert cls(step=step)(x, y).dtype == want, (n, step)
    y = torch.randn(6) if cls is SoftStepNeighborRegressionLoss else torch.tensor([0, 0, 1, 1, 2, 2])
    assert cls()(torch.randn(6, 4).to(dtype), y).dtype == want  # (a nonzero loss, for comparison)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: float32, as the nonzero losses
        one = torch.randn(1, 4, dtype=torch.bfloat16)
        assert cls()(one, torch.randn(1) if cls is SoftStepNeighborRegressionLoss else torch.zeros(1, dtype=torch.long)).dtype == torch.float32
        assert cls()(torch.randn(6, 4, dtype=torch.bfloat16), y).dtype == torch.float32


def test_anchors_without_positives_contribute_nothing():
    x = torch.randn(10, 4, dtype=f64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5, 6])
    keep = torch.arange(5)  # anchors 5..9 have no positive
    for step in ("none", "sigmoidal"):
        loss = SoftStepNCALoss(step=step, reducer=reducers.DoNothingReducer()).double()
        out = loss(x, y)["loss"]
        assert set(out["indices"].tolist()) <= set(keep.tolist())
        assert torch.isfinite(out["losses"]).all()


def test_regression_degenerate():
    x = torch.randn(1, 3, requires_grad=True)
    value = SoftStepNeighborRegressionLoss()(x, torch.randn(1))
    assert float(value.detach()) == 0.0 and torch.isfinite(torch.autograd.grad(value, x)[0]).all()


def test_regression_loss_refuses_non_finite_targets():
    # it returned NaN; the heads raise ValueError for the same targets
    x = torch.randn(6, 4)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="labels contains NaN or inf targets"):
            SoftStepNeighborRegressionLoss()(x, torch.tensor([bad, 0.0, 1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="ref_labels contains NaN or inf targets"):
        SoftStepNeighborRegressionLoss()(x, torch.zeros(6, 2), ref_emb=torch.randn(3, 4),
                                          ref_labels=torch.tensor([[0.0, 1.0], [float("-inf"), 0.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match=r"e >= 1 .* got \(6, 0\)"):  # it returned a NaN loss
        SoftStepNeighborRegressionLoss()(x.requires_grad_(), torch.randn(6, 0))
    # finite float64 targets that overflow the embeddings' float32 gave a NaN loss
    with pytest.raises(ValueError, match="labels overflow torch.float32, the embeddings' dtype"):
        SoftStepNeighborRegressionLoss()(x, torch.randn(6, dtype=torch.float64) * 1e300)
    # representable targets whose squared errors overflow gave an inf loss and non-finite gradients
    with pytest.raises(ValueError, match=r"squared errors overflow torch.float32.*\(spread 4e\+20\)"):
        SoftStepNeighborRegressionLoss()(x, torch.tensor([-2e20, 2e20, 0.0, 1.0, 2.0, 3.0]))


def test_regression_loss_of_half_embeddings_computes_its_errors_in_float32():
    # an error of 256 overflows float16: targets with a spread of a few hundred gave an inf loss
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y = torch.randn(32) * 200
    want = SoftStepNeighborRegressionLoss()(x, y)
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype).requires_grad_()
        got = SoftStepNeighborRegressionLoss()(xh, y)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        torch.testing.assert_close(got, want, rtol=0.05, atol=0)
        got.backward()
        assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()


def test_ref_labels_without_ref_emb_are_refused_by_every_loss():
    x, y = torch.randn(6, 4), torch.arange(6) % 2
    for loss in (SoftStepNCALoss(), SoftStepContrastiveLoss()):
        with pytest.raises(ValueError, match="ref_labels were given without ref_emb"):
            loss(x, y, ref_labels=y)
    with pytest.raises(ValueError, match="ref_emb and ref_labels must be given together"):
        SoftStepNeighborRegressionLoss()(x, y.float(), ref_labels=y.float())


# ---------------------------------------------------------------------------------------
# PML integration and errors
# ---------------------------------------------------------------------------------------


def test_distributed_wrapper_outside_distributed_run():
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.randint(0, 3, (16,))
    loss = SoftStepNCALoss()
    with pytest.warns(UserWarning):
        value = DistributedLossWrapper(loss)(x, y)
    torch.testing.assert_close(value, loss(x, y))


def test_loss_parameters_reach_optimiser():
    loss = SoftStepContrastiveLoss(mode="instance", embedding_size=8, hidden=4)
    names = [n for n, _ in loss.named_parameters()]
    assert names and all(n.startswith("softstep.") for n in names)


def test_errors():
    x = torch.randn(6, 4)
    with pytest.raises(TypeError, match="distance must be one of"):
        SoftStepNCALoss(distance=D.SNRDistance())
    with pytest.raises(ValueError, match="p=1"):
        SoftStepNCALoss(distance=D.LpDistance(p=1))
    with pytest.raises(ValueError, match="power"):
        SoftStepContrastiveLoss(distance=D.LpDistance(power=3))
    with pytest.raises(ValueError, match="softmax_scale"):
        SoftStepNCALoss(softmax_scale=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        SoftStepContrastiveLoss(temperature=0)
    with pytest.raises(ValueError, match="mode"):
        SoftStepNCALoss(mode="per_head")
    with pytest.raises(ValueError, match="labels"):
        SoftStepNCALoss()(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels are required"):
        SoftStepNCALoss()(x)
    with pytest.raises(TypeError, match="integer class labels"):
        SoftStepContrastiveLoss()(x, torch.zeros(6, dtype=torch.complex64))
    # float labels holding whole numbers are class labels, as pytorch-metric-learning takes them
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for loss_fn in (SoftStepContrastiveLoss(), SoftStepNCALoss()):
        torch.testing.assert_close(loss_fn(x, y.double()), loss_fn(x, y))
        with pytest.raises(ValueError, match="floating-point labels must be whole numbers"):
            loss_fn(x, y + 0.5)
    with pytest.raises(ValueError, match="embedding_size"):
        SoftStepNCALoss()(x, torch.zeros(6, dtype=torch.long), ref_emb=torch.randn(3, 5), ref_labels=torch.zeros(3))
    with pytest.raises(ValueError, match="in_features"):
        SoftStepNCALoss(mode="instance", embedding_size=3)(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        e = torch.tensor([0, 9])
        SoftStepContrastiveLoss()(x, torch.zeros(6, dtype=torch.long), (e, e, e))
    with pytest.raises(ValueError, match=r"\(6,\) or \(6, e\)"):
        SoftStepNeighborRegressionLoss()(x, torch.randn(5, 2))
    with pytest.raises(ValueError, match="together"):
        SoftStepNeighborRegressionLoss()(x, torch.randn(6), ref_emb=torch.randn(3, 4))


def test_half_precision_streaming_losses_match_float32():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (300,), generator=gen)
    x = torch.randn(10, 32, generator=gen)[labels] + 0.5 * torch.randn(300, 32, generator=gen)
    for loss_fn in (SoftStepContrastiveLoss(0.1, impl="chunked"), SoftStepNCALoss(impl="chunked")):
        full = loss_fn(x, labels)
        half = loss_fn(x.half(), labels)
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), full, rtol=5e-3, atol=1e-3)


def test_losses_under_autocast():
    model = torch.nn.Linear(8, 6)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for loss_fn in (SoftStepNCALoss(), SoftStepContrastiveLoss(), SoftStepNCALoss(impl="chunked")):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.float().backward()
        assert torch.isfinite(loss.float()) and torch.isfinite(model.weight.grad).all()
    # in float32 there, as autocast runs losses and as PML's NCALoss comes out; bf16 without it
    from pytorch_metric_learning.losses import NCALoss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = SoftStepNCALoss(step="none")(model(x), y), NCALoss()(model(x), y)
        others = [loss(model(x), y) for loss in (SoftStepContrastiveLoss(), SoftStepNeighborRegressionLoss())]
    assert ours.dtype == theirs.dtype == torch.float32 and all(o.dtype == torch.float32 for o in others)
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=0)
    half = model(x).bfloat16()
    assert SoftStepNCALoss()(half, y).dtype == SoftStepContrastiveLoss()(half, y).dtype == torch.bfloat16


def test_zero_loss_reaches_the_step_parameters():
    # DDP needs every parameter in the graph on every rank, also on a batch without positives
    for loss_fn in (SoftStepNCALoss(), SoftStepContrastiveLoss()):
        x = torch.randn(4, 6, requires_grad=True)
        loss = loss_fn(x, torch.arange(4))  # every label unique: no positive pair
        assert loss.item() == 0.0
        loss.backward()
        assert all(p.grad is not None and (p.grad == 0).all() for p in loss_fn.parameters())


def test_distance_changed_after_construction_is_used():
    """PML's losses read ``self.distance`` on every call; so do simwarp's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    ours, theirs = SoftStepNCALoss(step="none"), pml_losses.NCALoss()
    for loss in (ours, theirs):
        loss.distance = D.CosineSimilarity()
    assert ours.metric == "cosine"
    torch.testing.assert_close(ours(x, y), theirs(x, y))
    ours.distance = D.SNRDistance()
    with pytest.raises(TypeError, match="distance must be one of"):
        ours(x, y)


def test_distance_statistics_are_recorded_like_pml():
    x = torch.randn(10, 4, dtype=torch.float64) * 3
    y = torch.randint(0, 2, (10,))
    ours = SoftStepNCALoss(distance=D.LpDistance(power=2, collect_stats=True))
    theirs = pml_losses.NCALoss(distance=D.LpDistance(power=2, collect_stats=True))
    ours(x, y)
    theirs(x, y)
    for stat in ("initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm", "final_avg_ref_norm"):
        assert getattr(ours.distance, stat) == pytest.approx(getattr(theirs.distance, stat)), stat


def test_learnable_temperature_and_global_mode_options_are_reported():
    with pytest.raises(TypeError, match="learnable temperature"):
        SoftStepContrastiveLoss(temperature=torch.nn.Parameter(torch.tensor(0.1)))
    assert SoftStepContrastiveLoss(temperature=torch.tensor(0.1)).temperature == pytest.approx(0.1)
    with pytest.warns(UserWarning, match="ignored"):
        SoftStepNCALoss(embedding_size=32, hidden=16)


@pytest.mark.parametrize("grad", [False, True])
def test_a_nan_embedding_gives_a_nan_loss_not_zero(grad):
    """One NaN row made every anchor's mass NaN, which the floor test dropped: under no_grad
    (a validation loop) a diverged encoder showed a loss of exactly 0."""
    from pytorch_metric_learning.losses import NCALoss

    emb, labels = torch.randn(16, 4), torch.arange(16) % 4
    emb[3, 0] = float("nan")
    with torch.set_grad_enabled(grad):
        assert simwarp.SoftStepNCALoss()(emb.requires_grad_(grad), labels).isnan()
        assert NCALoss()(emb, labels).isnan()


def test_memory_bank_recipe_reproduces_cross_batch_memory():
    """docs/losses.md: a bank passed as ref_emb / ref_labels, with the batch's own stored copies
    left out by PML's miner utilities, reproduces CrossBatchMemory(NTXentLoss()) at step="none"
    (also once the bank is full, when a batch wraps around the end of the circular bank)."""
    from pytorch_metric_learning.losses import CrossBatchMemory
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    gen = torch.Generator().manual_seed(0)
    d, n, size = 8, 6, 20
    memory = CrossBatchMemory(pml_losses.NTXentLoss(0.3), d, memory_size=size)
    loss_fn = SoftStepContrastiveLoss(0.3, step="none")
    bank, bank_labels = torch.zeros(size, d), torch.zeros(size, dtype=torch.long)
    start, filled = 0, 0
    for _ in range(6):  # the fourth batch takes rows 18, 19, 0, 1, 2, 3
        emb, labels = torch.randn(n, d, generator=gen), torch.randint(0, 3, (n,), generator=gen)
        want = memory(emb, labels)
        rows = torch.arange(start, start + n) % size  # the recipe: where the batch sits in the bank
        bank[rows], bank_labels[rows] = emb, labels
        filled = min(filled + n, size)
        pairs = lmu.get_all_pairs_indices(labels, bank_labels[:filled])
        pairs = lmu.remove_self_comparisons(pairs, rows, filled)
        got = loss_fn(emb, labels, pairs, ref_emb=bank[:filled], ref_labels=bank_labels[:filled])
        torch.testing.assert_close(got, want)
        start = (start + n) % size


def test_float_labels_passed_as_their_own_ref_labels_keep_the_identity():
    """ref_labels=labels (the same object) means "the batch is its reference set": float labels
    were converted one by one into two tensors, and the contrastive loss then counted (i, i)."""
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    view = emb + 0.1 * torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    for loss_fn, pml in ((SoftStepContrastiveLoss(step="none"), pml_losses.NTXentLoss()),
                         (SoftStepNCALoss(step="none"), pml_losses.NCALoss())):
        yf = y.double()
        want = pml(emb, y, ref_emb=view, ref_labels=y)
        torch.testing.assert_close(loss_fn(emb, yf, ref_emb=view, ref_labels=yf), want)
        torch.testing.assert_close(loss_fn(emb, y, ref_emb=view, ref_labels=y), want)


def test_a_float32_bank_beside_half_embeddings_under_autocast():
    """Under autocast a model gives bf16 embeddings beside a float32 memory bank; PML's losses
    mix them there, and so do these (outside autocast mixed dtypes still raise)."""
    gen = torch.Generator().manual_seed(4)
    model = torch.nn.Linear(6, 5)
    x, bank = torch.randn(10, 6, generator=gen), torch.randn(16, 5, generator=gen)
    y, bank_y = torch.randint(0, 3, (10,), generator=gen), torch.randint(0, 3, (16,), generator=gen)
    targets, bank_targets = torch.randn(10, generator=gen), torch.randn(16, generator=gen)
    for loss_fn, labels, ref_labels in ((SoftStepNCALoss(), y, bank_y), (SoftStepContrastiveLoss(), y, bank_y),
                                        (simwarp.SoftStepNeighborRegressionLoss(), targets, bank_targets)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model(x)
            assert emb.dtype == torch.bfloat16
            loss = loss_fn(emb, labels, ref_emb=bank, ref_labels=ref_labels)
        want = loss_fn(emb.float(), labels, ref_emb=bank, ref_labels=ref_labels)
        torch.testing.assert_close(loss.float(), want.float())
        loss.backward()
        assert torch.isfinite(model.weight.grad).all()
        with pytest.raises(TypeError, match="must share a dtype"):
            loss_fn(emb.detach(), labels, ref_emb=bank, ref_labels=ref_labels)


def test_an_empty_indices_tuple_of_any_dtype_means_no_pairs():
    """PML reads torch.tensor([]) entries (float) as "no pairs"; they were a TypeError."""
    emb, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    empty = (torch.tensor([]),) * 3
    for loss_fn, pml in ((SoftStepNCALoss(step="none"), pml_losses.NCALoss()),
                         (SoftStepContrastiveLoss(step="none"), pml_losses.NTXentLoss())):
        torch.testing.assert_close(loss_fn(emb, y, empty), pml(emb, y, empty))


def test_one_positive_pair_among_many_negatives_is_a_loss():
    """PML's zero-loss rule needs at most one positive *and* at most one negative pair."""
    g = torch.Generator().manual_seed(5)
    x, ref = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    y, ref_y = torch.tensor([0, 1, 2]), torch.tensor([0, 5, 6, 7])
    want = pml_losses.NTXentLoss()(x, y, ref_emb=ref, ref_labels=ref_y)
    assert want > 0
    torch.testing.assert_close(SoftStepContrastiveLoss(step="none")(x, y, ref_emb=ref, ref_labels=ref_y), want)


def test_contrastive_over_class_blocks_equals_the_dense_path(monkeypatch):
    """More classes than MAX_CLASS_COLUMNS stream per group of classes: the same loss."""
    monkeypatch.setattr(sl, "MAX_CLASS_COLUMNS", 2)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(24, 5, generator=g, dtype=torch.float64), torch.arange(24) % 6
    loss_fn = SoftStepContrastiveLoss()
    torch.testing.assert_close(loss_fn.__class__(impl="chunked")(x, y), loss_fn.__class__(impl="dense")(x, y))


def test_regression_loss_edge_cases():
    """An empty reference set gives no loss (0, as PML's zero loss); a miner's indices_tuple
    weights the anchors as PML's convert_to_weights says."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    loss_fn = SoftStepNeighborRegressionLoss()
    assert loss_fn(x, y, ref_emb=x[:0], ref_labels=y[:0]).item() == 0.0
    per_anchor = SoftStepNeighborRegressionLoss(reducer=reducers.DoNothingReducer())(x, y)["loss"]["losses"]
    anchors = torch.arange(12)
    tuple_ = (anchors, (anchors + 1) % 16, (anchors + 5) % 16)
    weights = lmu.convert_to_weights(tuple_, y, dtype=x.dtype)
    torch.testing.assert_close(loss_fn(x, y, tuple_), (per_anchor * weights).mean())


def test_contrastive_with_its_own_labels_object_leaves_the_anchor_row_out_everywhere():
    """ref_labels that are the labels tensor: the batch against itself (PML's NT-Xent rule).
    The positive pairs left (i, i) out, but the row's range still held s_ii (the row maximum
    under cosine), so the step saw other u than without ref_emb."""
    torch.manual_seed(0)
    e, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    loss_fn = SoftStepContrastiveLoss().double()
    torch.testing.assert_close(loss_fn(e, y, ref_emb=e.clone(), ref_labels=y), loss_fn(e, y))
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    pairs = lmu.get_all_pairs_indices(y)  # with a miner's pairs too
    torch.testing.assert_close(loss_fn(e, y, pairs, ref_emb=e.clone(), ref_labels=y), loss_fn(e, y, pairs))


def test_regression_loss_checks_its_own_labels_as_references_once_and_still_by_shape():
    """The batch against itself (ref_labels is labels) checks its targets once; the same labels
    object given for a reference set of another size is still a shape error."""
    import simwarp.losses as losses_module

    e, y = torch.randn(6, 3), torch.randn(6)
    loss_fn = SoftStepNeighborRegressionLoss()
    checks = []
    real_require = losses_module.require

    def counting_require(ok, message, *args):
        checks.append(message.split(" ")[0])
        return real_require(ok, message, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses_module, "require", counting_require)
        loss_fn(e, y)
    assert "ref_labels" not in checks and checks.count("labels") == 2  # finite, and in the compute dtype
    torch.testing.assert_close(loss_fn(e, y, ref_emb=e.clone(), ref_labels=y), loss_fn(e, y, ref_emb=e.clone(), ref_labels=y.clone()))
    with pytest.raises(ValueError, match=r"ref_labels must have shape \(5,\) or \(5, e\)"):
        loss_fn(e, y, ref_emb=torch.randn(5, 3), ref_labels=y)
    bad = y.clone()
    bad[2] = float("inf")
    with pytest.raises(ValueError, match="labels contains NaN or inf"):
        loss_fn(e, bad, ref_emb=e.clone(), ref_labels=bad)


def test_regression_loss_refuses_complex_targets():
    with pytest.raises(TypeError, match="labels must hold real targets, got dtype torch.complex64"):
        SoftStepNeighborRegressionLoss()(torch.randn(4, 3), torch.zeros(4, dtype=torch.complex64))


def test_embeddings_without_features_are_named():
    for loss in (SoftStepNCALoss(), SoftStepContrastiveLoss(), SoftStepNeighborRegressionLoss()):
        with pytest.raises(ValueError, match=r"embeddings must have shape \(batch_size, embedding_size\) with embedding_size >= 1"):
            loss(torch.randn(4, 0), torch.arange(4) % 2)


def test_regression_loss_errors_keep_the_targets_and_weights_exact():
    from pytorch_metric_learning.reducers import DoNothingReducer
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    # the neighbours' targets are averaged in the embeddings' bf16 (1003 -> 1004, 1001 -> 1000), but
    # each row's own target is not rounded before its error is taken: 9, not 16
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    loss = SoftStepNeighborRegressionLoss()(x, torch.tensor([1001.0, 1003.0]))
    assert loss.item() == 9.0
    # float16 targets beside float32 embeddings: their spread (300) squares beyond float16, not float32
    y = torch.tensor([0.0, 300.0, 10.0, 20.0, 30.0, 40.0], dtype=torch.float16)
    assert torch.isfinite(SoftStepNeighborRegressionLoss()(torch.randn(6, 4), y))
    # a miner's anchor weights are not rounded to bf16
    xb = torch.randn(6, 4).bfloat16()
    yb = torch.randn(6)
    a = torch.tensor([0, 0, 1, 2, 3, 3, 3])
    anchors = (a, (a + 1) % 6, (a + 2) % 6)  # triplets: the anchors' counts weigh them
    weighted = SoftStepNeighborRegressionLoss(reducer=DoNothingReducer())(xb, yb, indices_tuple=anchors)
    plain = SoftStepNeighborRegressionLoss(reducer=DoNothingReducer())(xb, yb)
    weights = lmu.convert_to_weights(anchors, yb[:, None], dtype=torch.float64).float()
    kept = weights > 0
    torch.testing.assert_close(weighted["loss"]["losses"][kept], (plain["loss"]["losses"] * weights)[kept], rtol=1e-6, atol=0)


def test_a_keyword_typo_names_the_loss():
    # PML's base class refused it under its own name (ModuleWithRecords.__init__() got ...)
    for loss in (SoftStepNCALoss, SoftStepContrastiveLoss, SoftStepNeighborRegressionLoss):
        with pytest.raises(TypeError, match=f"{loss.__name__} got an unexpected keyword argument 'stepp'"):
            loss(stepp="poly")
