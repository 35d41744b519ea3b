"""The backend contract: chunked == dense (float64, values and every gradient), gradcheck,
degenerate rows, low precision, argument errors, and property tests."""

import functools
import itertools
import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from step_references import log_reference, poly_reference, sigmoidal_reference

import simwarp
from simwarp.backend import DENSE_AUTO_LIMIT, chunked
from simwarp.similarity import BlockSimilarity

f64 = torch.float64
METRICS = ("dot", "cosine", "l2", "sqeuclidean")
STEPS = ("sigmoidal", "log", "poly", "none")


def _params(kind, batch, n, gen):
    """(a, b, t) as scalars, per head (H, 1) or per query row (B, H, n)."""
    if kind == "float":
        return 0.2, 0.8, 0.4
    if kind == "scalar":
        vals = (0.15, 0.75, 0.35)
        return tuple(torch.tensor(x, dtype=f64, requires_grad=True) for x in vals)
    shape = (batch[-1], 1) if kind == "head" else (*batch, n)
    a = (0.05 + 0.3 * torch.rand(shape, generator=gen, dtype=f64)).requires_grad_()
    b = (a.detach() + 0.1 + 0.5 * torch.rand(shape, generator=gen, dtype=f64)).clamp(max=1.0).requires_grad_()
    t = (0.1 + 0.8 * torch.rand(shape, generator=gen, dtype=f64)).requires_grad_()
    return a, b, t


