"""The backend against the math contract itself (docs/math.md), written out here in plain
float64 autograd and nothing else: no simwarp code on the reference side.

Hypothesis draws the problem: batch dims, sizes down to 1, every streaming metric (and ``l1`` on
the dense path), every built-in step, scalar or per-row parameters, masks with empty rows and
rows with a single valid key, causal and leave-one-out structure, temperature, scale and
``detach_range``. Both CPU paths must match the reference in value, row statistics and every
gradient (``q, k, v, a, b, t``). The fused kernels meet the dense path in ``test_triton.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import simwarp

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

f64 = torch.float64
STEPS = ("sigmoidal", "log", "poly", "none")


def _similarity(q, k, metric, scale):
    if metric == "cosine":
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    if metric in ("dot", "cosine"):
        s = q @ k.transpose(-1, -2)
    else:
        diff = q.unsqueeze(-2) - k.unsqueeze(-3)
        if metric == "l1":
            s = -diff.abs().sum(-1)
        else:
            sq = diff.pow(2).sum(-1)
            s = -sq if metric == "sqeuclidean" else -torch.where(sq > 0, sq, 1.0).sqrt() * (sq > 0)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if metric == "dot" else 1.0
    return s * scale


def _log_step(u, a, b, t, step):
    """log m(u) (``-inf`` where m = 0); inputs outside each branch are replaced by a safe point,
    so that the unused branch has finite gradients."""
    if step == "none":
        return torch.zeros_like(u)
    if step == "log":
        inside = (u > 0) & (u < b)
        us = torch.where(inside, u, b / 2)
        value = t / (1 - t) * (b - us) * torch.log(us / b)
        return torch.where(u <= 0, -math.inf, torch.where(u >= b, 0.0, value))
    if step == "sigmoidal":
        x = (u - a) / (b - a)
    else:  # poly
        x = (u - (a + b) / 2) / (t * (b - a)) + 0.5
    inside = (x > 0) & (x < 1)
    xs = torch.where(inside, x, 0.5)
    if step == "sigmoidal":
        value = -torch.nn.functional.softplus(torch.log((1 - xs) / xs) / t, threshold=1e6)
    else:
        value = torch.log(xs * xs * (3 - 2 * xs))
    return torch.where(x <= 0, -math.inf, torch.where(x >= 1, 0.0, value))


def reference(q, k, v, a, b, t, *, metric, scale, step, mask, causal, exclude_self, temperature, detach_range):
    """``(out, lse, kept)`` of docs/math.md, materialised."""
    s = _similarity(q, k, metric, scale)
    n, m = s.shape[-2:]
    batch = torch.broadcast_shapes(s.shape[:-2], v.shape[:-2], *(() if mask is None else (mask.shape[:-2],)))
    s = s.expand(*batch, n, m)
    valid = torch.ones(n, m, dtype=torch.bool)
    if causal:
        valid = valid.tril()
    if exclude_self:
        valid = valid & ~torch.eye(n, m, dtype=torch.bool)
    valid = valid.expand(*batch, n, m) & (True if mask is None else mask)
    lo = torch.where(valid, s, math.inf).amin(-1, keepdim=True)
    hi = torch.where(valid, s, -math.inf).amax(-1, keepdim=True)
    empty = ~valid.any(-1, keepdim=True)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    if detach_range:
        lo, hi = lo.detach(), hi.detach()
    r = hi - lo
    flat = r < torch.finfo(f64).tiny
    u = torch.where(flat, 1.0, (s - lo) / torch.where(flat, 1.0, r))
    params = [p.unsqueeze(-1) if isinstance(p, torch.Tensor) else p for p in (a, b, t)]
    phi = _log_step(u, *params, step)
    logits = torch.where(valid, s / temperature + phi, -math.inf)
    top = torch.where(empty, 0.0, logits.amax(-1, keepdim=True))
    e = torch.where(valid & (phi > -math.inf), (logits - top).exp(), 0.0)
    total = e.sum(-1, keepdim=True)
    w = e / torch.where(empty, 1.0, total)
    lse = torch.where(empty, -math.inf, total.log() + top).squeeze(-1)
    kept = (valid & (phi > -math.inf)).sum(-1).to(f64)
    return w @ v, lse, kept


@st.composite
def problems(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n, m, d, e = draw(st.integers(1, 7)), draw(st.integers(1, 9)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    impl = draw(st.sampled_from(["dense", "chunked"]))
    metric = draw(st.sampled_from(["dot", "cosine", "l2", "sqeuclidean"] + (["l1"] if impl == "dense" else [])))
    step = draw(st.sampled_from(STEPS))
    causal = draw(st.booleans())
    exclude_self = n <= m and draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    k_batch = batch if draw(st.booleans()) else tuple(1 for _ in batch)  # keys broadcast over the batch
    q = torch.randn(*batch, n, d, generator=gen, dtype=f64)
    k = torch.randn(*k_batch, m, d, generator=gen, dtype=f64)
    v = torch.randn(*batch, m, e, generator=gen, dtype=f64)
    mask = None
    mask_kind = draw(st.sampled_from(["none", "random", "degenerate"]))
    if mask_kind != "none":
        mask = torch.rand(*batch, n, m, generator=gen) > 0.3
        if mask_kind == "degenerate":
            mask[..., 0, :] = False  # no valid key
            if n > 1:
                mask[..., 1, :] = False
                mask[..., 1, m - 1] = True  # at most one valid key (causal or leave-one-out may take it)
    if draw(st.booleans()):  # per-row parameters, with gradients
        a = torch.empty(*batch, n, dtype=f64).uniform_(0.05, 0.6, generator=gen)
        b = (a + torch.empty_like(a).uniform_(0.05, 1.0, generator=gen) * (1 - a)).clamp_max(1.0)
        t = torch.empty_like(a).uniform_(0.1, 0.9, generator=gen)
    else:
        a, b, t = 0.2, draw(st.sampled_from([0.7, 1.0])), draw(st.sampled_from([0.3, 0.5, 0.8]))
    options = {
        "metric": metric, "step": step, "mask": mask, "causal": causal, "exclude_self": exclude_self,
        "temperature": draw(st.sampled_from([0.5, 1.0, 2.0])), "scale": draw(st.sampled_from([None, 0.7])),
        "detach_range": draw(st.booleans()),
    }
    return impl, draw(st.integers(1, m)), (q, k, v, a, b, t), options


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(problems())
def test_backend_matches_the_written_contract(problem):
    impl, chunk_size, tensors, options = problem
    inputs = [x.clone().requires_grad_() if isinstance(x, torch.Tensor) else x for x in tensors]
    leaves = [x for x in inputs if isinstance(x, torch.Tensor)]

    def outputs(fn):
        out, lse, kept = fn()
        weights = torch.linspace(-1, 1, out.numel(), dtype=f64).reshape(out.shape)
        loss = (out * weights).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum() * 0.3
        return out, lse, kept, torch.autograd.grad(loss, leaves, allow_unused=True)

    def backend():
        q, k, v, a, b, t = inputs
        out, stats = simwarp.warp_attend(
            q, k, v, a=a, b=b, t=t, impl=impl, chunk_size=chunk_size, return_stats=True, **options
        )
        return out, stats.lse, stats.kept

    got, want = outputs(backend), outputs(lambda: reference(*inputs, **options))
    for name, x, y in zip(("out", "lse", "kept"), got[:3], want[:3]):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-7, msg=name)
    for leaf, x, y in zip(leaves, got[3], want[3]):  # None: the loss does not depend on the leaf
        x, y = (torch.zeros_like(leaf) if g is None else g for g in (x, y))
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, atol=1e-8, rtol=1e-6)
