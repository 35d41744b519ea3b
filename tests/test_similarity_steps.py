import itertools
import math

import pytest
import torch
from step_references import log_reference, poly_reference, sigmoidal_reference

import simwarp
from simwarp.similarity import (
    METRICS,
    STREAMING_METRICS,
    BlockSimilarity,
    PreparedKeys,
    default_scale,
    distance_centre,
    paired_similarity,
    paired_similarity_backward,
    pairwise_similarity,
    pairwise_similarity_backward,
    safe_sqrt,
)
from simwarp.steps import SoftStep, available_steps, get_step, params_from_raw, register_step

f64 = torch.float64


# ----------------------------------------------------------------------------- metrics


def _loop_similarity(q, k, metric):
    out = torch.empty(q.shape[0], k.shape[0], dtype=q.dtype)
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            x, y = q[i], k[j]
            out[i, j] = {
                "dot": (x @ y) / math.sqrt(q.shape[1]),
                "cosine": (x @ y) / (x.norm() * y.norm()),
                "l2": -(x - y).norm(),
                "sqeuclidean": -((x - y) ** 2).sum(),
                "l1": -(x - y).abs().sum(),
            }[metric]
    return out


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_similarity_matches_definition(metric):
    q, k = torch.randn(5, 7, dtype=f64), torch.randn(6, 7, dtype=f64)
    torch.testing.assert_close(pairwise_similarity(q, k, metric), _loop_similarity(q, k, metric))
    diag = pairwise_similarity(q, k[:5], metric).diagonal()
    torch.testing.assert_close(paired_similarity(q, k[:5], metric), diag)


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2", "sqeuclidean"])
@pytest.mark.parametrize("leading", [(), (2,)])
def test_all_pairs_of_a_batch_with_itself(metric, leading):
    """pairwise_similarity(x, x) (one tensor: one GEMM with g + gᵀ in the backward when 2-D)
    has the value and gradient of the same call on a distinct alias of x."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(*leading, 9, 4, generator=gen, dtype=f64, requires_grad=True)
    seed = torch.randn(*leading, 9, 9, generator=gen, dtype=f64)
    seed.diagonal(0, -2, -1).zero_()  # l2 at distance 0 (+ rounding): sqrt' amplifies rounding noise
    same = pairwise_similarity(x, x, metric)
    alias = pairwise_similarity(x, x.view_as(x), metric)
    torch.testing.assert_close(same, alias, rtol=1e-12, atol=1e-12)
    (g_same,) = torch.autograd.grad(same, x, seed)
    (g_alias,) = torch.autograd.grad(alias, x, seed)
    torch.testing.assert_close(g_same, g_alias, rtol=1e-12, atol=1e-12)
    off_diagonal = 1.0 - torch.eye(5, dtype=f64)  # l2 is not differentiable at distance 0
    y = x[..., :5, :].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda y: pairwise_similarity(y, y, metric) * off_diagonal, (y,))
    if metric in ("dot", "cosine"):  # as through a plain matmul, double backward works
        assert torch.autograd.gradgradcheck(lambda y: pairwise_similarity(y, y, metric), (y,))
        k = torch.randn(3, 4, generator=gen, dtype=f64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda y, k: pairwise_similarity(y, k, metric), (y, k))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("leading", [(), (2, 3)])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_block_similarity_is_pairwise_similarity_to_the_bit(metric, dtype, leading, scale):
    """The streaming passes take similarities from BlockSimilarity and the backward recomputes
    them with pairwise_similarity: the two must agree exactly, block by block and from any row
    on; and each row's similarities must be non-decreasing in its scores (extremes are taken on
    the scores)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(*leading, 9, 6, generator=gen, dtype=dtype) * 3
    k = torch.randn(*leading[:1], *([1] if leading else []), 23, 6, generator=gen, dtype=dtype) * 3
    k[..., 4, :] = q[..., 0, :].reshape(-1, 6)[0]  # a key at distance 0 from a query
    sim = BlockSimilarity(q, k, metric, scale)
    centre = distance_centre(q)  # the distances' origin: that of all the queries, for every block
    for start, stop, row_start in ((0, 23, 0), (0, 7, 0), (7, 23, 3), (22, 23, 8)):
        r = sim.scores(start, stop, row_start)
        s = sim.similarity_(r.clone(), row_start)
        expected = pairwise_similarity(q[..., row_start:, :], k[..., start:stop, :], metric, scale, centre=centre)
        assert torch.equal(s, expected), (start, stop, row_start)
        order = r.argsort(-1)
        assert (s.gather(-1, order).diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("offset", [1e3, 1e4])
@pytest.mark.parametrize("metric", ["l2", "sqeuclidean"])
def test_distances_far_from_the_origin_keep_float32_precision(metric, offset):
    """Features far from the origin (raw years, prices): |q|² + |k|² - 2 q·k lost the
    distances to cancellation in float32 (at offset 1000 in 8-D, errors of ~0.5 on squared
    distances of ~4). They are computed from the keys' centre: float32 rounding of the
    distances themselves, on every path that scores pairs."""
    gen = torch.Generator().manual_seed(0)
    q = offset + torch.randn(30, 8, generator=gen, dtype=f64)
    k = offset + torch.randn(50, 8, generator=gen, dtype=f64)
    q32, k32 = q.float(), k.float()
    exact = -torch.cdist(q32.double(), k32.double()) ** (2 if metric == "sqeuclidean" else 1)
    tol = dict(atol=1e-4 * exact.abs().max().item(), rtol=0)
    torch.testing.assert_close(pairwise_similarity(q32, k32, metric).double(), exact, **tol)
    sim = BlockSimilarity(q32, k32, metric, None)
    torch.testing.assert_close(sim.similarity_(sim.scores(0, 50)).double(), exact, **tol)
    top = PreparedKeys(k32, metric).scores(q32).topk(5, dim=-1).indices
    assert torch.equal(top, exact.topk(5, dim=-1).indices)
    # gradients too (the centre is a constant: the distance does not depend on it)
    qg, kg = q32.clone().requires_grad_(), k32.clone().requires_grad_()
    weights = torch.randn(30, 50, generator=gen, dtype=f64)
    (pairwise_similarity(qg, kg, metric).double() * weights).sum().backward()
    q64, k64 = q32.double().requires_grad_(), k32.double().requires_grad_()
    (-((q64[:, None] - k64[None]) ** 2).sum(-1) ** (1.0 if metric == "sqeuclidean" else 0.5) * weights).sum().backward()
    for got, want in ((qg.grad, q64.grad), (kg.grad, k64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4 * want.abs().max().item(), rtol=0)
    s = pairwise_similarity(q32, k32, metric).double()
    gq, gk = pairwise_similarity_backward(weights.float(), q32, k32, s.float(), metric)
    torch.testing.assert_close(gq.double(), q64.grad, atol=1e-4 * q64.grad.abs().max().item(), rtol=0)
    torch.testing.assert_close(gk.double(), k64.grad, atol=1e-4 * k64.grad.abs().max().item(), rtol=0)


def test_the_distance_centre_ignores_non_finite_rows_and_outliers():
    """The centre is a median of the finite query rows: a NaN or inf row stays out of it (its
    own scores alone are non-finite), an outlier does not move it, and a large set is sampled
    across all its rows, not from its start."""
    q = torch.randn(7, 3, dtype=f64)
    centre = distance_centre(q[:5])
    q[5, 1], q[6, 0] = math.nan, math.inf
    assert torch.equal(distance_centre(q), centre)
    assert torch.equal(distance_centre(torch.full((2, 3), math.nan)), torch.zeros(1, 3))
    s = pairwise_similarity(q, torch.randn(4, 3, dtype=f64), "l2")
    assert torch.isfinite(s[:5]).all() and not torch.isfinite(s[5:]).any()
    ramp = torch.arange(5000.0, dtype=f64).unsqueeze(-1).expand(5000, 2)
    assert abs(distance_centre(ramp)[0, 0].item() - 2500) < 10


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("metric", ["l2", "sqeuclidean"])
def test_an_outlier_or_a_masked_far_key_leaves_the_other_distances_alone(metric, impl):
    """A centre taken as the keys' mean moved with one key at 1e6 (also a masked one), and every
    other pair lost its distance to cancellation (outputs off by 0.3-1.8)."""
    gen = torch.Generator().manual_seed(3)
    q = 100.0 + torch.randn(2, 20, 8, generator=gen, dtype=f64)
    k = 100.0 + torch.randn(1, 60, 8, generator=gen, dtype=f64)
    k[0, 0, 3], q[1, 0, 2] = 1e6, -1e6  # an outlier key (masked below) and an outlier query
    v = torch.randn(60, 3, generator=gen, dtype=f64)
    mask = torch.ones(60, dtype=torch.bool)
    mask[0] = False
    kw = dict(metric=metric, step="sigmoidal", a=0.2, b=0.8, t=0.5, mask=mask)
    out = simwarp.warp_attend(q.float(), k.float(), v.float(), impl=impl, chunk_size=16, **kw)
    ref = simwarp.warp_attend(q.float().double(), k.float().double(), v.float().double(), impl="dense", **kw)
    rows = torch.ones(2, 20, dtype=torch.bool)
    rows[1, 0] = False  # (the outlier query's own distances are 1e6 away: float32 keeps 1e-1 of them)
    torch.testing.assert_close(out.double()[rows], ref[rows], atol=1e-4, rtol=0)


def test_keys_shared_by_a_batch_of_queries_against_a_large_bank():
    """Per-batch centres against one shared bank: the bank's norms broadcast to the batch (their
    slices of rows too)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 16, generator=gen) + torch.tensor([[[50.0]], [[-50.0]]])
    k = torch.randn(20000, 16, generator=gen)
    v = torch.randn(20000, 2, generator=gen)
    out = simwarp.warp_attend(q, k, v, metric="l2", impl="chunked")
    ref = simwarp.warp_attend(q.double(), k.double(), v.double(), metric="l2", impl="dense")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_prepared_keys_rank_like_the_similarity(metric):
    q, k = torch.randn(6, 5, dtype=f64), torch.randn(40, 5, dtype=f64)
    scores = PreparedKeys(k, metric).scores(q)
    top = scores.topk(7, dim=-1).indices
    assert torch.equal(top, pairwise_similarity(q, k, metric).topk(7, dim=-1).indices)
    torch.testing.assert_close(PreparedKeys(k, metric).scores(q, 10, 30), scores[:, 10:30])  # another GEMM: not bitwise
    with pytest.raises(ValueError, match="scale must be a positive"):
        PreparedKeys(k, metric, scale=-1.0)


def test_scale_and_defaults():
    q, k = torch.randn(3, 16, dtype=f64), torch.randn(4, 16, dtype=f64)
    assert default_scale("dot", 16) == 0.25 and default_scale("l2", 16) == 1.0
    torch.testing.assert_close(pairwise_similarity(q, k, "dot", scale=1.0), q @ k.T)
    torch.testing.assert_close(pairwise_similarity(q, k, "l2", scale=2.0), 2 * pairwise_similarity(q, k, "l2"))


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(ValueError, match="metric must be one of"):
        pairwise_similarity(torch.randn(2, 3), torch.randn(2, 3), "manhattan")


@pytest.mark.parametrize(("scale", "error"), [("x", TypeError), (True, TypeError), ([2.0], TypeError),
                                              (math.inf, ValueError), (math.nan, ValueError)])
def test_a_bad_scale_is_a_clear_error(scale, error):
    """A scale of the wrong type is a TypeError, as in the backend (it was a ValueError here)."""
    with pytest.raises(error, match="scale must be a finite number"):
        pairwise_similarity(torch.randn(2, 3), torch.randn(2, 3), "dot", scale=scale)


def test_a_bad_centre_is_a_clear_error():
    q, k = torch.randn(2, 3), torch.randn(4, 3)
    for centre in (torch.zeros(1, 3, dtype=f64), torch.zeros(3), torch.zeros(1, 2), "middle"):
        with pytest.raises(ValueError, match="centre must be a"):
            pairwise_similarity(q, k, "l2", centre=centre)


def test_l2_gradient_is_finite_at_zero_distance():
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    s = pairwise_similarity(x, x, "l2")
    s.sum().backward()
    assert torch.isfinite(x.grad).all()
    y = torch.zeros(3, dtype=f64, requires_grad=True)
    safe_sqrt(y).sum().backward()
    assert torch.equal(y.grad, torch.zeros(3, dtype=f64))


@pytest.mark.parametrize("metric", STREAMING_METRICS)
@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("k_lead", [(2, 3), (3,), (1, 3)])
def test_closed_form_similarity_gradients_are_autograds(metric, scale, k_lead):
    """The streaming backward's closed forms against autograd through the similarity, float64,
    broadcast leading dims, with a zero row (cosine: gradient 0) and a key equal to a query
    (l2: distance 0, gradient 0)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 5, 4, generator=gen, dtype=f64)
    k = torch.randn(*k_lead, 6, 4, generator=gen, dtype=f64)
    q[0, 1, 2] = 0.0
    k[..., 3, :] = q[-1, -1, 1]
    q.requires_grad_(), k.requires_grad_()
    s = pairwise_similarity(q, k, metric, scale)
    g = torch.randn(s.shape, generator=gen, dtype=f64)
    want = torch.autograd.grad(s, (q, k), g)
    got = pairwise_similarity_backward(g, q.detach(), k.detach(), s.detach(), metric, scale)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert pairwise_similarity_backward(g, q.detach(), k.detach(), s.detach(), metric, scale, need_q=False)[0] is None

    kp = k.detach().expand(2, 3, 6, 4)[..., 1:, :].clone()  # one key per query
    kp[-1, -1, 1] = q[-1, -1, 1].detach()
    kp.requires_grad_()
    sp = paired_similarity(q, kp, metric, scale)
    gp = torch.randn(sp.shape, generator=gen, dtype=f64)
    want = torch.autograd.grad(sp, (q, kp), gp)
    got = paired_similarity_backward(gp, q.detach(), kp.detach(), metric, scale)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- steps


def _paper_sigmoidal(u, a, b, t):
    if u <= a:
        return 0.0
    if u >= b:
        return 1.0
    x, y = (u - a) ** (1 / t), (b - u) ** (1 / t)
    return x / (x + y)


def _paper_log(u, a, b, t):
    if u <= 0:
        return 0.0
    if u >= b:
        return 1.0
    return math.exp(t / (1 - t) * (b - u) * math.log(u / b))


def _poly(u, a, b, t):
    y = (u - (a + b) / 2) / (t * (b - a)) + 0.5
    y = min(max(y, 0.0), 1.0)
    return y * y * (3 - 2 * y)


@pytest.mark.parametrize("name,ref", [("sigmoidal", _paper_sigmoidal), ("log", _paper_log), ("poly", _poly)])
@pytest.mark.parametrize("a,b,t", [(0.1, 0.9, 0.5), (0.3, 0.5, 0.2), (0.05, 1.0, 0.9)])
def test_steps_match_their_definition(name, ref, a, b, t):
    u = torch.linspace(-0.05, 1.05, 221, dtype=f64)
    got = get_step(name).mask(u, a, b, t)
    want = torch.tensor([ref(float(x), a, b, t) for x in u], dtype=f64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)
    assert got[u <= (a if name == "sigmoidal" else 0)].eq(0).all(), "exactly zero below the band"
    assert got[u >= b].eq(1).all(), "exactly one above the band"


def test_poly_is_c1_and_monotone():
    a, b, t = 0.2, 0.7, 0.6
    u = torch.linspace(0, 1, 20001, dtype=f64)
    m = get_step("poly").mask(u, a, b, t)
    dm = torch.diff(m) / torch.diff(u)
    assert (dm >= 0).all()
    assert dm.abs().max() < 1.5 / (t * (b - a)) + 1e-6  # bounded slope, no jump at either band end
    assert torch.diff(dm).abs().max() < 1e-2


@pytest.mark.parametrize("name", ["sigmoidal", "log", "poly"])
def test_step_gradients_are_finite_everywhere(name):
    u = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.9, 1.0, 1.2], dtype=f64, requires_grad=True)
    a, b, t = (torch.tensor(x, dtype=f64, requires_grad=True) for x in (0.1, 0.9, 0.5))
    phi = get_step(name).log_mask(u, a, b, t)
    finite = torch.isfinite(phi)
    phi.masked_fill(~finite, 0.0).sum().backward()
    for g in (u.grad, a.grad, b.grad, t.grad):
        assert g is None or torch.isfinite(g).all()