def _run(q, k, v, params, impl, **kw):
    a, b, t = params
    out, stats = simwarp.warp_attend(q, k, v, a=a, b=b, t=t, impl=impl, return_stats=True, **kw)
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    loss = (out * weights).sum() + 0.3 * stats.lse.masked_fill(stats.empty, 0.0).sum()
    leaves = [x for x in (q, k, v, a, b, t) if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return out, stats, grads


def _mask_kwargs(kind: str, batch, n: int, m: int, gen) -> dict:
    """Backend kwargs for a mask kind: none, a random mask broadcast over heads, causal, self."""
    if kind == "random":
        return {"mask": torch.rand(batch[0], 1, n, m, generator=gen) > 0.4}
    return {"causal": True} if kind == "causal" else {"exclude_self": True} if kind == "self" else {}


def _batched_qkv(gen, batch, n: int, m: int, d: int, e: int):
    """q ``(*batch, n, d)``, k ``(batch[0], 1, m, d)`` (broadcast over heads) and v
    ``(1, batch[1], m, e)``, float64, requiring grad."""
    q = torch.randn(*batch, n, d, generator=gen, dtype=f64, requires_grad=True)
    k = torch.randn(batch[0], 1, m, d, generator=gen, dtype=f64, requires_grad=True)
    v = torch.randn(1, batch[1], m, e, generator=gen, dtype=f64, requires_grad=True)
    return q, k, v


CASES = list(itertools.product(METRICS, STEPS, ("float", "scalar", "head", "row"), ("none", "random", "causal", "self")))


@pytest.mark.parametrize("metric,step,param_kind,mask_kind", CASES)
def test_chunked_matches_dense_float64(metric, step, param_kind, mask_kind):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{metric}-{step}-{param_kind}-{mask_kind}".encode()))
    batch = (2, 3)
    n = int(torch.randint(1, 12, (1,), generator=gen))
    m = n if mask_kind == "self" else int(torch.randint(1, 15, (1,), generator=gen))
    d, e = 5, 3
    q, k, v = _batched_qkv(gen, batch, n, m, d, e)
    kw = {"metric": metric, "step": step, "temperature": 0.7}
    kw.update(_mask_kwargs(mask_kind, batch, n, m, gen))
    params = _params(param_kind, batch, n, gen)
    chunk = int(torch.randint(1, m + 2, (1,), generator=gen))
    out_d, stats_d, grads_d = _run(q, k, v, params, "dense", **kw)
    out_c, stats_c, grads_c = _run(q, k, v, params, "chunked", chunk_size=chunk, **kw)
    torch.testing.assert_close(out_c, out_d, rtol=1e-10, atol=1e-12)
    for field in ("lse", "kept", "lo", "hi", "empty"):
        torch.testing.assert_close(getattr(stats_c, field), getattr(stats_d, field), rtol=1e-10, atol=1e-12)
    for gc, gd in zip(grads_c, grads_d):
        torch.testing.assert_close(gc, gd, rtol=1e-8, atol=1e-10)
    assert all(torch.isfinite(g).all() for g in grads_c)


@pytest.mark.parametrize("impl", ["chunked", "dense"])
@pytest.mark.parametrize("metric", ["dot", "cosine", "l2", "sqeuclidean"])
@pytest.mark.parametrize("mask_kind", ["none", "random", "causal", "self"])
def test_inference_matches_training_forward(impl, metric, mask_kind):
    """Without gradients the range reductions skip the argmin/argmax keys (vectorised): the
    forward must not change."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{metric}-{mask_kind}".encode()))
    n = 13
    m = n if mask_kind == "self" else 29
    q, k, v = (x.float() for x in _batched_qkv(gen, (2, 3), n, m, 5, 3))
    kw = {"metric": metric, "step": "sigmoidal", "impl": impl, "return_stats": True}
    if impl == "chunked":
        kw["chunk_size"] = 6
    kw.update(_mask_kwargs(mask_kind, (2, 3), n, m, gen))
    out_train, stats_train = simwarp.warp_attend(q, k, v, **kw)
    with torch.no_grad():
        out_infer, stats_infer = simwarp.warp_attend(q, k, v, **kw)
    assert out_train.requires_grad and not out_infer.requires_grad
    assert torch.equal(out_train.detach(), out_infer)
    for field in ("lse", "kept", "lo", "hi", "empty"):
        assert torch.equal(getattr(stats_train, field), getattr(stats_infer, field)), field


@pytest.mark.parametrize("impl", ["chunked", "dense"])
@pytest.mark.parametrize("metric", ["dot", "cosine", "l2", "sqeuclidean"])
def test_the_forward_does_not_depend_on_which_inputs_require_grad(impl, metric):
    """torch.matmul folds broadcast batch dims into one GEMM or not depending on its operands'
    requires_grad flags, and the two round differently: the same call scored other similarities
    with k.requires_grad than without, so warp_range's range (taken under no_grad) missed a
    training call's keys on rows of near-duplicates."""
    gen = torch.Generator().manual_seed(zlib.crc32(metric.encode()))
    shapes = [((2, 7, 8), (1, 9, 8)), ((7, 8), (2, 9, 8)), ((1, 7, 8), (2, 9, 8)), ((2, 7, 8), (9, 8)), ((3, 1, 7, 8), (1, 2, 9, 8))]
    for q_shape, k_shape in shapes:
        q, k = torch.randn(q_shape, generator=gen), torch.randn(k_shape, generator=gen)
        v = torch.randn(9, 3, generator=gen)
        runs = []
        for need_q, need_k in ((False, False), (True, False), (False, True), (True, True)):
            out, stats = simwarp.warp_attend(q.clone().requires_grad_(need_q), k.clone().requires_grad_(need_k), v,
                                             metric=metric, impl=impl, chunk_size=4, return_stats=True)
            runs.append((out.detach(), stats.lo, stats.hi, stats.lse))
        for run in runs[1:]:
            assert all(torch.equal(x, y) for x, y in zip(run, runs[0])), (q_shape, k_shape)


def _plain_step(name):
    """The built-in step `name` as a user step: its plain-autograd statement from
    test_similarity_steps, which the backend runs in the log form with autograd gradients."""
    reference = {"sigmoidal": sigmoidal_reference, "log": log_reference, "poly": poly_reference}[name]
    return simwarp.register_step(f"test_plain_{name}", reference, overwrite=True).name


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize(
    "metric,step,param_kind,mask_kind",
    [c for c in CASES if c[1] != "none" and (c[0], c[2]) in (("dot", "row"), ("l2", "head"), ("cosine", "scalar"))],
)
def test_builtin_steps_match_plain_autograd_user_steps(impl, metric, step, param_kind, mask_kind):
    """An independent check of the mask form (dense and chunked share its numerator and
    backward): the same step registered as a user step takes the general path (log form,
    online softmax, autograd through the step)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"plain-{impl}-{metric}-{step}-{param_kind}-{mask_kind}".encode()))
    batch, n, d, e = (2, 3), 6, 4, 3
    m = n if mask_kind == "self" else 8
    q, k, v = _batched_qkv(gen, batch, n, m, d, e)
    kw = {"metric": metric, "temperature": 0.6, "chunk_size": 3}
    kw.update(_mask_kwargs(mask_kind, batch, n, m, gen))
    params = _params(param_kind, batch, n, gen)
    out, stats, grads = _run(q, k, v, params, impl, step=step, **kw)
    out_p, stats_p, grads_p = _run(q, k, v, params, impl, step=_plain_step(step), **kw)
    torch.testing.assert_close(out, out_p, rtol=1e-10, atol=1e-12)
    for field in ("lse", "kept", "lo", "hi", "empty"):
        torch.testing.assert_close(getattr(stats, field), getattr(stats_p, field), rtol=1e-10, atol=1e-12)
    for g, g_p in zip(grads, grads_p):
        torch.testing.assert_close(g, g_p, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("offset,causal", [(0, False), (3, False), (5, False), (2, True)])
def test_self_offset_equals_the_explicit_mask(monkeypatch, impl, step, offset, causal):
    """exclude_self with self_offset: query i loses key i + offset, exactly as a mask would
    remove it (values, stats and gradients), with row blocks and key blocks that cut through."""
    import simwarp.backend.dense as dense

    gen = torch.Generator().manual_seed(zlib.crc32(f"offset-{impl}-{step}-{offset}-{causal}".encode()))
    n, m = 7, 12
    monkeypatch.setattr(dense, "ROW_BLOCK_ELEMENTS", 3 * m * 2)  # 3 query rows per dense block
    q = torch.randn(2, n, 4, generator=gen, dtype=f64, requires_grad=True)
    k = torch.randn(2, m, 4, generator=gen, dtype=f64, requires_grad=True)
    v = torch.randn(2, m, 3, generator=gen, dtype=f64, requires_grad=True)
    params = _params("row", (2,), n, gen)
    mask = torch.ones(n, m, dtype=torch.bool)
    mask[torch.arange(n), torch.arange(n) + offset] = False
    kw = {"metric": "l2", "step": step, "causal": causal, "chunk_size": 5}
    out, stats, grads = _run(q, k, v, params, impl, exclude_self=True, self_offset=offset, **kw)
    out_m, stats_m, grads_m = _run(q, k, v, params, impl, mask=mask, **kw)
    torch.testing.assert_close(out, out_m, rtol=1e-10, atol=1e-12)
    for field in ("lse", "kept", "lo", "hi", "empty"):
        torch.testing.assert_close(getattr(stats, field), getattr(stats_m, field), rtol=1e-10, atol=1e-12)
    for g, g_m in zip(grads, grads_m):
        torch.testing.assert_close(g, g_m, rtol=1e-8, atol=1e-10)
    lo, hi, empty = simwarp.warp_range(q, k, metric="l2", causal=causal, exclude_self=True, self_offset=offset)
    torch.testing.assert_close((lo, hi), (stats_m.lo, stats_m.hi))


@pytest.mark.parametrize("rows_per_block", [1, 3])
@pytest.mark.parametrize(
    "metric,step,param_kind,mask_kind",
    [c for c in CASES if c[0] in ("dot", "l2") and c[1] in ("sigmoidal", "poly") and c[2] in ("head", "row")],
)
def test_dense_row_blocks_match_chunked(monkeypatch, rows_per_block, metric, step, param_kind, mask_kind):
    """The dense path splits rows into blocks; every block boundary (causal and self masks,
    per-row parameters, row_range-free stats) must leave values and gradients unchanged."""
    import simwarp.backend.dense as dense

    gen = torch.Generator().manual_seed(zlib.crc32(f"blocks-{metric}-{step}-{param_kind}-{mask_kind}".encode()))
    batch, n, d, e = (2, 3), 7, 4, 3
    m = n if mask_kind == "self" else 9
    q, k, v = _batched_qkv(gen, batch, n, m, d, e)
    kw = {"metric": metric, "step": step}
    kw.update(_mask_kwargs(mask_kind, batch, n, m, gen))
    params = _params(param_kind, batch, n, gen)
    monkeypatch.setattr(dense, "ROW_BLOCK_ELEMENTS", rows_per_block * m * 6)
    out_d, stats_d, grads_d = _run(q, k, v, params, "dense", **kw)
    out_c, stats_c, grads_c = _run(q, k, v, params, "chunked", chunk_size=4, **kw)
    torch.testing.assert_close(out_d, out_c, rtol=1e-10, atol=1e-12)
    for field in ("lse", "kept", "lo", "hi", "empty"):
        torch.testing.assert_close(getattr(stats_d, field), getattr(stats_c, field), rtol=1e-10, atol=1e-12)
    for gd, gc in zip(grads_d, grads_c):
        torch.testing.assert_close(gd, gc, rtol=1e-8, atol=1e-10)
    w = simwarp.warp_weights(q, k, a=params[0], b=params[1], t=params[2], **kw)
    torch.testing.assert_close(w @ v, out_d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("metric,step", [("dot", "sigmoidal"), ("l2", "log"), ("cosine", "poly"), ("sqeuclidean", "none")])
def test_gradcheck(impl, metric, step):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, generator=gen, dtype=f64, requires_grad=True)
    k = torch.randn(2, 6, 3, generator=gen, dtype=f64, requires_grad=True)
    v = torch.randn(2, 6, 2, generator=gen, dtype=f64, requires_grad=True)
    a = torch.tensor([[0.2], [0.3]], dtype=f64, requires_grad=True)
    b = torch.full((2, 4), 0.8, dtype=f64, requires_grad=True)
    t = torch.tensor(0.45, dtype=f64, requires_grad=True)
    mask = torch.rand(2, 4, 6, generator=gen) > 0.2

    def fn(q, k, v, a, b, t):
        out, stats = simwarp.warp_attend(
            q, k, v, metric=metric, step=step, a=a, b=b, t=t, mask=mask, impl=impl, chunk_size=4, return_stats=True
        )
        return out, stats.lse.masked_fill(stats.empty, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v, a, b, t))


@pytest.mark.parametrize("roles", ["qqq", "qqv", "qkq", "qkk"])
@pytest.mark.parametrize("plain", [False, True])
def test_chunked_gradients_of_one_tensor_in_several_roles(roles, plain):
    """Self-attention passes one tensor as q, k and v; the chunked function takes each distinct
    tensor once (torch.compile cannot trace one given twice) and sums its roles' gradients.
    Against dense, float64, on the mask form and on the general path (a user step)."""
    gen = torch.Generator().manual_seed(3)
    x, y, z = (torch.randn(2, 7, 4, generator=gen, dtype=f64, requires_grad=True) for _ in range(3))
    pick = {"q": x, "k": y, "v": z}
    kw = {"metric": "l2", "step": _plain_step("poly") if plain else "poly", "causal": True, "a": 0.2}
    grads = []
    for impl in ("dense", "chunked"):
        q, k, v = (pick[r] for r in roles)
        out = simwarp.warp_attend(q, k, v, impl=impl, chunk_size=3, **kw)
        grads.append(torch.autograd.grad(out.pow(2).sum(), (x, y, z), allow_unused=True, materialize_grads=True))
    for gc, gd in zip(*grads):
        torch.testing.assert_close(gc, gd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_detach_range_drops_only_the_range_gradient(impl):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(5, 4, generator=gen, dtype=f64, requires_grad=True)
    k = torch.randn(9, 4, generator=gen, dtype=f64, requires_grad=True)
    v = torch.randn(9, 2, generator=gen, dtype=f64)
    full = torch.autograd.grad(simwarp.warp_attend(q, k, v, impl=impl, chunk_size=3).sum(), q)[0]
    det = torch.autograd.grad(simwarp.warp_attend(q, k, v, impl=impl, chunk_size=3, detach_range=True).sum(), q)[0]
    ref = torch.autograd.grad(simwarp.warp_attend(q, k, v, impl="dense", detach_range=True).sum(), q)[0]
    torch.testing.assert_close(det, ref)
    assert not torch.allclose(full, det)


# ----------------------------------------------------------------------------- degenerate rows


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("step", STEPS)
def test_degenerate_rows(impl, step):
    d = 3
    k = torch.randn(6, d, dtype=f64)
    k[1] = k[0]
    v = torch.randn(6, 2, dtype=f64, requires_grad=True)
    q = torch.randn(4, d, dtype=f64)
    q[0] = 0.0  # dot with zero query: all similarities equal -> uniform
    q = q.requires_grad_()
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    mask[1, 3] = True  # a single valid key
    mask[2] = False  # no valid key
    out, stats = simwarp.warp_attend(q, k, v, step=step, mask=mask, impl=impl, chunk_size=2, return_stats=True)
    torch.testing.assert_close(out[0], v.detach().mean(0))
    torch.testing.assert_close(out[1], v.detach()[3])
    assert torch.equal(out[2], torch.zeros(2, dtype=f64))
    assert stats.empty.tolist() == [False, False, True, False]
    assert stats.kept[:3].tolist() == [6.0, 1.0, 0.0]
    assert stats.lse[2] == -math.inf
    gq, gv = torch.autograd.grad(out.sum() + stats.lse.masked_fill(stats.empty, 0).sum(), (q, v))
    assert torch.isfinite(gq).all() and torch.isfinite(gv).all()
    assert torch.equal(gq[2], torch.zeros(d, dtype=f64))


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("step", ["sigmoidal", "log", "poly"])
def test_kept_counts_the_support_whether_or_not_the_mask_underflows(impl, step):
    """Sharp steps give keys just inside the support a mask below float32's range. ``kept``
    counts them all the same: on the mask form (own range), on the log form (a range fixed by
    the caller, as in a sharded bank) and in float64. The mask form counted ``m > 0``: 479
    against 484 for the sigmoidal step at t = 0.05, 447 against 585 for the log step."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, e, generator=gen) for n, e in ((5, 4), (40, 4), (40, 2)))
    a, b, t = (0.3, 0.9, 0.995) if step == "log" else (0.3, 0.9, 0.05)
    kw = dict(step=step, a=a, b=b, t=t, impl=impl, chunk_size=7, return_stats=True)
    _, own = simwarp.warp_attend(q, k, v, **kw)
    _, fixed = simwarp.warp_attend(q, k, v, row_range=(own.lo, own.hi), **kw)
    s = simwarp.pairwise_similarity(q.double(), k.double())
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    u = (s - lo) / (hi - lo)
    start = {"sigmoidal": a, "log": 0.0, "poly": (a + b) / 2 - t * (b - a) / 2}[step]
    support = (u > start).sum(-1).float()
    if step == "sigmoidal":
        assert (torch.sigmoid(torch.log((u - a) / (b - u)) / t) < 2.0**-126).logical_and(u > a).any()  # m underflows
    assert torch.equal(own.kept, support) and torch.equal(fixed.kept, support)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_scores_give_nan_rows_not_empty_ones(impl, step, bad):
    """A query with an inf or NaN feature (an fp16 overflow upstream) has ±inf / NaN scores:
    its row is NaN, as in SDPA, and not flagged empty. The chunked pass 1 took a -inf minimum
    for its start value: the row was flagged empty and step "none" gave it finite values."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, n, 3, generator=gen, dtype=f64) for n in (3, 6, 6))
    q[1, 1, 2] = bad
    out, stats = simwarp.warp_attend(q, k, v, step=step, impl=impl, chunk_size=4, return_stats=True)
    assert torch.isnan(out[1, 1]).all() and not stats.empty.any()
    # no kept count on that row (each path counted its own way: 0, every key, or some)
    assert stats.lse[1, 1].isnan() and stats.kept[1, 1].isnan() and not stats.kept[~stats.lse.isnan()].isnan().any()
    # the same with a fixed range (the general path: its lse was inf for an inf score)
    out, stats = simwarp.warp_attend(q, k, v, step=step, impl=impl, chunk_size=4, return_stats=True, row_range=(-9.0, 9.0))
    assert torch.isnan(out[1, 1]).all() and stats.lse[1, 1].isnan() and stats.kept[1, 1].isnan()
    rest = torch.ones(4, 3, dtype=torch.bool)
    rest[1, 1] = False
    assert torch.isfinite(out[rest]).all()


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_rows_with_a_range_too_small_to_divide_by_are_flat(impl, dtype):
    """Similarities a subnormal distance apart (a range whose reciprocal overflows) make a flat
    row, uniform weights over its keys, never NaN; a normal tiny range still normalises."""
    tiny = torch.finfo(dtype).tiny
    x = 1e-20 if dtype == torch.float32 else 1e-160  # similarities x² · (1, 3, 2): subnormal
    q = torch.tensor([[x]], dtype=dtype)
    v = torch.tensor([[0.0], [1.0], [2.0]], dtype=dtype)
    cases = (
        (q, torch.tensor([[x], [3 * x], [2 * x]], dtype=dtype), 1.0),  # flat: the mean of v
        (torch.ones(1, 1, dtype=dtype), torch.tensor([[0.0], [4 * tiny], [2 * tiny]], dtype=dtype), 4 / 3),  # u = 0, 1, 1/2
    )
    for query, keys, expected in cases:
        out, stats = simwarp.warp_attend(query, keys, v, scale=1.0, impl=impl, chunk_size=2, return_stats=True)
        assert out.item() == pytest.approx(expected, rel=1e-6), keys
        assert not stats.empty.any() and stats.kept.item() >= 1


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("step", ["sigmoidal", "log", "poly"])
def test_a_range_that_overflows_is_still_normalised(impl, step):
    """Similarities of ±1.8e38 overflow hi − lo in float32: 1/(hi − lo) was 0, so sigmoidal's
    (s − hi) · 0 = −inf · 0 gave a NaN row and the other steps dropped every key. The factor is
    now (1/2)/(hi/2 − lo/2): u = 0, 1 and 1/2 as in any row."""
    q = torch.ones(1, 1)
    k = torch.tensor([[1.8e38], [-1.8e38], [1.0]])
    for kk in (k, k.double()):
        out = simwarp.warp_attend(q.to(kk.dtype), kk, torch.eye(3, dtype=kk.dtype), scale=1.0, step=step, impl=impl,
                                  chunk_size=2, a=0.3, b=0.7)
        torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0]], dtype=kk.dtype))  # the best key takes it all
    u = simwarp.backend.common.normalized_range(k.T, k.min().view(1, 1), k.max().view(1, 1))
    torch.testing.assert_close(u, torch.tensor([[1.0, 0.0, 0.5]]))


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_a_band_narrower_than_the_dtype_resolves_gives_no_nan(impl, dtype):
    """Per-row factors 1/(t (b − a)) and 1/(hi − lo) / (b − a) overflowed: poly's output and the
    gradients of both steps were NaN at t = 1e-36 (0 · inf), and a row of range ~1e-35 with
    b − a = 1e-4 came out NaN where the same range passed as row_range was right."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(r, c, generator=gen, dtype=f64) for r, c in ((2, 4), (5, 4), (5, 2)))
    tiny_t = 1e-36 if dtype == torch.float32 else 1e-300
    for step in ("poly", "sigmoidal"):
        want = simwarp.warp_attend(q, k, v, step=step, a=0.5, b=0.5001, t=tiny_t, impl="dense")  # float64
        qx = q.to(dtype).requires_grad_()
        out = simwarp.warp_attend(qx, k.to(dtype), v.to(dtype), step=step, a=0.5, b=0.5001, t=tiny_t, impl=impl, chunk_size=2)
        (g,) = torch.autograd.grad(out.sum(), qx)
        assert torch.isfinite(g).all(), step
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    # a subnormal t: ln2/t and 1/t overflow in the sigmoidal ∂t, which keys outside the band met as 0 · inf
    t = torch.tensor(1e-40 if dtype == torch.float32 else 1e-310, dtype=dtype, requires_grad=True)
    out = simwarp.warp_attend(q.to(dtype), k.to(dtype), v.to(dtype), step="sigmoidal", a=0.5, b=0.9, t=t, impl=impl, chunk_size=2)
    assert torch.isfinite(torch.autograd.grad(out.sum(), t)[0])
    magnitude, b = (1e-36, 0.5001) if dtype == torch.float32 else (1e-300, 0.5 + 1e-10)
    q_small = (q * magnitude).to(dtype)
    out, stats = simwarp.warp_attend(q_small, k.to(dtype), v.to(dtype), a=0.5, b=b, scale=1.0, impl=impl, chunk_size=2,
                                     return_stats=True)
    fixed = simwarp.warp_attend(q_small, k.to(dtype), v.to(dtype), a=0.5, b=b, scale=1.0, impl=impl, chunk_size=2,
                                row_range=(stats.lo, stats.hi))
    assert torch.isfinite(out).all() and (stats.kept < 5).all()  # the band drops keys, as it should
    torch.testing.assert_close(out, fixed)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("step", ["poly", "log", "sigmoidal"])
def test_a_masked_key_far_outside_a_tiny_range_gives_no_nan_gradient(impl, step):
    """A masked key's u = (s − lo)/(hi − lo) overflowed to ±inf on a row of tiny range; its zero
    gradient met that inf in the range and parameter sums (0 · inf): NaN dq, dk, da, db."""
    for dtype, z in ((torch.float32, 1e-18), (f64, 1e-154)):
        q = torch.zeros(1, 2, dtype=dtype, requires_grad=True)
        k = torch.tensor([[0.0, 0.0], [z, 0.0], [1e3, 0.0]], dtype=dtype, requires_grad=True)  # s = 0, −z², −1e6
        v = torch.tensor([[1.0], [2.0], [3.0]], dtype=dtype)
        a, b = (torch.tensor(x, dtype=dtype, requires_grad=True) for x in (0.2, 0.8))
        mask = torch.tensor([[True, True, False]])
        out = simwarp.warp_attend(q, k, v, a=a, b=b, mask=mask, metric="sqeuclidean", step=step, impl=impl, chunk_size=2)
        grads = torch.autograd.grad(out.sum(), (q, k, a, b), allow_unused=True, materialize_grads=True)
        assert all(torch.isfinite(g).all() for g in grads), (dtype, [g.tolist() for g in grads])
        # the same with a fixed range: the far key valid in row 0, masked in row 1
        q2, k2 = torch.ones(2, 1, dtype=dtype), torch.tensor([[-1e10], [0.0], [2.0]], dtype=dtype)
        lo, hi = torch.tensor([-1e10, -1e-37], dtype=dtype), torch.tensor([2.0, 0.0], dtype=dtype)
        a2, b2 = (torch.tensor(x, dtype=dtype, requires_grad=True) for x in (0.2, 0.8))
        out = simwarp.warp_attend(q2, k2, k2.abs() + 1, a=a2, b=b2, step=step, scale=1.0, row_range=(lo, hi), impl=impl,
                                  mask=torch.tensor([[True, True, True], [False, True, False]]))
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (a2, b2), materialize_grads=True))


@pytest.mark.parametrize("step", ["sigmoidal", "none"])
def test_a_nan_query_row_has_a_nan_lse_on_both_paths(step):
    """The chunked path reported lse = -inf, the mark of a row without a valid key, for a NaN row."""
    q, k, v = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 2)
    q[1, 0] = math.nan
    for impl in ("dense", "chunked"):
        out, stats = simwarp.warp_attend(q, k, v, step=step, impl=impl, return_stats=True)
        assert out[1].isnan().all() and stats.lse[1].isnan() and torch.isfinite(stats.lse[0]), impl


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("metric", ["l2", "sqeuclidean"])
def test_distances_far_from_the_origin_through_the_backend(metric, impl):
    """float32 features at 1000 ± 1: outputs, range and gradients as float64 computes them
    (before, the squared norms' rounding was the size of the distances)."""
    gen = torch.Generator().manual_seed(1)
    q = (1000.0 + torch.randn(2, 30, 6, generator=gen, dtype=f64)).float()
    k = (1000.0 + torch.randn(1, 45, 6, generator=gen, dtype=f64)).float()  # broadcast over the batch
    v = torch.randn(45, 3, generator=gen, dtype=f64).float()
    kw = dict(metric=metric, step="sigmoidal", a=0.2, b=0.8, t=0.5, return_stats=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, stats = simwarp.warp_attend(*leaves, impl=impl, chunk_size=7, **kw)
    out.sum().backward()
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_stats = simwarp.warp_attend(*ref_leaves, impl="dense", **kw)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(stats.lo.double(), ref_stats.lo, atol=1e-3, rtol=1e-4)
    for x, rx in zip(leaves, ref_leaves):
        torch.testing.assert_close(x.grad.double(), rx.grad, atol=1e-3 * rx.grad.abs().max().item(), rtol=0)


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean", "dot", "l2"])
def test_one_broadcast_query_row_against_batched_keys_with_leave_one_out(metric):
    """q (1, d) against k (2, m, d): matmul returned a view, and the dense path's in-place write
    of the leave-one-out diagonal raised autograd's "Output 0 of _Gram is a view" error."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, generator=gen, dtype=f64, requires_grad=True)
    k, v = torch.randn(2, 9, 4, generator=gen, dtype=f64), torch.randn(9, 2, generator=gen, dtype=f64)
    outs = [simwarp.warp_attend(q, k, v, metric=metric, exclude_self=True, impl=impl) for impl in ("dense", "chunked")]
    grads = [torch.autograd.grad(out.sum(), q)[0] for out in outs]
    assert outs[0].shape == (2, 1, 2)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, f64])
def test_cosine_zero_rows_have_zero_gradient(impl, dtype):
    """A zero (padding, dead-ReLU) embedding has no direction: its cosine is 0 with gradient 0
    (F.normalize's would be 1/eps = 1e12, inf in float16), and the other rows are unaffected."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, generator=gen, dtype=f64)
    q[1] = 0.0
    k = torch.randn(5, 4, generator=gen, dtype=f64)
    k[2] = 0.0
    v = torch.randn(5, 2, generator=gen, dtype=f64)
    qx, kx = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    out = simwarp.warp_attend(qx, kx, v.to(dtype), metric="cosine", impl=impl, chunk_size=2)
    gq, gk = torch.autograd.grad(out.float().sum(), (qx, kx))
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all()
    assert torch.equal(gq[1], torch.zeros_like(gq[1])) and torch.equal(gk[2], torch.zeros_like(gk[2]))
    torch.testing.assert_close(out[1].double(), v.mean(0), atol=2e-3, rtol=0)  # flat row: uniform weights
    s = simwarp.pairwise_similarity(q, k, metric="cosine")
    assert torch.equal(s[1], torch.zeros(5, dtype=f64)) and torch.equal(s[:, 2], torch.zeros(3, dtype=f64))
    torch.testing.assert_close(s[0], torch.nn.functional.cosine_similarity(q[:1], k, dim=-1).masked_fill(torch.arange(5) == 2, 0))


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_leave_one_out_l2_with_duplicates_trains_without_nan(impl):
    z = torch.randn(8, 4, dtype=f64)
    z[3] = z[2]  # zero distance between two different rows as well as on the diagonal
    z.requires_grad_()
    y = torch.randn(8, 1, dtype=f64)
    out = simwarp.warp_attend(z, z, y, metric="l2", exclude_self=True, impl=impl, chunk_size=3)
    (g,) = torch.autograd.grad((out - y).pow(2).mean(), z)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e6, 1e15])
def test_huge_and_tiny_magnitudes(impl, magnitude):
    q = (torch.randn(3, 5, 4) * magnitude).requires_grad_()
    k = torch.randn(3, 7, 4) * magnitude
    v = torch.randn(3, 7, 2)
    for metric in METRICS:
        out = simwarp.warp_attend(q, k, v, metric=metric, impl=impl, chunk_size=3)
        (g,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), metric


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_float32_matches_float64_at_loss_scale(impl, step, temperature):
    """Float32 weights and gradients against float64 where similarities are large (squared
    distances of unnormalised embeddings, as in metric learning) and the row's own key is
    excluded: the mask form's exponent and the leave-one-out diagonal must not lose precision."""
    gen = torch.Generator().manual_seed(11)
    x64 = torch.randn(48, 16, generator=gen, dtype=f64) * 3
    kw = {"metric": "sqeuclidean", "step": step, "temperature": temperature, "exclude_self": True}
    w64 = simwarp.warp_weights(x64, x64, impl=impl, chunk_size=16, **kw) if impl == "dense" else None
    probe = torch.randn(48, 3, generator=gen, dtype=f64)
    outs, grads = [], []
    for dtype in (f64, torch.float32):
        x = x64.to(dtype).requires_grad_()
        out = simwarp.warp_attend(x, x, probe.to(dtype), impl=impl, chunk_size=16, **kw)
        outs.append(out.double())
        grads.append(torch.autograd.grad(out.pow(2).sum(), x)[0].double())
    # float32 rounds each similarity by up to about eps·|s|, which moves the logits by that over τ
    # (8e-4 at τ = 0.05 here, whatever the distances' origin): the weights' own float32 limit
    logit_error = 2.0**-24 * float((torch.cdist(x64, x64) ** 2).max()) / temperature
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=max(1e-5, logit_error))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3 * float(grads[0].abs().max()))
    if w64 is not None:
        assert torch.equal(w64.diagonal(), torch.zeros(48, dtype=f64))
        torch.testing.assert_close(w64.sum(-1), torch.ones(48, dtype=f64))


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(impl, dtype):
    gen = torch.Generator().manual_seed(3)
    q64, k64, v64 = (torch.randn(2, n, 8, generator=gen, dtype=f64) for n in (5, 9, 9))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q64, k64, v64))
    out = simwarp.warp_attend(q, k, v, causal=True, impl=impl, chunk_size=4)
    assert out.dtype == dtype
    ref = simwarp.warp_attend(*(x.detach().to(f64) for x in (q, k, v)), causal=True, impl="dense")
    torch.testing.assert_close(out.to(f64), ref, atol=3e-2, rtol=3e-2)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_mask_with_leading_dims_only_v_has(impl):
    q, k, v = torch.randn(4, 3, dtype=f64), torch.randn(5, 3, dtype=f64), torch.randn(2, 5, 2, dtype=f64)
    mask = torch.rand(2, 4, 5) > 0.3
    out = simwarp.warp_attend(q, k, v, mask=mask, impl=impl, chunk_size=2)
    for i in range(2):
        torch.testing.assert_close(out[i], simwarp.warp_attend(q, k, v[i], mask=mask[i], impl="dense"))