def test_step_registry():
    assert {"sigmoidal", "log", "none"} <= set(available_steps())
    for builtin in ("sigmoidal", "poly"):  # their closed forms and kernels cannot be taken back
        with pytest.raises(ValueError, match="built-in step"):
            register_step(builtin, lambda u, a, b, t: u, overwrite=True)
    register_step("test_registry_twice", lambda u, a, b, t: torch.zeros_like(u), overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        register_step("test_registry_twice", lambda u, a, b, t: u)
    with pytest.raises(ValueError, match="step must be one of"):
        get_step("nope")
    with pytest.raises(TypeError):
        register_step("bad", 3)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_user_step_with_a_wrong_output_is_named(impl):
    q = torch.randn(4, 3, dtype=f64)
    register_step("test_wrong_shape", lambda u, a, b, t: u[..., :1] * 0, overwrite=True)
    register_step("test_wrong_dtype", lambda u, a, b, t: (u * 0).float(), overwrite=True)
    for name in ("test_wrong_shape", "test_wrong_dtype"):
        with pytest.raises(ValueError, match=f"step '{name}' must return log m"):
            simwarp.warp_attend(q, q, q, step=name, impl=impl)


def test_user_step_runs_on_dense_and_chunked():
    def hard(u, a, b, t):  # a hard threshold at a: keep u > a
        return torch.where(u > a, torch.zeros_like(u), torch.full_like(u, -math.inf))

    register_step("test_hard_threshold", hard, overwrite=True)
    q, k, v = torch.randn(2, 9, 4, dtype=f64), torch.randn(2, 13, 4, dtype=f64), torch.randn(2, 13, 3, dtype=f64)
    q.requires_grad_()
    outs = [simwarp.warp_attend(q, k, v, step="test_hard_threshold", a=0.5, impl=i, chunk_size=4) for i in ("dense", "chunked")]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad(o.sum(), q)[0] for o in outs]
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------- SoftStep


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.float16, torch.bfloat16])
def test_params_from_raw_constraints_hold_for_saturated_sigmoids(dtype):
    raw = torch.tensor([[-1e4, -1e4, -1e4], [1e4, 1e4, 1e4], [1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, 0.0, 0.0]])
    a, b, t = params_from_raw(raw.to(dtype))
    assert ((0 < a) & (a < b) & (b <= 1) & (0 < t) & (t < 1)).all()
    q, k, v = torch.randn(5, 4, 3), torch.randn(5, 6, 3), torch.randn(5, 6, 2)
    out = simwarp.warp_attend(q, k, v, a=a.float()[:, None], b=b.float()[:, None], t=t.float()[:, None])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("init", [(0.1, 0.9, 0.5), (0.3, 0.4, 0.1)])