def test_empty_inputs():
    q, k, v = torch.randn(2, 0, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    assert simwarp.warp_attend(q, k, v).shape == (2, 0, 3)
    out, stats = simwarp.warp_attend(torch.randn(2, 4, 4), k[:, :0], v[:, :0], return_stats=True)
    assert torch.equal(out, torch.zeros(2, 4, 3)) and stats.empty.all()


@pytest.mark.parametrize("rows, keys", [(0, 5), (4, 0)])
def test_empty_calls_keep_every_input_in_the_graph(rows, keys):
    """A backward through a call without rows or keys reaches every input (zero gradients, never
    None): DDP expects every parameter to get a gradient, and a gather's backward collective
    must run on a rank with no rows. Huge, infinite or NaN inputs must not reach the zeros."""
    q = torch.full((rows, 3), 3e38)
    q[:1, 0] = math.inf
    q[1:2, 1] = math.nan
    q.requires_grad_()
    k = torch.full((keys, 3), 3e38).requires_grad_()
    v = torch.randn(keys, 2, requires_grad=True)
    a, b, t = (torch.full((rows,), x, requires_grad=True) for x in (0.2, 0.8, 0.5))
    out = simwarp.warp_attend(q, k, v, a=a, b=b, t=t, metric="cosine")
    assert torch.equal(out, torch.zeros(rows, 2))
    w = simwarp.warp_weights(q, k, a=a, b=b, t=t, metric="cosine")
    assert torch.equal(w, torch.zeros(rows, keys))
    grads = torch.autograd.grad((out.sum() + w.sum()), (q, k, v, a, b, t), allow_unused=False)
    for x, g in zip((q, k, v, a, b, t), grads):
        assert torch.equal(g, torch.zeros_like(x))


def test_auto_picks_dense_for_small_and_chunked_for_large(monkeypatch):
    import simwarp.backend as backend

    calls = []
    monkeypatch.setattr(backend, "chunked_warp_attend", lambda *a, **kw: calls.append("chunked") or (a[0][..., :1],) * 6)
    monkeypatch.setattr(backend, "dense_warp_attend", lambda *a, **kw: calls.append("dense") or (a[0][..., :1], None))
    small = torch.randn(4, 3)
    simwarp.warp_attend(small, small, small)
    big_n = int(math.isqrt(DENSE_AUTO_LIMIT)) + 1
    big = torch.randn(big_n, 2)
    simwarp.warp_attend(big, big, big)
    simwarp.warp_attend(big, big, big, metric="l1")
    assert calls == ["dense", "chunked", "dense"]


def test_auto_falls_back_to_chunked_when_fused_kernels_fail(monkeypatch):
    pytest.importorskip("triton")
    import simwarp.backend as backend
    import simwarp.backend.triton as fused

    def broken(*args, **kwargs):
        raise RuntimeError("PTX compile error")

    q, k, v = torch.randn(5, 4, dtype=f64), torch.randn(7, 4, dtype=f64), torch.randn(7, 2, dtype=f64)
    reference = simwarp.warp_attend(q, k, v, impl="dense")
    monkeypatch.setattr(backend, "_choose_impl", lambda *a, **k: "triton")
    monkeypatch.setattr(fused, "triton_warp_attend", broken)
    with pytest.warns(RuntimeWarning, match="falls back to the chunked backend"):
        out = simwarp.warp_attend(q, k, v)
    torch.testing.assert_close(out, reference)
    with pytest.raises(RuntimeError, match="PTX"):
        simwarp.warp_attend(q, k, v, impl="triton")


def test_fused_dropout_is_opt_in_under_auto_and_row_range_stays_chunked(monkeypatch):
    pytest.importorskip("triton")
    import simwarp.backend as backend
    import simwarp.backend.triton as fused

    calls = []

    def spy(q, k, v, a, b, t, mask, spec, **kwargs):
        calls.append(kwargs["dropout_p"])
        return backend.dense_warp_attend(q, k, v, a, b, t, mask, spec, kwargs["dropout_p"])

    q, k, v = torch.randn(5, 4, dtype=f64), torch.randn(7, 4, dtype=f64), torch.randn(7, 2, dtype=f64)
    monkeypatch.setattr(backend, "_choose_impl", lambda *a, **k: "triton")
    monkeypatch.setattr(fused, "triton_warp_attend", spy)
    simwarp.warp_attend(q, k, v, impl="triton", dropout_p=0.5)
    simwarp.warp_attend(q, k, v, dropout_p=0.25)  # auto: chunked until the fused dropout ran on a GPU
    assert calls == [0.5]
    monkeypatch.setattr(backend, "FUSED_DROPOUT_BY_DEFAULT", True)
    simwarp.warp_attend(q, k, v, dropout_p=0.25)
    simwarp.warp_attend(q, k, v)
    assert calls == [0.5, 0.25, 0.0]
    simwarp.warp_attend(q, k, v, row_range=(-1.0, 1.0))  # auto: the chunked path
    assert calls == [0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="row_range"):
        simwarp.warp_attend(q, k, v, impl="triton", row_range=(-1.0, 1.0))


def test_fused_kernels_refuse_a_triton_older_than_they_support(monkeypatch):
    """Triton before 3.6 aborts the process compiling the kernels for Hopper GPUs (3.0, 3.1), cannot
    run them in the interpreter (before 3.5) or was never checked with them: "auto" keeps the
    PyTorch paths and impl="triton" says why."""
    triton = pytest.importorskip("triton")
    import simwarp.backend as backend
    import simwarp.backend.triton as fused

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend._triton_available(torch.device("cpu")) == (fused.version_problem() is None)
    assert fused.version_problem("3.6.0") is None and fused.version_problem("3.10.0+git1a2b") is None
    assert "triton 3.5.1 is older than 3.6" in fused.version_problem("3.5.1")
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    assert not backend._triton_available(torch.device("cuda"))
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run: triton 3.1.0 is older than 3.6.*upgrade torch"):
        simwarp.warp_attend(q, q, q, impl="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"impl='triton' cannot run: they need CUDA tensors .* got device cpu"):
        simwarp.warp_attend(q, q, q, impl="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("grad", [True, False])
def test_auto_keeps_16_bit_l2_training_off_the_fused_backward(monkeypatch, dtype, metric, grad):
    """The fused backward rounds its gradient coefficients to the input dtype; for l2 they carry
    1/distance, which overflows float16 near neighbours (inf gradients): "auto" takes the
    float32 PyTorch path for that case only."""
    pytest.importorskip("triton")
    import simwarp.backend as backend
    import simwarp.backend.triton as fused
    from simwarp.backend.common import make_spec

    monkeypatch.setattr(backend, "_triton_available", lambda device: True)
    monkeypatch.setattr(fused, "supports", lambda *args: True)
    spec = make_spec(metric, None, "sigmoidal", 1.0, False, False, False)
    q, k, v = (torch.randn(4, 8, dtype=dtype, requires_grad=grad) for _ in range(3))
    chosen = backend._choose_impl("auto", metric, 16, torch.device("cuda"), spec=spec, tensors=(q, k, v))
    imprecise = metric == "l2" and dtype == torch.float16 and grad
    assert chosen == ("dense" if imprecise else "triton")
    with torch.no_grad():  # inference has no backward: the kernels are fine
        assert backend._choose_impl("auto", metric, 16, torch.device("cuda"), spec=spec, tensors=(q, k, v)) == "triton"


# ----------------------------------------------------------------------------- errors


def _qkv():
    return torch.randn(2, 4, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 2)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q, k, v: dict(q=q.numpy()), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: dict(q=q[0, 0]), ValueError, r"q must have shape"),
        (lambda q, k, v: dict(k=torch.randn(2, 5, 4)), ValueError, r"must share d.*\(2, 4, 3\).*\(2, 5, 4\)"),
        (lambda q, k, v: dict(v=torch.randn(2, 6, 2)), ValueError, r"must share m"),
        (lambda q, k, v: dict(v=v.double()), TypeError, "share a dtype"),
        (lambda q, k, v: dict(q=q.long()), TypeError, "floating-point"),
        (lambda q, k, v: dict(k=torch.randn(3, 5, 3)), ValueError, "do not broadcast"),
        (lambda q, k, v: dict(metric="hamming"), ValueError, "metric must be one of"),
        (lambda q, k, v: dict(step="hard"), ValueError, "step must be one of"),
        (lambda q, k, v: dict(impl="fast"), ValueError, "impl must be one of"),
        (lambda q, k, v: dict(q=torch.randn(2, 6, 3), exclude_self=True), ValueError, "exclude_self=True needs"),
        (lambda q, k, v: dict(exclude_self=True, self_offset=2), ValueError, r"n \+ self_offset <= m"),
        (lambda q, k, v: dict(self_offset=1), ValueError, "needs exclude_self=True"),
        (lambda q, k, v: dict(exclude_self=True, self_offset=-1), ValueError, "non-negative int"),
        (lambda q, k, v: dict(mask=torch.ones(4, 4, dtype=torch.bool)), ValueError, r"mask of shape \(4, 4\)"),
        (lambda q, k, v: dict(mask=torch.ones(4, 5)), TypeError, "bool tensor"),
        (lambda q, k, v: dict(a=1.5), ValueError, r"a must lie in"),
        (lambda q, k, v: dict(a=0.6, b=0.5), ValueError, "a must be smaller than b"),
        (lambda q, k, v: dict(a=torch.full((4,), 0.5), b=0.5), ValueError, "a must be smaller than b"),
        (lambda q, k, v: dict(a=torch.zeros(4)), ValueError, "a must lie in"),
        (lambda q, k, v: dict(t=torch.zeros(4)), ValueError, "t must lie in"),
        (lambda q, k, v: dict(t=torch.tensor([0.5, 1.0])), ValueError, "does not broadcast|t must lie"),
        (lambda q, k, v: dict(b=torch.full((3,), 0.9)), ValueError, r"b of shape \(3,\)"),
        (lambda q, k, v: dict(a="0.1"), TypeError, "a must be a float"),
        (lambda q, k, v: dict(temperature=0.0), ValueError, "temperature"),
        (lambda q, k, v: dict(temperature=1e-40), ValueError, "temperature must be at least"),
        (lambda q, k, v: dict(temperature=3e-39), ValueError, "temperature must be at least"),  # gave NaN
        (lambda q, k, v: dict(scale=-1.0), ValueError, "scale"),
        (lambda q, k, v: dict(scale=1e-300), ValueError, "scale must be between"),  # every row flat in float32
        (lambda q, k, v: dict(metric="sqeuclidean", scale=2e38), ValueError, "scale must be between"),  # 2·scale: inf
        (lambda q, k, v: dict(k=k[:, :0], v=v[:, :0], impl="fast"), ValueError, "impl must be one of"),  # no keys
        (lambda q, k, v: dict(chunk_size=0), ValueError, "chunk_size"),
        (lambda q, k, v: dict(metric="l1", impl="chunked"), ValueError, "only available with impl='dense'"),
        (lambda q, k, v: dict(impl="triton"), ValueError, "triton"),
        # (torch's "new(): invalid data type 'str'", and a complex range cast to real with a warning)
        (lambda q, k, v: dict(row_range=("a", "b")), TypeError, r"row_range\[0\] \(lo\) must hold real numbers .* got str"),
        (lambda q, k, v: dict(row_range=(0.0, torch.ones(4, dtype=torch.complex64))), TypeError, r"row_range\[1\] \(hi\).*complex64"),
        (lambda q, k, v: dict(row_range=(0.0,)), TypeError, r"row_range must be a \(lo, hi\) pair"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, error, match):
    q, k, v = _qkv()
    kwargs = dict(q=q, k=k, v=v)
    kwargs.update(change(q, k, v))
    args = [kwargs.pop(x) for x in ("q", "k", "v")]
    with pytest.raises(error, match=match):
        simwarp.warp_attend(*args, **kwargs)


@pytest.mark.parametrize("option,error", [(dict(impl="fast"), "impl must be one of"), (dict(chunk_size=0), "chunk_size")])
def test_warp_weights_checks_the_backend_options_it_ignores(option, error):
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=error):
        simwarp.warp_weights(q, k, **option)


# ----------------------------------------------------------------------------- warp_weights + properties


def test_warp_weights_matches_warp_attend():
    q, k = torch.randn(2, 6, 4, dtype=f64), torch.randn(2, 9, 4, dtype=f64)
    v = torch.randn(2, 9, 3, dtype=f64)
    w, stats = simwarp.warp_weights(q, k, metric="cosine", causal=True, return_stats=True)
    torch.testing.assert_close(w @ v, simwarp.warp_attend(q, k, v, metric="cosine", causal=True, impl="chunked", chunk_size=4))
    torch.testing.assert_close(stats.kept, (w > 0).sum(-1).to(f64))


@pytest.mark.parametrize("step", [*STEPS, "test_plain_sigmoidal"])
@pytest.mark.parametrize("mask_kind", ["none", "random", "self", "causal"])
def test_weights_at_columns_equal_gathered_weights(step, mask_kind):
    """warp_weights(columns=...) (its own backward on the mask-form path) == w.gather, values,
    stats and every gradient, with duplicated and padded columns and per-row parameters."""
    if step == "test_plain_sigmoidal":
        simwarp.register_step(step, sigmoidal_reference, overwrite=True)
    gen = torch.Generator().manual_seed(zlib.crc32(f"columns-{step}-{mask_kind}".encode()))
    batch, n, m, c = (2, 3), 5, 7, 4
    m = n if mask_kind == "self" else m
    q = torch.randn(*batch, n, 4, generator=gen, dtype=f64, requires_grad=True)
    k = torch.randn(batch[0], 1, m, 4, generator=gen, dtype=f64, requires_grad=True)
    a, b, t = _params("row", batch, n, gen)
    columns = torch.randint(0, m, (batch[1], n, c), generator=gen)  # broadcast over the first batch dim
    columns[..., -1] = columns[..., 0]  # a duplicate
    kw = dict(metric="sqeuclidean", step=step, a=a, b=b, t=t, temperature=0.7, return_stats=True)
    kw.update(_mask_kwargs(mask_kind, batch, n, m, gen))
    seed = torch.randn(*batch, n, c, generator=gen, dtype=f64)
    got, got_stats = simwarp.warp_weights(q, k, columns=columns, **kw)
    w, want_stats = simwarp.warp_weights(q, k, **kw)
    want = w.gather(-1, columns.expand(*batch, n, c))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for field in ("lse", "kept", "lo", "hi", "empty"):
        torch.testing.assert_close(getattr(got_stats, field), getattr(want_stats, field))
    leaves = (q, k, a, b, t)
    extra = 0.3 * got_stats.lse.masked_fill(got_stats.empty, 0.0).sum()
    g_got = torch.autograd.grad((got * seed).sum() + extra, leaves, allow_unused=True, materialize_grads=True)
    extra = 0.3 * want_stats.lse.masked_fill(want_stats.empty, 0.0).sum()
    g_want = torch.autograd.grad((want * seed).sum() + extra, leaves, allow_unused=True, materialize_grads=True)
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_columns_errors():
    q, k = torch.randn(3, 2), torch.randn(5, 2)
    with pytest.raises(TypeError, match="int64"):
        simwarp.warp_weights(q, k, columns=torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"columns of shape \(4, 2\)"):
        simwarp.warp_weights(q, k, columns=torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="m = 5 keys"):
        simwarp.warp_weights(q, k, columns=torch.full((3, 2), 5))
    assert simwarp.warp_weights(q, k, columns=torch.zeros(3, 0, dtype=torch.int64)).shape == (3, 0)


@st.composite
def _problem(draw):
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    a = draw(st.floats(0.01, 0.9))
    b = draw(st.floats(a + 0.01, 1.0))
    t = draw(st.floats(0.05, 0.95))
    metric = draw(st.sampled_from(METRICS))
    step = draw(st.sampled_from(STEPS))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 3, generator=gen, dtype=f64)
    k = torch.randn(m, 3, generator=gen, dtype=f64)
    mask = torch.rand(n, m, generator=gen) > 0.3
    return q, k, mask, dict(a=a, b=b, t=t, metric=metric, step=step)


@settings(max_examples=60, deadline=None)
@given(_problem())
def test_weight_properties(problem):
    q, k, mask, kw = problem
    w = simwarp.warp_weights(q, k, mask=mask, **kw)
    has_valid = mask.any(-1)
    torch.testing.assert_close(w.sum(-1), has_valid.to(f64))
    assert (w[~mask] == 0).all()
    s = simwarp.pairwise_similarity(q, k, kw["metric"])
    s_valid = s.masked_fill(~mask, -math.inf)
    best = s_valid.argmax(-1)
    rows = torch.nonzero(has_valid).squeeze(-1)
    assert (w[rows, best[rows]] > 0).all(), "the row's best key always survives"
    if kw["step"] in ("sigmoidal", "poly"):
        lo = s.masked_fill(~mask, math.inf).amin(-1, keepdim=True)
        hi = s_valid.amax(-1, keepdim=True)
        u = (s - lo) / (hi - lo)
        below = mask & (u <= kw["a"]) & (hi > lo)
        assert (w[below] == 0).all(), "exact zeros at or below a"
    perm = torch.randperm(k.shape[0])
    w_perm = simwarp.warp_weights(q, k[perm], mask=mask[:, perm], **kw)
    torch.testing.assert_close(w_perm, w[:, perm])


# ----------------------------------------------------------------------------- dropout


def test_chunked_dropout_forward_matches_its_mask_and_gradcheck():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 3, generator=gen, dtype=f64, requires_grad=True)
    k = torch.randn(2, 5, 3, generator=gen, dtype=f64, requires_grad=True)
    v = torch.randn(2, 5, 2, generator=gen, dtype=f64, requires_grad=True)
    a = torch.tensor(0.2, dtype=f64, requires_grad=True)
    p = 0.3

    torch.manual_seed(11)
    out = simwarp.warp_attend(q, k, v, a=a, impl="chunked", chunk_size=5, dropout_p=p)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, ()))
    keep = torch.rand((2, 4, 5), generator=torch.Generator().manual_seed(seed), dtype=f64) >= p
    w = simwarp.warp_weights(q, k, a=a)
    torch.testing.assert_close(out, (w * keep / (1 - p)) @ v)

    def fn(q, k, v, a):
        torch.manual_seed(11)  # same masks on every evaluation
        return simwarp.warp_attend(q, k, v, a=a, impl="chunked", chunk_size=3, dropout_p=p)

    assert torch.autograd.gradcheck(fn, (q, k, v, a))


@pytest.mark.parametrize("causal", [False, True])
def test_hashed_dropout_is_one_mask_whatever_the_blocks(causal, monkeypatch):
    """Under torch.compile the chunked path draws its masks as a hash of each weight's position
    (no generator to trace): every block width gives the dense result with that mask, and the
    backward replays it. Forced here in eager mode through the seed it draws."""
    monkeypatch.setattr(chunked, "_draw_seed", chunked._draw_hash_seed)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, n, e, generator=gen, dtype=f64) for n, e in ((9, 4), (11, 4), (11, 5)))
    a = torch.full((3, 1), 0.1, dtype=f64)
    p = 0.4
    torch.manual_seed(7)
    keep = chunked.hashed_keep(chunked._draw_hash_seed(torch.device("cpu")), p, torch.Size((2, 3, 9, 11)), rows=9)

    def reference(q, k, v, a):
        w = simwarp.warp_weights(q, k, a=a, causal=causal)
        return (w * keep / (1 - p)) @ v

    for chunk_size in (3, 4, 11):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, a)]
        torch.manual_seed(7)
        out = simwarp.warp_attend(*leaves[:3], a=leaves[3], causal=causal, impl="chunked", chunk_size=chunk_size, dropout_p=p)
        want_leaves = [x.clone().requires_grad_() for x in (q, k, v, a)]
        want = reference(*want_leaves)
        torch.testing.assert_close(out, want)
        for g, g_ref in zip(torch.autograd.grad(out.square().sum(), leaves), torch.autograd.grad(want.square().sum(), want_leaves)):
            torch.testing.assert_close(g, g_ref)

    def fn(q, k, v, a):
        torch.manual_seed(7)
        return simwarp.warp_attend(q, k, v, a=a, causal=causal, impl="chunked", chunk_size=4, dropout_p=p)

    assert torch.autograd.gradcheck(fn, [x.clone().requires_grad_() for x in (q[:1, :1], k[:1, :1], v[:1, :1], a[:1])])


def test_hashed_dropout_masks_are_uniform_and_independent():
    torch.manual_seed(0)
    seed = chunked._draw_hash_seed(torch.device("cpu"))
    keep = chunked.hashed_keep(seed, 0.25, torch.Size((4, 256, 512)), rows=256).double()
    assert abs(keep.mean().item() - 0.75) < 0.005
    # Each batch entry, row and key column keeps its share (binomial sd: 0.12 %, 0.96 %, 1.35 %).
    assert (keep.mean((1, 2)) - 0.75).abs().max() < 0.01
    assert (keep.mean((0, 2)) - 0.75).abs().max() < 0.06 and (keep.mean((0, 1)) - 0.75).abs().max() < 0.08
    flat = keep.reshape(-1, 512) - 0.75  # neighbouring rows and keys are uncorrelated
    assert (flat[:-1] * flat[1:]).mean().abs() < 0.005 and (flat[:, :-1] * flat[:, 1:]).mean().abs() < 0.005
    rows = torch.corrcoef(keep.reshape(-1, 512))  # and so are all pairs of rows (sd 1/sqrt(512))
    assert rows[~torch.eye(1024, dtype=torch.bool)].abs().max() < 7 / 512**0.5
    block = chunked.hashed_keep(seed, 0.25, torch.Size((4, 5, 7)), rows=256, row0=100, col0=300).double()
    torch.testing.assert_close(block, keep[:, 100:105, 300:307])
    other = chunked.hashed_keep(chunked._draw_hash_seed(torch.device("cpu")), 0.25, torch.Size((4, 256, 512)), rows=256)
    assert (other.double() != keep).double().mean() > 0.3


def test_log_weights_are_the_log_of_the_weights_and_stay_resolved():
    g = torch.Generator().manual_seed(0)
    for step in ("sigmoidal", "log", "poly", "none"):
        q, k = torch.randn(2, 5, 4, generator=g, dtype=f64), torch.randn(2, 7, 4, generator=g, dtype=f64)
        mask = torch.rand(2, 5, 7, generator=g) > 0.3
        mask[0, 1] = False  # a row without a valid key: all -inf
        kw = dict(step=step, mask=mask, a=0.2, b=0.8)
        log_w = simwarp.warp_weights(q, k, log=True, **kw)
        torch.testing.assert_close(log_w.exp(), simwarp.warp_weights(q, k, **kw))
        assert (log_w[0, 1] == -math.inf).all()
        assert torch.autograd.gradcheck(
            lambda q, k=k, kw=kw: simwarp.warp_weights(q, k, log=True, **kw).clamp_min(-1e3), (q.requires_grad_(),)
        )
    far = simwarp.warp_weights(torch.ones(1, 1), torch.tensor([[10.0], [0.0], [5.0]]), scale=1.0, temperature=0.01,
                               step="none", log=True)
    torch.testing.assert_close(far, torch.tensor([[0.0, -1000.0, -500.0]]))  # the weights underflow to 0 there


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_dropout_is_unbiased_and_validated(impl):
    q, k, v = torch.randn(4, 3, dtype=f64), torch.randn(6, 3, dtype=f64), torch.randn(6, 2, dtype=f64)
    ref = simwarp.warp_attend(q, k, v, impl="dense")
    mean = torch.stack([simwarp.warp_attend(q, k, v, impl=impl, dropout_p=0.5) for _ in range(400)]).mean(0)
    torch.testing.assert_close(mean, ref, atol=0.15, rtol=0)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\], got 1.5"):
        simwarp.warp_attend(q, k, v, dropout_p=1.5)


# ----------------------------------------------------------------------------- fixed row range


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("metric,step", [("dot", "sigmoidal"), ("l2", "log"), ("cosine", "poly")])
def test_row_range_combines_key_shards_exactly(impl, metric, step):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, 4, generator=gen, dtype=f64, requires_grad=True)
    k = torch.randn(2, 11, 4, generator=gen, dtype=f64)
    v = torch.randn(2, 11, 3, generator=gen, dtype=f64)
    mask = torch.rand(2, 6, 11, generator=gen) > 0.3
    kw = dict(metric=metric, step=step, a=0.3, b=0.7)
    full, full_stats = simwarp.warp_attend(q, k, v, mask=mask, impl="dense", detach_range=True, return_stats=True, **kw)
    parts = [slice(0, 4), slice(4, 4), slice(4, 11)]  # one shard empty
    ranges = [simwarp.warp_range(q, k[:, p], metric=metric, mask=mask[..., p], chunk_size=3) for p in parts]
    lo = torch.stack([r[0].masked_fill(r[2], math.inf) for r in ranges]).amin(0)
    hi = torch.stack([r[1].masked_fill(r[2], -math.inf) for r in ranges]).amax(0)
    torch.testing.assert_close(lo.masked_fill(full_stats.empty, 0), full_stats.lo)
    torch.testing.assert_close(hi.masked_fill(full_stats.empty, 0), full_stats.hi)
    outs, lses = [], []
    for p in parts:
        o, st = simwarp.warp_attend(q, k[:, p], v[:, p], mask=mask[..., p], row_range=(lo, hi), impl=impl,
                                    chunk_size=2, return_stats=True, **kw)
        outs.append(o)
        lses.append(st.lse)
    lse = torch.logsumexp(torch.stack(lses), 0)
    merged = sum(torch.exp(x - lse).nan_to_num(0.0).unsqueeze(-1) * o for x, o in zip(lses, outs))
    torch.testing.assert_close(merged, full)
    torch.testing.assert_close(lse, full_stats.lse)
    g_full = torch.autograd.grad(full.sum(), q)[0]
    g_merged = torch.autograd.grad(merged.sum(), q)[0]
    torch.testing.assert_close(g_merged, g_full)