def test_softstep_modes_shapes_and_init(init):
    g = SoftStep("global", init=init)
    a, b, t = g()
    assert a.shape == () and torch.allclose(torch.stack([a, b, t]), torch.tensor(init), atol=1e-5)
    h = SoftStep("per_head", num_heads=4, init=init)
    assert all(p.shape == (4, 1) for p in h())
    i = SoftStep("instance", in_features=6, hidden=8, init=init)
    cond = torch.randn(2, 3, 5, 6)
    a, b, t = i(cond)
    assert a.shape == (2, 3, 5)
    torch.testing.assert_close(a, torch.full_like(a, init[0]), atol=1e-5, rtol=0)
    kw = i.kwargs(cond)
    assert kw["step"] == "sigmoidal" and kw["t"].shape == (2, 3, 5)
    curve = g.curve(torch.linspace(0, 1, 11))
    assert curve.shape == (11,) and curve[0] == 0 and curve[-1] == 1


def test_softstep_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        SoftStep("per_row")
    with pytest.raises(ValueError, match="num_heads"):
        SoftStep("per_head")
    with pytest.raises(ValueError, match="in_features"):
        SoftStep("instance")
    with pytest.raises(ValueError, match="init"):
        SoftStep(init=(0.5, 0.4, 0.5))
    with pytest.raises(ValueError, match="step must be one of"):
        SoftStep(step="nope")
    with pytest.raises(ValueError, match="cond"):
        SoftStep("instance", in_features=3)(None)
    with pytest.raises(ValueError, match="in_features=3"):
        SoftStep("instance", in_features=3)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="torch.Tensor, got list"):  # (an AttributeError before)
        SoftStep("instance", in_features=3)([[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="got dtype torch.int64"):
        SoftStep("instance", in_features=3)(torch.ones(2, 3, dtype=torch.long))


def test_softstep_parameters_are_trained_through_the_backend():
    step = SoftStep("instance", in_features=5)
    q, k, v = torch.randn(7, 5), torch.randn(11, 5), torch.randn(11, 2)
    for impl in ("dense", "chunked"):
        step.zero_grad()
        simwarp.warp_attend(q, k, v, impl=impl, chunk_size=4, **step.kwargs(q)).pow(2).sum().backward()
        grads = [p.grad for p in step.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "name,reference", [("sigmoidal", sigmoidal_reference), ("log", log_reference), ("poly", poly_reference)]
)
@pytest.mark.parametrize("param_shape", [(), (6, 1), (2, 6, 1), (6, 9)])
def test_closed_form_steps_match_autograd_reference(name, reference, param_shape):
    gen = torch.Generator().manual_seed(zlib_seed(name, param_shape))
    u = torch.rand(2, 6, 9, generator=gen, dtype=f64) * 1.4 - 0.2  # invalid keys leave [0, 1]
    a = 0.05 + 0.4 * torch.rand(param_shape, generator=gen, dtype=f64)
    b = (a + 0.05 + 0.5 * torch.rand(param_shape, generator=gen, dtype=f64)).clamp(max=1.0)
    t = 0.05 + 0.9 * torch.rand(param_shape, generator=gen, dtype=f64)
    u[..., 0] = ((a + b) * 0.5).expand(u.shape)[..., 0]  # the band's centre (a kink in a careless reference)
    u, a, b, t = (x.requires_grad_() for x in (u, a, b, t))
    got, want = get_step(name).log_mask(u, a, b, t), reference(u, a, b, t)
    assert torch.equal(got == -math.inf, want == -math.inf), "exactly the same neighbours dropped"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-12)
    # the backend's softmax sends a zero gradient to dropped entries
    seed = torch.randn(got.shape, generator=gen, dtype=f64).masked_fill(~finite, 0.0)
    g_got = torch.autograd.grad(got.masked_fill(~finite, 0.0), (u, a, b, t), seed, allow_unused=True, materialize_grads=True)
    g_want = torch.autograd.grad(want.masked_fill(~finite, 0.0), (u, a, b, t), seed, allow_unused=True, materialize_grads=True)
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("name", ["sigmoidal", "log", "poly"])
def test_mask_form_is_exp_of_log_form(name, dtype):
    """StepRule.mask (multiplied into the softmax numerator) equals exp(forward): exactly 0 where
    φ = -inf, and 0 elsewhere only where exp(φ) is below the normal range (flushed); it saves
    what the shared backward reads."""
    rule = get_step(name).rule
    gen = torch.Generator().manual_seed(zlib_seed("mask", name))
    u = (torch.rand(6, 40, generator=gen, dtype=f64) * 1.4 - 0.2).to(dtype)
    u[:, :3] = torch.tensor([0.0, 1.0, 0.3], dtype=dtype)  # band edges and a = 0.3 itself
    a = torch.tensor([[0.3]] * 6, dtype=dtype)
    b = torch.tensor([[0.7], [0.9], [1.0], [0.31], [0.5], [0.8]], dtype=dtype)
    t = torch.tensor([[0.5], [0.05], [0.95], [0.3], [0.002], [0.5]], dtype=dtype)
    phi, saved_log = rule.forward(u, a, b, t)
    m, saved_mask = rule.mask(u, a, b, t)
    tiny = torch.finfo(dtype).tiny
    assert (m[phi == -math.inf] == 0).all(), "every neighbour the log form drops is dropped"
    assert (phi[m == 0].exp() < tiny).all(), "the mask form drops nothing above the normal range"
    assert ((m >= 0) & (m <= 1)).all()
    # exp turns φ's rounding (relative eps, absolute eps |φ|) into a relative error eps |φ| of m
    want = phi.exp()
    bound = 16 * torch.finfo(dtype).eps * (1 + phi.abs().nan_to_num(posinf=0.0)) * want + tiny
    assert ((m - want).abs() <= bound).all()
    for x, y in zip(saved_mask, saved_log):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sigmoidal", "log", "poly"])
def test_closed_form_steps_gradcheck(name):
    gen = torch.Generator().manual_seed(7)
    u = (0.1 + 0.8 * torch.rand(3, 5, generator=gen, dtype=f64)).requires_grad_()
    a = torch.full((3, 1), 0.15, dtype=f64, requires_grad=True)
    b = torch.tensor([[0.8], [0.9], [1.0]], dtype=f64, requires_grad=True)
    t = torch.tensor(0.6, dtype=f64, requires_grad=True)
    step = get_step(name).log_mask
    assert torch.autograd.gradcheck(lambda *x: step(*x).exp(), (u, a, b, t))


def test_user_steps_see_u_clamped_to_the_unit_interval():
    seen = []

    def recording(u, a, b, t):
        seen.append((float(u.min()), float(u.max())))
        return torch.log(u)  # NaN for u < 0 without the clamp

    register_step("test_recording", recording, overwrite=True)
    q, k, v = torch.randn(4, 3, dtype=f64), torch.randn(6, 3, dtype=f64), torch.randn(6, 2, dtype=f64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 0] = False  # an invalid key may lie outside the valid keys' range
    out = simwarp.warp_attend(q, k, v, step="test_recording", mask=mask, impl="dense")
    assert torch.isfinite(out).all()
    assert all(0.0 <= lo and hi <= 1.0 for lo, hi in seen)


def zlib_seed(*parts) -> int:
    import zlib

    return zlib.crc32(repr(parts).encode())


def test_softstep_arguments_are_checked():
    for kwargs in ({"mode": "instance", "in_features": 8, "hidden": 0}, {"mode": "instance", "in_features": 8, "hidden": 2.5},
                   {"mode": "per_head", "num_heads": True}, {"mode": "instance", "in_features": True}):
        with pytest.raises(ValueError, match="must be a positive int"):
            SoftStep(**kwargs)
    with pytest.warns(UserWarning, match="ignores hidden"):
        SoftStep(mode="global", hidden=16)
    with pytest.warns(UserWarning, match="ignores in_features"):
        SoftStep(mode="per_head", num_heads=2, in_features=4)
    with pytest.raises(ValueError, match="init b - a must be at least"):
        SoftStep(init=(0.1, 0.1000001, 0.5))
    a, b, t = (x.detach() for x in SoftStep(init=(0.1, 0.2, 0.5))())
    assert (float(a), float(b), float(t)) == pytest.approx((0.1, 0.2, 0.5), abs=1e-6)


def test_squared_norms_in_slices_are_the_same_bits(monkeypatch):
    import simwarp.similarity as similarity

    x = torch.randn(2, 37, 5) * 10
    monkeypatch.setattr(similarity, "_NORM_SLICE_ELEMENTS", 80)
    assert torch.equal(similarity.squared_norms(x), x.pow(2).sum(-1))
    assert similarity.squared_norms(torch.randn(0, 3)).shape == (0,)


def test_softstep_init_that_is_not_three_numbers_names_init():
    with pytest.raises(TypeError, match=r"init must be three floats \(a, b, t\) or None, got 'abc'"):
        simwarp.SoftStep(init="abc")



def _front_ends_with_step_none():
    """(name, module, a call giving a loss) of every front end built with step="none"."""
    z, y, cls = torch.randn(12, 4, requires_grad=True), torch.randn(12, 1), torch.arange(12) % 3
    x = torch.randn(2, 6, 8, requires_grad=True)
    losses = ((simwarp.SoftStepNCALoss, cls), (simwarp.SoftStepContrastiveLoss, cls), (simwarp.SoftStepNeighborRegressionLoss, y))
    for (cls_, labels), mode in itertools.product(losses, ("global", "instance")):
        loss = cls_(step="none", mode=mode, embedding_size=4 if mode == "instance" else None)
        yield f"{cls_.__name__}-{mode}", loss, lambda loss=loss, labels=labels: loss(z, labels)
    for mode in ("global", "per_head", "instance"):
        mha = simwarp.MultiheadSoftStepAttention(8, 2, step="none", mode=mode, batch_first=True)
        yield f"attention-{mode}", mha, lambda mha=mha: mha(x, x, x)[0]
    head = simwarp.NeighborRegressionHead(4, 1, step="none")
    yield "head", head, lambda: head(z, y)


@pytest.mark.parametrize("name", [name for name, _, _ in _front_ends_with_step_none()])
def test_step_none_leaves_no_parameter_without_a_gradient(name):
    """DistributedDataParallel refuses parameters that get no gradient. With step="none" the
    step's (a, b, t) are unused: they were parameters all the same (losses, attention), so the
    documented DDP recipe failed on its second iteration ("Expected to have finished reduction")."""
    module, run = next((m, r) for n, m, r in _front_ends_with_step_none() if n == name)
    run().sum().backward()
    assert all(p.grad is not None for p in module.parameters()), [n for n, p in module.named_parameters() if p.grad is None]


@pytest.mark.parametrize("mode, kw", [("global", {}), ("per_head", {"num_heads": 3}), ("instance", {"in_features": 4})])
def test_softstep_without_warping_is_constant(mode, kw):
    step = SoftStep(mode=mode, step="none", **kw)
    assert not list(step.parameters()) and "raw" in step.state_dict()
    cond = torch.randn(5, 4)
    for got, want in zip(step(cond), SoftStep(mode=mode, **kw)(cond)):
        torch.testing.assert_close(got, want.detach())
    if mode == "instance":  # a checkpoint from when it held an (unused) network still loads, strictly
        with pytest.warns(UserWarning, match="left out"):  # (or one trained with a warping step: said)
            step.load_state_dict({"net.weight": torch.zeros(3, 4), "net.bias": torch.zeros(3)})


@pytest.mark.parametrize(
    "kw",
    [{}, {"mode": "per_head", "num_heads": 3}, {"mode": "instance", "in_features": 4},
     {"mode": "instance", "in_features": 4, "hidden": 5}, {"step": "none"}, {"step": "none", "mode": "instance", "in_features": 4}],
)
def test_softstep_reset_parameters_and_meta_device(kw):
    """Built on the meta device, printed, materialised with to_empty: reset_parameters puts it
    at init (printing failed on meta tensors; to_empty left uninitialised memory)."""
    init = (0.2, 0.7, 0.3)
    with torch.device("meta"):
        step = SoftStep(init=init, **kw)
    assert "SoftStep(" in repr(step)
    step.to_empty(device="cpu")
    step.reset_parameters()
    cond = torch.randn(6, 4)
    for got, want in zip(step(cond), init):
        torch.testing.assert_close(got.detach(), torch.full_like(got, want))
    if step.mode == "instance" and not step.step == "none":
        first = step.net if kw.get("hidden") is None else step.net[0]
        assert first.weight.abs().sum() > 0 if kw.get("hidden") else first.weight.abs().sum() == 0
    with torch.device("meta"):  # as FSDP and per-module initialisers do it: each module with its own tensors
        again = SoftStep(init=init, **kw)
    again.to_empty(device="cpu")
    for module in again.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if own and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for got, want in zip(again(cond), init):
        torch.testing.assert_close(got.detach(), torch.full_like(got, want))
    wide = SoftStep(init=init, **kw).double()
    wide.reset_parameters()
    for got, want in zip(wide(cond.double()), init):  # to float64 precision
        torch.testing.assert_close(got.detach(), torch.full_like(got, want), rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    trained = SoftStep(init=init, **kw)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    trained.reset_parameters()
    for got, want in zip(trained(cond), init):
        torch.testing.assert_close(got.detach(), torch.full_like(got, want))


@pytest.mark.parametrize("hidden", [None, 5])
def test_reset_of_a_step_whose_output_layer_is_a_plain_linear(hidden):
    """A module saved before the output layer reset itself holds a plain nn.Linear there,
    whose own reset is random: SoftStep.reset_parameters still starts it at init."""
    step = SoftStep(mode="instance", in_features=4, hidden=hidden, init=(0.2, 0.7, 0.3))
    plain = torch.nn.Linear(hidden or 4, 3)
    if hidden is None:
        step.net = plain
    else:
        step.net[-1] = plain
    step.reset_parameters()
    for got, want in zip(step(torch.randn(5, 4)), (0.2, 0.7, 0.3)):
        torch.testing.assert_close(got.detach(), torch.full_like(got, want))
    assert "_StartAtInit" not in repr(SoftStep(mode="instance", in_features=4))


def test_front_ends_reset_their_steps():
    """reset_parameters of the heads, attention modules and losses reaches the step (and, for
    nn.MultiheadAttention's own _reset_parameters, the swapped module's step too)."""
    with torch.device("meta"):
        head = simwarp.NeighborRegressionHead(6, 1, mode="global", learn_scale=True, init=(0.2, 0.7, 0.3))
        layer = simwarp.swap_attention(torch.nn.TransformerEncoderLayer(16, 4), init=(0.2, 0.7, 0.3))
    assert "NeighborRegressionHead(" in repr(head) and "SoftStepAttention(" in repr(layer)
    head.to_empty(device="cpu")
    head.reset_parameters()
    layer.to_empty(device="cpu")
    layer.self_attn._reset_parameters()
    loss = simwarp.SoftStepNCALoss(init=(0.2, 0.7, 0.3))
    with torch.no_grad():
        loss.softstep.raw.add_(1.0)
    loss.reset_parameters()
    for step in (head.softstep, layer.self_attn.softstep.step, loss.softstep):
        for got, want in zip(step(), (0.2, 0.7, 0.3)):
            torch.testing.assert_close(got.detach(), torch.full_like(got, want))
    assert head.log_scale.item() == 0.0 and head.target_std.eq(1).all() and head.targets_seen.item() == 0


def test_step_details_from_a_mutation_audit():
    """A user step sees u clamped to [0, 1] (also where a masked key or a fixed range would
    put it outside); a hidden instance network's first layer is re-drawn by reset_parameters;
    init needs three values and may end its band at b = 1."""
    seen = []

    def recording(u, a, b, t):
        seen.append((float(u.min()), float(u.max())))
        return torch.zeros_like(u)

    simwarp.register_step("test_recording_step", recording, overwrite=True)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4) * 1e3, torch.randn(1, 2, 5, 2)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 0] = False
    simwarp.softstep_attention(q, k, v, attn_mask=mask, step="test_recording_step")
    assert seen and all(0.0 <= lo and hi <= 1.0 for lo, hi in seen)
    step = SoftStep(mode="instance", in_features=4, hidden=8)
    with torch.no_grad():
        step.net[0].weight.fill_(1.0)
        step.net[-1].weight.fill_(1.0)
    step.reset_parameters()
    assert not step.net[0].weight.eq(1).all() and step.net[-1].weight.eq(0).all()
    with pytest.raises(ValueError, match="init must be"):
        SoftStep(init=(0.1, 0.9))
    torch.testing.assert_close(SoftStep(init=(0.1, 1.0, 0.5))()[1].detach(), torch.tensor(1.0))