def test_the_documented_range_recipe_scores_the_same_bits_under_auto():
    """warp_range streams key blocks; warp_attend(row_range=...) under "auto" took the dense
    path for small calls, whose one GEMM rounded some similarities otherwise: the row minimum
    got u ~ 1e-7 instead of 0, and the log step (infinite slope there) kept it (distributed's
    sharded banks with a chunk_size, found by an audit)."""
    gen = torch.Generator().manual_seed(7)
    k, v, q = torch.randn(11, 4, generator=gen), torch.randn(11, 3, generator=gen), torch.randn(9, 4, generator=gen)
    kw = dict(metric="cosine", step="log", t=0.3, scale=2.0)
    for chunk_size in (2, 5, None):
        lo, hi, _ = simwarp.warp_range(q, k, metric="cosine", scale=2.0, chunk_size=chunk_size)
        own, own_stats = simwarp.warp_attend(q, k, v, impl="chunked", chunk_size=chunk_size, return_stats=True, **kw)
        fixed, stats = simwarp.warp_attend(q, k, v, row_range=(lo, hi), chunk_size=chunk_size, return_stats=True, **kw)
        assert torch.equal(stats.kept, own_stats.kept) and (stats.kept == 10).all(), chunk_size  # the minimum dropped
        torch.testing.assert_close(fixed, own, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("step", ["sigmoidal", "log", "poly", "none"])
@pytest.mark.parametrize("mask_kind", ["random", "causal"])
def test_fixed_row_range_gradients_match_dense(step, mask_kind):
    """With a range fixed from outside the chunked backward takes the general path, where the
    built-in steps now use their closed forms (no autograd): every gradient against dense."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"fixed-{step}-{mask_kind}".encode()))
    q, k, v = _batched_qkv(gen, (2, 3), 7, 9, 4, 3)
    a, b, t = _params("row", (2, 3), 7, gen)
    lo, hi = -2.0 + 0.1 * torch.randn(2, 3, 7, generator=gen, dtype=f64), 2.5
    kw = dict(step=step, metric="l2", temperature=0.7, row_range=(lo, hi), **_mask_kwargs(mask_kind, (2, 3), 7, 9, gen))
    (out_d, _, grads_d), (out_c, _, grads_c) = (
        _run(q, k, v, (a, b, t), impl, **kw, **({"chunk_size": 2} if impl == "chunked" else {})) for impl in ("dense", "chunked")
    )
    torch.testing.assert_close(out_c, out_d, rtol=1e-10, atol=1e-12)
    for gc, gd in zip(grads_c, grads_d):
        torch.testing.assert_close(gc, gd, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("how", ["row_range", "user_step"])
@pytest.mark.parametrize("a", [0.05, 0.2, 0.35, 0.6])  # (u - a) · 1/(1 - a) is 1 - ulp for some
def test_the_best_key_sits_at_u_1_on_the_log_form_too(impl, how, a):
    """``s · inv + shift`` put the best key at u = 1 - ulp on the general path (a range fixed
    from outside, a user step): inside a sigmoidal band ending at b = 1, whose partials there
    are O(1), so dq was off (7.08 against 5.87 here). ``u = 1 + (s - hi)/(hi - lo)`` is exact
    at both ends; the gradients now equal the mask form's."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*shape, generator=gen, dtype=f64) for shape in ((1, 2), (4, 2), (4, 1)))
    kw = dict(metric="l2", a=a, b=1.0, t=0.99, temperature=0.05, impl=impl, chunk_size=1, detach_range=True)

    def grad_q(**extra):
        leaf = q.clone().requires_grad_()
        simwarp.warp_attend(leaf, k, v, **{**kw, **extra}).sum().backward()
        return leaf.grad

    if how == "row_range":
        lo, hi, _ = simwarp.warp_range(q, k, metric="l2")
        extra = {"row_range": (lo, hi)}
    else:
        extra = {"step": simwarp.register_step("test_user_sigmoidal", simwarp.steps.sigmoidal_log_mask, overwrite=True).name}
    torch.testing.assert_close(grad_q(**extra), grad_q(), rtol=1e-12, atol=1e-12)
    s = simwarp.pairwise_similarity(q, k, metric="l2")
    u, _ = simwarp.backend.common.unit_range(s, s.amin(-1, keepdim=True), s.amax(-1, keepdim=True))
    assert u.max() == 1.0 and u.min() == 0.0


@pytest.mark.parametrize("how", ["row_range", "user_step"])
def test_general_path_with_a_mask_batch_that_q_and_k_lack(how):
    """The chunked general path counted empty rows on the similarities' (q, k) batch: a mask
    (and v) with a leading dim of its own raised a RuntimeError; dense was fine."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 4, generator=gen, dtype=f64), torch.randn(5, 4, generator=gen, dtype=f64), torch.randn(2, 5, 1, generator=gen, dtype=f64)
    mask = torch.rand(2, 3, 5, generator=gen) > 0.3
    mask[1, 2] = False  # an empty row in one batch entry only
    extra = {"row_range": (-3.0, 3.0)} if how == "row_range" else {
        "step": simwarp.register_step("test_user_sigmoidal", simwarp.steps.sigmoidal_log_mask, overwrite=True).name
    }
    outs = [simwarp.warp_attend(q, k, v, mask=mask, impl=impl, chunk_size=2, return_stats=True, **extra) for impl in ("dense", "chunked")]
    (out_d, st_d), (out_c, st_c) = outs
    assert out_c.shape == (2, 3, 1)
    torch.testing.assert_close(out_c, out_d)
    assert torch.equal(st_c.empty, st_d.empty) and st_c.empty[1, 2] and not st_c.empty[0, 2]


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_warp_range_checks_chunk_size(chunk_size):
    """chunk_size=-1 returned every row empty; 0 and 2.5 failed inside range()."""
    q, k = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        simwarp.warp_range(q, k, chunk_size=chunk_size)


def test_row_range_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="row_range"):
        simwarp.warp_attend(q, k, v, row_range=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"row_range\[0\] \(lo\) of shape \(3,\)"):
        simwarp.warp_attend(q, k, v, row_range=(torch.zeros(3), 1.0))
    for bad in ((math.inf, -math.inf), (1.0, -1.0), (torch.tensor([0.0, math.nan, 0.0, 0.0]), 1.0)):
        with pytest.raises(ValueError, match="finite lo <= hi"):  # gave NaN rows silently
            simwarp.warp_attend(q, k, v, row_range=bad)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_parts_recipe_of_the_docs_keeps_rows_without_keys_zero(impl):
    """docs/backend.md's "Key sets in parts" recipe, with a row that no part has a key for."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 9, 4, generator=gen), torch.randn(2, 9, 3, generator=gen)
    mask = torch.rand(2, 5, 9, generator=gen) > 0.3
    mask[1, 2] = False
    parts = [slice(0, 4), slice(4, 9)]
    ranges = [simwarp.warp_range(q, k[:, p], mask=mask[..., p]) for p in parts]
    lo = torch.stack([r[0].masked_fill(r[2], torch.inf) for r in ranges]).amin(0)
    hi = torch.stack([r[1].masked_fill(r[2], -torch.inf) for r in ranges]).amax(0)
    empty = torch.isinf(lo)
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    outs = [simwarp.warp_attend(q, k[:, p], v[:, p], mask=mask[..., p], row_range=(lo, hi), impl=impl, return_stats=True)
            for p in parts]
    lse = torch.logsumexp(torch.stack([st.lse for _, st in outs]), 0)
    shift = lse.masked_fill(torch.isinf(lse), 0.0)
    out = sum(torch.exp(st.lse - shift).unsqueeze(-1) * o for o, st in outs)
    torch.testing.assert_close(out, simwarp.warp_attend(q, k, v, mask=mask, impl=impl))
    assert torch.equal(out[1, 2], torch.zeros(3))


@pytest.mark.parametrize("step", ["sigmoidal", "poly", "none"])
@pytest.mark.parametrize("mask_kind", ["none", "self", "causal", "random"])
def test_dense_without_stats_matches_with_stats(step, mask_kind):
    """Without return_stats the dense path may use PyTorch's fused softmax: same values and
    gradients as the stats path (which also yields the log-normaliser)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"nostats-{step}-{mask_kind}".encode()))
    q = torch.randn(2, 7, 4, generator=gen, dtype=f64, requires_grad=True)
    k = torch.randn(2, 7, 4, generator=gen, dtype=f64, requires_grad=True)
    v = torch.randn(2, 7, 3, generator=gen, dtype=f64)
    kw = {"step": step, "impl": "dense", "metric": "l2"}
    if mask_kind == "self":
        kw["exclude_self"] = True
    elif mask_kind == "causal":
        kw["causal"] = True
    elif mask_kind == "random":
        kw["mask"] = torch.rand(2, 7, 7, generator=gen) > 0.5
        kw["mask"][0, 3] = False  # a row without any valid key
    plain = simwarp.warp_attend(q, k, v, **kw)
    with_stats, _ = simwarp.warp_attend(q, k, v, return_stats=True, **kw)
    torch.testing.assert_close(plain, with_stats, rtol=1e-12, atol=1e-14)
    g_plain = torch.autograd.grad(plain.sum(), (q, k))
    g_stats = torch.autograd.grad(with_stats.sum(), (q, k))
    for x, y in zip(g_plain, g_stats):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(plain).all()


@pytest.mark.parametrize("step", ["sigmoidal", "log", "poly"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_step_parameter_gradients_with_frozen_inputs(step, exclude_self):
    """Only a, b, t learn (frozen embeddings): the warp node's parameter-only backward."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"frozen-{step}-{exclude_self}".encode()))
    q = torch.randn(7, 4, generator=gen, dtype=f64)
    k = q if exclude_self else torch.randn(9, 4, generator=gen, dtype=f64)
    v = torch.randn(k.shape[0], 2, generator=gen, dtype=f64)
    grads = []
    for impl in ("dense", "chunked"):
        a = torch.tensor(0.2, dtype=f64, requires_grad=True)
        b = torch.full((7,), 0.8, dtype=f64, requires_grad=True)
        t = torch.tensor(0.4, dtype=f64, requires_grad=True)
        out = simwarp.warp_attend(q, k, v, a=a, b=b, t=t, step=step, impl=impl, chunk_size=4, exclude_self=exclude_self)
        grads.append(torch.autograd.grad(out.sum(), (a, b, t), allow_unused=True, materialize_grads=True))
    for gd, gc in zip(*grads):
        torch.testing.assert_close(gd, gc, rtol=1e-9, atol=1e-12)
    assert grads[0][1].abs().sum() > 0


def test_resolve_params_devices():
    """A device given as a string or without an index matches the parameters' device; a
    parameter on another device is an error naming it."""
    from simwarp.backend.common import resolve_params

    a = torch.tensor(0.2)
    out = resolve_params(a, 0.8, None, batch=torch.Size(), n=3, dtype=torch.float32, device="cpu")
    assert all(x.device.type == "cpu" and x.dtype == torch.float32 for x in out)
    with pytest.raises(ValueError, match="a must be on the inputs' device"):
        resolve_params(torch.tensor(0.2, device="meta"), 0.8, None, batch=torch.Size(), n=3,
                       dtype=torch.float32, device=torch.device("cpu"))


def test_row_range_takes_tensors_floats_and_arrays():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)
    lo, hi, _ = simwarp.warp_range(q, k)
    want = simwarp.warp_attend(q, k, v, row_range=(lo, hi))
    for pair in ((lo.numpy(), hi.numpy()), (lo.tolist(), hi.tolist())):
        torch.testing.assert_close(simwarp.warp_attend(q, k, v, row_range=pair), want)
    with pytest.raises(TypeError, match=r"row_range\[0\] \(lo\) must hold real numbers .* got bool"):
        simwarp.warp_attend(q, k, v, row_range=(True, hi))


def test_float_params_are_checked_and_placed_on_any_device():
    """Python floats are validated on the host whatever the inputs' device (tensors on an
    accelerator are not: that would synchronise), and become one small tensor there."""
    from simwarp.backend.common import device_constants, resolve_params

    kw = dict(batch=torch.Size((2,)), n=3, dtype=torch.float64)
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError, match=r"a must lie in \(0.0, 1.0\), got 1.5"):
            resolve_params(1.5, None, None, device=device, **kw)
        with pytest.raises(ValueError, match=r"t must lie in"):
            resolve_params(None, None, float("nan"), device=device, **kw)
        with pytest.raises(ValueError, match="a must be smaller than b"):
            resolve_params(0.6, 0.5, None, device=device, **kw)
        a, b, t = resolve_params(0.25, 1.0, None, device=device, **kw)
        assert all(x.shape == () and x.dtype == torch.float64 and x.device.type == device for x in (a, b, t))
    a, b, t = resolve_params(0.25, torch.tensor([0.5, 0.75]).view(2, 1), 0.125, device="cpu", **kw)
    assert (float(a), float(t)) == (0.25, 0.125) and b.shape == (2, 1, 1)
    # tensors: 0-dim ones are read once for all checks, others checked elementwise (CPU only)
    for bad, match in (
        (dict(a=torch.tensor(1.5)), "a must lie in"),
        (dict(b=torch.tensor(0.0, dtype=torch.float64)), "b must lie in"),
        (dict(a=torch.tensor(0.6), b=0.5), "a must be smaller than b"),
        (dict(a=0.6, b=torch.tensor([[0.9], [0.5]])), "a must be smaller than b"),
        (dict(t=torch.tensor([[0.5], [1.0]])), "t must lie in"),
        # row tensors (a head's instance mode): one read for all checks, then the parameter is named
        (dict(a=torch.tensor([[0.2], [0.5]]), b=torch.tensor([[0.9], [0.5]]), t=torch.full((2, 1), 0.5)), "smaller than b"),
        (dict(a=torch.tensor([[0.2], [0.3]]), b=torch.tensor([[0.9], [1.5]]), t=torch.full((2, 1), 0.5)), "b must lie in"),
        (dict(a=torch.tensor([[0.2], [0.7]]), b=0.6, t=torch.tensor([[0.5], [math.nan]])), "t contains NaN"),
        (dict(a=torch.tensor([[0.2], [0.7]]), b=0.6), "smaller than b"),
    ):
        with pytest.raises(ValueError, match=match):
            resolve_params(*(bad.get(name) for name in "abt"), device="cpu", **kw)
    rows = resolve_params(torch.tensor([[0.2], [0.3]]), torch.ones(2, 1), torch.full((2, 1), 0.5), device="cpu", **kw)
    assert [tuple(x.shape) for x in rows] == [(2, 1, 1)] * 3  # b = 1 is inside
    # an empty parameter (no rows) does not hide another one's values
    empty = dict(kw, batch=torch.Size((0,)))
    with pytest.raises(ValueError, match="b must lie in"):
        resolve_params(torch.full((0, 3), 0.2), torch.tensor(1.5), torch.full((3,), 0.5), device="cpu", **empty)
    with pytest.raises(ValueError, match="t contains NaN"):
        resolve_params(torch.full((0, 3), 0.2), None, torch.tensor([0.5, math.nan, 0.5]), device="cpu", **empty)
    assert device_constants([0.5, 2.0], torch.float32, "cpu").tolist() == [0.5, 2.0]
    assert device_constants([0.5, 2.0], torch.float32, "meta").shape == (2,)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_double_backward_is_an_error_not_a_silent_first_order_gradient(impl, metric):
    q = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 7, 4, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    out = simwarp.warp_attend(q, k, v, metric=metric, impl=impl)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    (g,) = torch.autograd.grad(simwarp.warp_attend(q, k, v, metric=metric, impl=impl).sum(), q)  # first order
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(simwarp.pairwise_similarity(q, k, metric="l2").sum(), q, create_graph=True)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_batched_gradients_are_refused_with_a_reason(impl):
    # PyTorch's own errors named neither simwarp nor the cause ("Batching rule not implemented
    # for aten::div.out", "vmap: aten::add_(self, *extra_args) is not possible ...")
    q = torch.randn(4, 3, requires_grad=True)
    out = simwarp.warp_attend(q, q, torch.randn(4, 2), impl=impl)
    with pytest.raises(NotImplementedError, match="does not support batched gradients.*vectorize=False"):
        torch.autograd.grad(out, q, torch.eye(8).view(8, 4, 2), is_grads_batched=True)
    with pytest.raises(NotImplementedError, match="batched gradients"):
        torch.autograd.functional.jacobian(lambda x: simwarp.warp_attend(x, x, x, impl=impl), torch.randn(3, 2),
                                           vectorize=True)
    jac = torch.autograd.functional.jacobian(lambda x: simwarp.warp_attend(x, x, x, impl=impl), torch.randn(3, 2))
    assert jac.shape == (3, 2, 3, 2) and torch.isfinite(jac).all()
    # hand-written backwards that vmap can batch keep working (squared distances)
    k = torch.randn(5, 3)
    batched = torch.autograd.functional.jacobian(lambda x: simwarp.pairwise_similarity(x, k, "sqeuclidean"), q.detach(),
                                                 vectorize=True)
    looped = torch.autograd.functional.jacobian(lambda x: simwarp.pairwise_similarity(x, k, "sqeuclidean"), q.detach())
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("step", ["sigmoidal", "log", "poly"])
def test_tiny_t_has_a_finite_gradient(step):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 4, generator=gen) for n in (3, 9, 9))
    for value in (1e-20, 1e-30, 1e-38):
        for a in (0.1, torch.full((1, 3), 0.1)):
            t = torch.tensor(value, requires_grad=True)
            simwarp.warp_attend(q, k, v, t=t, a=a, step=step).sum().backward()
            assert torch.isfinite(t.grad)


def test_flags_and_numpy_parameters():
    np = pytest.importorskip("numpy")
    q = torch.randn(3, 4, dtype=f64)
    ref = simwarp.warp_attend(q, q, q, a=0.25, causal=True, exclude_self=True)
    got = simwarp.warp_attend(q, q, q, a=np.float32(0.25), causal=np.bool_(True), exclude_self=1)
    torch.testing.assert_close(got, ref)
    for flag in ("causal", "exclude_self", "detach_range"):
        for bad in ("yes", None, 2, torch.tensor(True)):
            with pytest.raises(TypeError, match=f"{flag} must be a bool"):
                simwarp.warp_attend(q, q, q, **{flag: bad})
    # NumPy integers are ints wherever a count is asked for (as for the heads' sizes)
    got = simwarp.warp_attend(q, q, q, a=0.25, causal=True, exclude_self=True, impl="chunked", chunk_size=np.int64(2))
    torch.testing.assert_close(got, ref)
    assert type(simwarp.SoftStepAttention(np.int64(2)).num_heads) is int
    for fn in (simwarp.warp_attend, lambda q, k, v, **kw: simwarp.warp_weights(q, k, **kw)):
        with pytest.raises(TypeError, match="return_stats must be a bool"):  # (a truthy string returned stats)
            fn(q, q, q, return_stats="no")


@pytest.mark.parametrize("impl", ["auto", "dense", "chunked"])
def test_empty_batch_and_clear_errors(impl):
    out = simwarp.warp_attend(torch.randn(0, 9, 8), torch.randn(0, 13, 8), torch.randn(0, 13, 4), impl=impl)
    assert out.shape == (0, 9, 4)
    with pytest.raises(ValueError, match=r"d >= 1"):
        simwarp.warp_attend(torch.randn(2, 3, 0), torch.randn(2, 4, 0), torch.randn(2, 4, 2), impl=impl)
    with pytest.raises(ValueError, match="must share d"):
        simwarp.pairwise_similarity(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., rows, d\)"):
        simwarp.pairwise_similarity(torch.randn(4), torch.randn(5, 4))
    with pytest.raises(TypeError, match="share a dtype"):
        simwarp.pairwise_similarity(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        simwarp.pairwise_similarity(torch.ones(3, 4, dtype=torch.long), torch.ones(5, 4, dtype=torch.long))


def test_pairwise_similarity_scales():
    np = pytest.importorskip("numpy")
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    base = simwarp.pairwise_similarity(q, k, scale=1.0)
    torch.testing.assert_close(simwarp.pairwise_similarity(q, k, scale=np.float64(0.5)), 0.5 * base)
    torch.testing.assert_close(simwarp.pairwise_similarity(q, k, scale=-1.0), -base)
    learned = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    simwarp.pairwise_similarity(q, k, scale=learned).sum().backward()
    torch.testing.assert_close(learned.grad, base.sum())
    with pytest.raises(ValueError, match="finite number"):
        simwarp.pairwise_similarity(q, k, scale=math.inf)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("metric", ["dot", "cosine", "l2"])
def test_autocast_region_computes_in_the_inputs_dtype(impl, metric):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, generator=gen, requires_grad=True) for n in (6, 9, 9))
    want = simwarp.warp_attend(q, k, v, impl=impl, metric=metric)
    (want_grad,) = torch.autograd.grad(want.sum(), q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = simwarp.warp_attend(q, k, v, impl=impl, metric=metric)
        sims = simwarp.pairwise_similarity(q, k, metric=metric)
        lo, hi, _ = simwarp.warp_range(q, k, metric=metric)
        ranged = simwarp.warp_attend(q, k, v, impl=impl, metric=metric, row_range=(lo, hi))
    (got_grad,) = torch.autograd.grad(got.sum() + 0 * sims.sum(), q)
    assert got.dtype == sims.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    # warp_range too (it lost its autocast guard once: its range then came from bf16 products)
    torch.testing.assert_close((lo, hi), simwarp.warp_range(q, k, metric=metric)[:2])
    torch.testing.assert_close(ranged, want)


def test_float_parameters_are_checked_as_the_compute_dtype_holds_them():
    q, k, v = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)
    for kwargs, message in (
        ({"a": 0.998046875, "b": 0.99804689453125}, "a must be smaller than b"),
        ({"t": 1 - 1e-9}, r"got 0.999999999 \(1.0 in the compute dtype\)"),
        ({"t": 1e-50}, "t must lie in"),
        ({"a": 1e-50, "b": 1e-46}, "a must lie in"),
    ):
        with pytest.raises(ValueError, match=message):
            simwarp.warp_attend(q, k, v, **kwargs)
    out = simwarp.warp_attend(q.double(), k.double(), v.double(), t=1 - 1e-9)  # representable in float64
    assert torch.isfinite(out).all()


def test_user_step_constant_in_its_parameters_backpropagates():
    name = "test_hard_band_constant"
    if name not in simwarp.steps.available_steps():
        simwarp.register_step(name, lambda u, a, b, t: torch.where(u > a, torch.zeros_like(u), torch.full_like(u, -math.inf)))
    q, k, v = torch.randn(2, 8, 4), torch.randn(2, 80, 4), torch.randn(2, 80, 3)
    a = torch.tensor(0.1, requires_grad=True)
    out = simwarp.warp_attend(q, k, v, step=name, impl="chunked", a=a, chunk_size=16)
    if out.requires_grad:
        out.sum().backward()
    assert a.grad is None or a.grad == 0