def test_bad_inputs_found_by_an_audit_raise_errors_that_name_them():
    q = torch.randn(3, 4)
    # a meta tensor beside a CPU one returned garbage (dot, cosine); non-broadcasting batches a torch error
    with pytest.raises(ValueError, match="same device, got meta and cpu"):
        simwarp.pairwise_similarity(q.to("meta"), q)
    with pytest.raises(ValueError, match=r"leading dims of q \(2, 3, 4\) and k \(3, 5, 4\) do not broadcast"):
        simwarp.pairwise_similarity(torch.randn(2, 3, 4), torch.randn(3, 5, 4))
    assert simwarp.pairwise_similarity(torch.randn(2, 1, 3, 4), torch.randn(5, 5, 4)).shape == (2, 5, 3, 5)
    with pytest.raises(ValueError, match=r"leading dims of q \(3, 4\) and k \(5, 4\) do not broadcast"):
        paired_similarity(torch.randn(3, 4), torch.randn(5, 4))
    # warp_weights / warp_range indexed a bad k before checking it
    for fn in (simwarp.warp_weights, simwarp.warp_range):
        for bad, error in ((None, TypeError), ([1.0], TypeError), (torch.tensor(1.0), ValueError)):
            with pytest.raises(error, match="k must"):
                fn(q, bad)
    with pytest.raises(ValueError, match="columns must be on q's device"):
        simwarp.warp_weights(q, q, columns=torch.zeros(3, 1, dtype=torch.long, device="meta"))
    # register_step: the arity is checked at registration, the flag is a bool
    with pytest.raises(TypeError, match=r"must take \(u, a, b, t\)"):
        register_step("audit_two_args", lambda u, a: u)
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        register_step("audit_flag", lambda u, a, b, t: torch.zeros_like(u), overwrite="no")
    with pytest.raises(ValueError, match=r"in_features=4, got shape \(\)"):
        SoftStep("instance", in_features=4)(torch.tensor(1.0))
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        SoftStep().curve([0.0, 1.0])


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2", "sqeuclidean", "l1"])
def test_a_tensor_scale_is_learnable_and_broadcasts(metric):
    # sqeuclidean took the tensor as its autograd function's constant: no gradient reached it;
    # a (m,) scale raised "Boolean value of Tensor with more than one value is ambiguous"
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    c = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    s = simwarp.pairwise_similarity(q, k, metric=metric, scale=c)
    plain = simwarp.pairwise_similarity(q, k, metric=metric, scale=1.0)
    torch.testing.assert_close(s, 2 * plain)
    (g,) = torch.autograd.grad(s.sum(), c)
    torch.testing.assert_close(g, plain.sum())
    per_key = torch.arange(1.0, 6.0, dtype=torch.float64)
    torch.testing.assert_close(simwarp.pairwise_similarity(q, k, metric=metric, scale=per_key), plain * per_key)