def test_backend_functions_take_keyword_arguments():
    q, k, v = torch.randn(5, 4), torch.randn(6, 4), torch.randn(6, 3)
    torch.testing.assert_close(simwarp.warp_attend(q=q, k=k, v=v), simwarp.warp_attend(q, k, v))
    torch.testing.assert_close(simwarp.warp_weights(q=q, k=k), simwarp.warp_weights(q, k))
    torch.testing.assert_close(simwarp.pairwise_similarity(q=q, k=k), simwarp.pairwise_similarity(q, k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert simwarp.warp_attend(q=q, k=k, v=v).dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_compiled_leave_one_out_matches_eager(metric):
    """Under torch.compile the leave-one-out range masks the diagonal out of place: the
    similarities may be a view made inside an autograd function, which compiled code must not
    write to (it did: 'Output 0 of AsStrided is a view ... modified inplace')."""
    lin = torch.nn.Linear(8, 8)

    def loss(x):
        q = lin(x)
        return simwarp.warp_attend(q, q, q, metric=metric, scale=1.0, exclude_self=True, impl="dense").square().sum()

    x = torch.randn(2, 16, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = loss(x1)
    (gw,) = torch.autograd.grad(want, x1)
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(x2)  # also: no graph break
    (gg,) = torch.autograd.grad(got, x2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gg, gw)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("self_offset", [None, -2, 0, 3])
def test_first_extreme_index_matches_the_indexed_reductions(with_bias, self_offset):
    """The streaming pass 1 on CPU searches key indices only in the rows a block improves
    (first_extreme_index): the same first-on-ties indices as row_range_indices."""
    from simwarp.backend.common import first_extreme_index, key_bias, row_range_indices

    gen = torch.Generator().manual_seed(3 + (self_offset or 0))
    s = torch.randint(0, 4, (2, 1, 7, 9), generator=gen).float()  # many ties; batch broadcast below
    rows = torch.rand(2, 3, 7, generator=gen) > 0.4
    bias = None
    if with_bias:
        mask = torch.rand(2, 3, 7, 9, generator=gen) > 0.3
        bias = key_bias(mask, 7, 0, 9, causal=False, exclude_self=False, dtype=s.dtype, device=s.device)
    full = s.expand(2, 3, 7, 9).clone()
    lo, lo_index, hi, hi_index = row_range_indices(full, bias, self_offset)
    for largest, index, value in ((False, lo_index, lo), (True, hi_index, hi)):
        found = first_extreme_index(s, bias, self_offset, rows, largest)
        has_key = value[rows].isfinite()
        assert torch.equal(found[has_key], index[rows][has_key])
    assert torch.equal(full, s.expand(2, 3, 7, 9))  # s is left as it was


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean"])
def test_range_gradient_goes_to_the_first_key_of_equal_similarity(metric):
    """A key equal to the query and a near-duplicate both sit at distance 0 after the clamp
    (equal similarities, different GEMM scores): the streaming pass 1 must route the range
    gradient to the first of them, as the dense path does."""
    gen = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(20):  # (three queries: with one, the distances' centre is the query and the tie exact)
        q = torch.randn(3, 16, generator=gen) * 3
        k = torch.cat([torch.randn(3, 16, generator=gen) * 3, q[:1], q[:1] + 1e-4 * torch.randn(1, 16, generator=gen)])
        k = torch.cat([k, torch.randn(20, 16, generator=gen) * 3])
        v = torch.randn(25, 4, generator=gen)
        s = simwarp.pairwise_similarity(q, k, metric)
        blocks = BlockSimilarity(q, k, metric, None)  # the streaming pass's similarities (chunk_size 4)
        streamed = torch.cat([blocks.similarity_(blocks.scores(start, start + 4)) for start in range(0, 25, 4)], -1)
        # ties at the clamp (0): a tie at a rounding-level distance has gradients of rounding noise
        if not (s[0, 3] == s[0, 4] == s[0].max() == 0 and streamed[0, 3] == streamed[0, 4] == 0):
            continue
        hits += 1
        grads = {}
        for impl, kw in (("dense", {}), ("chunked", {"chunk_size": 4})):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            simwarp.warp_attend(qq, kk, v, metric=metric, impl=impl, temperature=10.0, **kw).sum().backward()
            grads[impl] = (qq.grad, kk.grad)
        for dense, streamed in zip(grads["dense"], grads["chunked"]):
            torch.testing.assert_close(streamed, dense, rtol=1e-4, atol=1e-5)
    assert hits >= 3  # the data must exercise the tie


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_chunked_inference_compiles_to_one_graph(metric):
    """The streaming passes' similarity preparation (BlockSimilarity) must stay traceable: no
    graph break in a chunked inference call (fullgraph raises on one)."""

    def attend(q, k, v):
        return simwarp.warp_attend(q, k, v, metric=metric, impl="chunked", chunk_size=5)

    q, k, v = torch.randn(2, 12, 4), torch.randn(2, 12, 4), torch.randn(2, 12, 3)
    torch.testing.assert_close(torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v), attend(q, k, v))


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize(
    "params", [{}, {"a": "rows"}, {"t": "heads"}, {"a": "rows", "step": "log"}, {"exclude_self": True}]
)
def test_batch_dims_carried_by_v_and_the_parameters_alone(impl, params):
    """q and k broadcast over a batch dim that only v (and the step parameters) carry: the dense
    path crashed on per-row parameters (an in-place product on the smaller similarity block)
    and returned stats of q's batch instead of (..., n)."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, generator=gen, dtype=f64), torch.randn(1, 5, 3, generator=gen, dtype=f64)
    v = torch.randn(2, 5, 2, generator=gen, dtype=f64)
    kwargs = {"step": params.get("step", "sigmoidal"), "exclude_self": params.get("exclude_self", False)}
    if "a" in params:
        kwargs["a"] = torch.tensor([[0.1, 0.2, 0.3, 0.15], [0.3, 0.05, 0.1, 0.2]], dtype=f64)
    if "t" in params:
        kwargs["t"] = torch.tensor([[0.3], [0.7]], dtype=f64)
    out, stats = simwarp.warp_attend(q, k, v, impl=impl, chunk_size=2, return_stats=True, **kwargs)
    assert out.shape == (2, 4, 2)
    assert all(x.shape == (2, 4) for x in stats)
    for i in range(2):  # batch entry by entry, parameters of that entry
        single = {key: x[i] if isinstance(x, torch.Tensor) else x for key, x in kwargs.items()}
        ref, ref_stats = simwarp.warp_attend(q[0], k[0], v[i], impl="dense", return_stats=True, **single)
        torch.testing.assert_close(out[i], ref)
        torch.testing.assert_close(stats.lse[i], ref_stats.lse)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("t", [0.9, 0.99])
def test_sigmoidal_at_b_one_has_no_partials_at_the_best_key(impl, t):
    """With b = 1 the best key (u = 1) sits at the band's upper end, where the sigmoidal
    step's partials are steep for t near 1 (~ulp^(1/t - 1) / t). The band coordinate was an
    affine map of s that could round the best key into the band: in float32, grad b was off
    by 0.24 and grad q by 0.03 (detach_range). It is now taken from the gap below the row
    maximum, exactly 1 there."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, rows, cols, generator=gen, dtype=f64) for rows, cols in ((8, 16), (40, 16), (40, 3)))
    grads = {}
    for name, dtype, kw in (("got", torch.float32, {"impl": impl, "chunk_size": 16}), ("want", f64, {"impl": "dense"})):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k)]
        b = torch.ones(1, 8, dtype=dtype, requires_grad=True)
        out = simwarp.warp_attend(*leaves, v.to(dtype), a=0.3, b=b, t=t, detach_range=True, **kw)
        (out.double() * torch.linspace(-1, 1, 3, dtype=f64)).sum().backward()
        grads[name] = [x.grad.double() for x in (*leaves, b)]
    for got, want in zip(grads["got"], grads["want"]):
        assert (got - want).abs().max() <= 2e-5 * max(1.0, float(want.abs().max()))


def test_leave_one_out_with_more_queries_than_keys_says_the_rule():
    with pytest.raises(ValueError, match=r"exclude_self=True needs n <= m .* got q \(5, 3\) and k \(4, 3\)"):
        simwarp.warp_attend(torch.randn(5, 3), torch.randn(4, 3), torch.randn(4, 2), exclude_self=True)


@pytest.mark.parametrize("largest", [True, False])
def test_row_extremum_finds_the_first_extreme_also_in_the_tail(largest):
    """Long rows are searched in blocks of _EXTREMUM_BLOCK plus a tail: the value and the index
    of the first extreme (the range-gradient tie rule) must come out as torch.max/min's."""
    from simwarp.backend.common import _EXTREMUM_BLOCK, row_extremum

    m = 8 * _EXTREMUM_BLOCK + 37
    x = torch.randn(5, m, dtype=torch.float64)
    big = 10.0 if largest else -10.0
    x[0, m - 5] = big  # in the tail only
    x[1, 100] = x[1, m - 3] = big  # a block and the tail tie: the block's comes first
    x[2, m - 9] = x[2, m - 2] = big  # a tie inside the tail
    x[3, 3] = x[3, 200] = big  # a tie between blocks
    values, index = row_extremum(x, largest)
    ref = x.amax(-1) if largest else x.amin(-1)
    first = (x == ref[:, None]).to(torch.int64).argmax(-1)
    assert torch.equal(values, ref) and torch.equal(index, first)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_a_flat_fixed_range_keeps_every_key(impl):
    """row_range with lo == hi: every key at u = 1, inside the band of any step: the softmax."""
    q, k, v = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 6, 2, dtype=torch.float64)
    got = simwarp.warp_attend(q, k, v, row_range=(0.0, 0.0), step="sigmoidal", a=0.3, b=0.8, impl=impl)
    torch.testing.assert_close(got, simwarp.warp_attend(q, k, v, step="none", impl=impl))


def test_a_row_of_infinite_scores_has_the_same_stats_on_both_paths():
    q = torch.tensor([[math.inf, 0.0], [1.0, 0.5]])
    k, v = torch.rand(3, 2) + 0.1, torch.randn(3, 1)
    (_, dense), (_, chunked) = (simwarp.warp_attend(q, k, v, impl=impl, return_stats=True) for impl in ("dense", "chunked"))
    assert torch.equal(dense.empty, chunked.empty) and not dense.empty.any()
    torch.testing.assert_close(chunked.lo, dense.lo, equal_nan=True)
    torch.testing.assert_close(chunked.hi, dense.hi, equal_nan=True)


@pytest.mark.parametrize("step", ["sigmoidal", "none"])
def test_warp_weights_counts_nothing_on_a_nan_row(step):
    q, k = torch.randn(3, 2), torch.randn(5, 2)
    q[1, 0] = float("nan")
    _, stats = simwarp.warp_weights(q, k, step=step, return_stats=True)
    assert stats.kept[1].isnan() and not stats.kept[[0, 2]].isnan().any()


def test_squared_distance_similarities_never_exceed_zero():
    """-|x - y|² computed from norms and a product rounds above 0 for near-equal rows far from
    the origin unless clamped; the range's hi (a distance of 0) must stay 0, on both paths."""
    from simwarp.similarity import pairwise_similarity

    x = 100 * torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) + 50
    assert pairwise_similarity(x, x, "sqeuclidean").max() <= 0
    v = torch.randn(64, 1)
    (_, dense), (_, chunked) = (
        simwarp.warp_attend(x, x, v, metric="sqeuclidean", impl=impl, chunk_size=16, return_stats=True)
        for impl in ("dense", "chunked")
    )
    assert chunked.hi.max() <= 0 and dense.hi.max() <= 0
    torch.testing.assert_close(chunked.hi, dense.hi)


def test_deterministic_mode_keeps_the_fused_backward_for_deterministic_cases(monkeypatch):
    """The fused backward adds range gradients into dk with atomics: under
    torch.use_deterministic_algorithms(True), impl="auto" takes the chunked path, an explicit
    impl="triton" raises (warns in warn_only mode); without dk, or without a range gradient
    (step "none", detach_range), the fused path stays."""
    import simwarp.backend as backend

    spec = lambda step="sigmoidal", detach=False: backend.make_spec("dot", None, step, 1.0, False, False, detach)  # noqa: E731
    k = torch.randn(5, 3, requires_grad=True)
    assert backend._fused_backward_uses_atomics(spec(), k)
    assert not backend._fused_backward_uses_atomics(spec("none"), k)
    assert not backend._fused_backward_uses_atomics(spec(detach=True), k)
    assert not backend._fused_backward_uses_atomics(spec(), k.detach())
    with torch.no_grad():
        assert not backend._fused_backward_uses_atomics(spec(), k)
    assert backend._deterministic_instead_of_fused("auto") == "chunked"
    previous, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="atomic adds"):
            backend._deterministic_instead_of_fused("triton")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="atomic adds"):
            assert backend._deterministic_instead_of_fused("triton") == "triton"
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_scale_at_the_dtype_edges(dtype):
    """The per-row scale of ``u``: ``c = 1/2`` where ``hi - lo`` overflows (and ``c·hi - c·lo``
    is then finite), ``flat`` where the range is below ``tiny`` (``inv = 0`` there, ``u = 1``),
    ``inv = c / width`` elsewhere, and NaN where a bound is NaN; checked on every pair of edge values."""
    from simwarp.backend.common import _unit_scale, unit_range

    info = torch.finfo(dtype)
    edges = [0.0, -0.0, 1.0, -1.0, 3.0, info.max, -info.max, info.max / 2, -info.max / 2, info.tiny, info.tiny / 4,
             info.smallest_normal * info.eps, 1e30, -1e30, math.inf, -math.inf, math.nan]
    lo, hi = (torch.tensor(x, dtype=dtype) for x in zip(*[(x, y) for x in edges for y in edges if not y < x]))
    c, width, flat, inv = _unit_scale(lo, hi)
    wide = hi.double() - lo.double()
    overflows = (hi - lo == math.inf) & torch.isfinite(wide)
    assert torch.equal(c, torch.where(hi - lo == math.inf, 0.5, 1.0).to(dtype))
    assert torch.isfinite(width[overflows]).all()
    exact = functools.partial(torch.testing.assert_close, rtol=0, atol=0, equal_nan=True)
    exact(width[c == 1], (hi - lo)[c == 1])
    assert torch.equal(flat, width < info.tiny)
    assert (inv[flat] == 0).all() and not torch.signbit(inv[flat]).any()
    steep = ~flat & ~width.isnan()
    exact(inv[steep], (c / width)[steep])
    assert torch.equal(inv.isnan(), lo.isnan() | hi.isnan() | (lo == hi) & lo.isinf())
    u, _ = unit_range(lo.unsqueeze(-1), lo.unsqueeze(-1), hi.unsqueeze(-1))
    ok = torch.isfinite(lo) & torch.isfinite(hi)
    assert (u[ok & flat] == 1).all() and (u[ok & ~flat] == 0).all()  # u at s = lo
