"""SoftStep attention front end: SDPA equivalence, masks, GQA, dropout, modules, swap, edge cases."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import simwarp
from simwarp.attention import (
    AttentionStats,
    MultiheadSoftStepAttention,
    SoftStepAttention,
    additive_mask_to_bool,
    softstep_attention,
    swap_attention,
)
from simwarp.monitoring import AttentionMonitor

D64 = torch.float64


def qkv(b=2, h=4, n=5, s=7, e=8, ev=3, hk=None, dtype=D64, requires_grad=False):
    q = torch.randn(b, h, n, e, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, hk or h, s, e, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, hk or h, s, ev, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


# ---------------------------------------------------------------------------------------
# step="none" == SDPA
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,s", [(5, 7), (7, 5), (1, 6), (6, 6)])
def test_none_matches_sdpa(impl, causal, n, s):
    q, k, v = qkv(n=n, s=s)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = softstep_attention(q, k, v, is_causal=causal, step="none", impl=impl, chunk_size=3)
    if causal and n > s:  # SDPA has NaN rows (no visible key) only when n > s... never with top-left; keep check
        assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_none_matches_sdpa_with_scale_and_masks():
    q, k, v = qkv()
    bool_mask = torch.rand(2, 1, 5, 7) > 0.4
    bool_mask[..., 0] = True  # SDPA needs one valid key per row to be NaN-free
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, scale=0.3)
    torch.testing.assert_close(softstep_attention(q, k, v, bool_mask, scale=0.3, step="none"), ref)
    add = torch.zeros(bool_mask.shape, dtype=D64).masked_fill(~bool_mask, -math.inf)
    torch.testing.assert_close(softstep_attention(q, k, v, add, scale=0.3, step="none"), ref)
    big_neg = torch.zeros(bool_mask.shape, dtype=D64).masked_fill(~bool_mask, torch.finfo(D64).min)
    torch.testing.assert_close(softstep_attention(q, k, v, big_neg, scale=0.3, step="none"), ref)
    # an (L, S) mask combined with is_causal
    m2 = torch.rand(5, 7) > 0.3
    m2[:, 0] = True
    tri = torch.ones(5, 7, dtype=torch.bool).tril()
    ref2 = F.scaled_dot_product_attention(q, k, v, attn_mask=m2 & tri)
    torch.testing.assert_close(softstep_attention(q, k, v, m2, is_causal=True, step="none"), ref2)


def test_none_matches_sdpa_gradients():
    q, k, v = qkv(requires_grad=True)
    g = torch.randn(2, 4, 5, 3, dtype=D64)
    grads = torch.autograd.grad((softstep_attention(q, k, v, step="none") * g).sum(), (q, k, v))
    ref = torch.autograd.grad((F.scaled_dot_product_attention(q, k, v) * g).sum(), (q, k, v))
    for x, y in zip(grads, ref):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("mask_heads", [None, 1, 8])
def test_gqa_matches_sdpa_and_repeat(mask_heads):
    q, k, v = qkv(h=8, hk=2)
    mask = None
    if mask_heads is not None:
        mask = torch.rand(2, mask_heads, 5, 7) > 0.3
        mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(softstep_attention(q, k, v, mask, enable_gqa=True, step="none"), ref)
    # with a real step and per-head parameters: equal to explicitly repeated keys
    a = torch.linspace(0.05, 0.4, 8, dtype=D64)[:, None]
    out = softstep_attention(q, k, v, mask, enable_gqa=True, a=a, b=0.8, t=0.4)
    kr, vr = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    torch.testing.assert_close(out, softstep_attention(q, kr, vr, mask, a=a, b=0.8, t=0.4))


def test_gqa_instance_params_and_stats_layout():
    q, k, v = qkv(h=4, hk=2)
    a = torch.rand(2, 4, 5, dtype=D64) * 0.3 + 0.05
    out, st = softstep_attention(q, k, v, enable_gqa=True, a=a, return_stats=True)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref, st_ref = softstep_attention(q, kr, vr, a=a, return_stats=True)
    torch.testing.assert_close(out, ref)
    for x, y in zip(st, st_ref):
        torch.testing.assert_close(x, y)
    assert st.kept.shape == (2, 4, 5)


@pytest.mark.parametrize("query_batch", [(1,), ()])
def test_gqa_with_a_batch_only_the_keys_have(query_batch):
    """One query set against a batch of key/value caches: the mask (B, Hq, L, S) and per-query
    parameters (B, Hq, L) were checked against the query's own shape and refused, where SDPA
    broadcasts the query over the keys' batch."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(*query_batch, 4, 3, 8, generator=gen, dtype=D64)
    k, v = (torch.randn(2, 2, 5, 8, generator=gen, dtype=D64) for _ in range(2))
    mask = torch.rand(2, 4, 3, 5, generator=gen) > 0.3
    mask[..., 0] = True
    for m in (mask, mask[:, :, :1, :1]):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(softstep_attention(q, k, v, m, enable_gqa=True, step="none"), ref)
    a = torch.rand(2, 4, 3, generator=gen, dtype=D64) * 0.3 + 0.05
    q_full = q.expand(2, 4, 3, 8)
    torch.testing.assert_close(
        softstep_attention(q, k, v, mask, enable_gqa=True, a=a), softstep_attention(q_full, k, v, mask, enable_gqa=True, a=a)
    )
    with pytest.raises(ValueError, match=r"leading dims of query .* key \(3, 2, 5, 8\) and value \(2, 2, 5, 8\) do not broadcast"):
        softstep_attention(q, torch.randn(3, 2, 5, 8, dtype=D64), v, enable_gqa=True)


@pytest.mark.parametrize("name", ["a", "attn_mask"])
def test_gqa_refuses_per_key_head_parameters_and_masks(name):
    """With GQA, a head dim that is neither 1 nor the query heads does not broadcast to
    (B, Hq, L): it was applied once per key/value group without a word (SDPA refuses such masks)."""
    q, k, v = qkv(h=4, hk=2)
    given = {"a": torch.full((2, 1), 0.2, dtype=D64), "attn_mask": torch.ones(2, 5, 7, dtype=torch.bool)}[name]
    with pytest.raises(ValueError, match=rf"{name} of shape .* has 2 heads where the query has 4"):
        softstep_attention(q, k, v, enable_gqa=True, **{name: given})
    if name == "a":  # (Hq,) is the rows' last dim L, not the heads: the message names the user's layout
        with pytest.raises(ValueError, match=r"a of shape \(4,\) does not broadcast to the rows \(..., Hq, L\) = \(2, 4, 5\)"):
            softstep_attention(q, k, v, enable_gqa=True, a=torch.full((4,), 0.2, dtype=D64))


# ---------------------------------------------------------------------------------------
# SoftStep semantics through the backend
# ---------------------------------------------------------------------------------------


def test_sigmoidal_matches_backend_and_is_sparse():
    q, k, v = qkv(s=32)
    out, st = softstep_attention(q, k, v, a=0.3, b=0.8, t=0.5, return_stats=True)
    ref = simwarp.warp_attend(q, k, v, metric="dot", a=0.3, b=0.8, t=0.5, impl="dense")
    torch.testing.assert_close(out, ref)
    assert isinstance(st, AttentionStats)
    assert (st.kept < st.valid).any() and (st.kept >= 1).all()
    frac = st.head_kept_fraction()
    assert frac.shape == (4,) and ((frac > 0) & (frac < 1)).all()


def test_a_head_without_rows_to_count_reports_nan_not_zero():
    """Every row NaN (NaN inputs) or empty: nothing was counted, which read as 0.00 ("the step
    drops every key") in the monitor; now NaN, per head and in the monitor's accumulation."""
    q, k, v = qkv(s=6)
    q[:, 1] = float("nan")  # head 1: every row NaN
    mask = torch.ones(q.shape[-2], 6, dtype=torch.bool)
    _, st = softstep_attention(q, k, v, attn_mask=mask, return_stats=True)
    frac = st.head_kept_fraction()
    assert frac[1].isnan() and not frac[[0, 2, 3]].isnan().any()
    q[:, 2, 0] = float("nan")  # one NaN row of head 2: left out, the others counted
    _, st = softstep_attention(q, k, v, attn_mask=mask, return_stats=True)
    assert torch.isfinite(st.head_kept_fraction()[[0, 2, 3]]).all()
    layer = simwarp.swap_attention(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    x = torch.randn(2, 5, 8)
    x[:, :, :] = float("nan")
    for accumulate in (False, True):
        with simwarp.monitoring.AttentionMonitor(layer, accumulate=accumulate) as mon:
            layer(x)
        assert all(f.isnan().all() for f in mon.kept_fraction().values())
        assert "nan" in mon.summary()


def test_gradients_reach_step_parameters():
    q, k, v = qkv(requires_grad=True)
    attn = SoftStepAttention(4, 8, mode="per_head").double()
    attn(q, k, v).square().sum().backward()
    assert attn.step.raw.grad is not None and attn.step.raw.grad.abs().sum() > 0
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("mode", ["global", "per_head", "instance"])
def test_softstep_attention_module_modes(mode):
    q, k, v = qkv(dtype=torch.float32)
    attn = SoftStepAttention(4, 8, mode=mode)
    out = attn(q, k, v, is_causal=True)
    assert out.shape == (2, 4, 5, 3) and torch.isfinite(out).all()
    kw = attn.step.kwargs(q if mode == "instance" else None)
    torch.testing.assert_close(out, softstep_attention(q, k, v, is_causal=True, **kw))


def test_autocast_casts_float32_inputs_as_it_does_for_sdpa():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    v = torch.randn(1, 4, 6, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.scaled_dot_product_attention(q, k, v)
        got = simwarp.softstep_attention(q, k, v, step="none")
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float16 is cast too (all but float64)
        assert simwarp.softstep_attention(q.half(), k, v, step="none").dtype == torch.bfloat16
    q64 = q.double()  # autocast leaves float64 alone: a mismatch stays an error naming the dtypes
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="must share a dtype"):
        simwarp.softstep_attention(q64, k, v)


def test_dropout_training_is_real_dropout():
    q, k, v = qkv(dtype=torch.float32, s=16)
    v = torch.ones_like(v)  # every row's output is the sum of its (dropped, rescaled) weights
    out = softstep_attention(q, k, v, dropout_p=0.5, step="none")
    assert not torch.allclose(out, torch.ones_like(out))
    assert torch.isfinite(out).all()
    # expectation is preserved: averaged over many draws the weights sum to ~1
    torch.manual_seed(1)
    mean = torch.stack([softstep_attention(q, k, v, dropout_p=0.5)[..., 0] for _ in range(200)]).mean()
    assert abs(mean.item() - 1.0) < 0.05
    # eval modules pass 0: deterministic
    attn = SoftStepAttention(4, 8).eval()
    torch.testing.assert_close(attn(q, k, v), attn(q, k, v))


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_dropout_one_drops_every_weight_as_sdpa(impl):
    """SDPA, nn.Dropout and nn.MultiheadAttention accept p = 1 (a zero output); it was refused."""
    q, k, v = (x.requires_grad_() for x in qkv(dtype=torch.float32))
    out, stats = softstep_attention(q, k, v, dropout_p=1.0, impl=impl, return_stats=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(stats.lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    mha = nn.MultiheadAttention(8, 2, dropout=1.0, batch_first=True)
    x = torch.randn(2, 5, 8)
    swapped = MultiheadSoftStepAttention.from_multihead(mha, step="none")
    for module in (mha, swapped):
        out, weights = module(x, x, x)
        torch.testing.assert_close(out, mha.out_proj.bias.expand_as(out))  # zero attention: the bias
        assert torch.equal(weights, torch.zeros_like(weights))


# ---------------------------------------------------------------------------------------
# Reliability: degenerate rows, dtypes, errors
# ---------------------------------------------------------------------------------------


def test_fully_masked_rows_and_padding_only_sequences_are_zero():
    q, k, v = qkv(dtype=torch.float32)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2] = False  # one fully masked query row
    mask[1] = False  # a padding-only sequence
    q.requires_grad_(True)
    out, st = softstep_attention(q, k, v, mask, return_stats=True)
    assert torch.isfinite(out).all()
    assert (out[0, :, 2] == 0).all() and (out[1] == 0).all()
    assert st.empty[0, :, 2].all() and st.empty[1].all() and not st.empty[0, :, 0].any()
    assert (st.kept_fraction[st.empty] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    # with step="none" the defined rows match SDPA (which is NaN or 0 on empty rows, by version/kernel)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(softstep_attention(q, k, v, mask, step="none")[0, :, :2], ref[0, :, :2])


def test_length_one_and_causal_l_ne_s():
    q, k, v = qkv(n=1, s=1, dtype=torch.float32)
    out = softstep_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, v.expand_as(out))
    q, k, v = qkv(n=6, s=3, dtype=torch.float32)
    out = softstep_attention(q, k, v, is_causal=True, step="none")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, k, v = qkv(n=3, s=6, dtype=torch.float32)  # top-left: rows see keys j <= i only
    out = softstep_attention(q, k, v, is_causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = qkv(dtype=dtype, s=9)
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool)
    mask[1] = False
    out = softstep_attention(q, k, v, mask, is_causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    add = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    ref = softstep_attention(q.float(), k.float(), v.float(), mask, is_causal=True)
    torch.testing.assert_close(softstep_attention(q, k, v, add, is_causal=True).float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_errors_are_clear():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="enable_gqa"):
        softstep_attention(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="multiple"):
        softstep_attention(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="share E"):
        softstep_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="share S"):
        softstep_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="ALiBi"):
        softstep_attention(q, k, v, torch.randn(5, 7, dtype=D64))
    with pytest.raises(ValueError, match="dropout_p"):
        softstep_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="attn_mask"):
        softstep_attention(q, k, v, attn_mask="causal")
    with pytest.raises(ValueError, match="mask"):
        softstep_attention(q, k, v, torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_heads=3"):
        SoftStepAttention(3)(q, k, v)
    with pytest.raises(ValueError, match=r"no heads dim .* expected \(B, 4, L, E\)"):  # (named `a` before)
        SoftStepAttention(4, 8)(q[0, 0], k[0, 0], v[0, 0])
    assert SoftStepAttention(4, mode="global")(q[0, 0], k[0, 0], v[0, 0]).shape == v[0, 0, :5].shape
    with pytest.raises(ValueError, match="head_dim"):
        SoftStepAttention(4, mode="instance")
    with pytest.raises(ValueError, match=r"query has 8 features per head .* head_dim=6"):  # (named `cond` before)
        SoftStepAttention(4, 6, mode="instance")(q, k, v)


def test_additive_mask_to_bool():
    m = torch.tensor([0.0, -math.inf, -1e9, -1e4])
    assert additive_mask_to_bool(m).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"finite score biases.*Found e.g. \[-0.5\]"):
        additive_mask_to_bool(torch.tensor([0.0, -0.5]))
    for bad in (math.nan, math.inf):  # the message said "finite" for these too
        with pytest.raises(ValueError, match=r"other than 0 and -inf .* NaN or \+inf"):
            additive_mask_to_bool(torch.tensor([0.0, bad]))
    with pytest.raises(TypeError):
        additive_mask_to_bool(torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------
# xformers attention biases (duck-typed; the fakes mimic xformers.ops.fmha.attn_bias)
# ---------------------------------------------------------------------------------------


class FakeLowerTriangularMask:
    """Mimics ``xformers.ops.fmha.attn_bias.LowerTriangularMask`` (top-left causal)."""

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        full = torch.full(shape, -math.inf, dtype=dtype, device=device)
        return torch.triu(full, diagonal=1)


class FakeBlockDiagonalMask:
    """Mimics ``BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen)``: packed sequences."""

    def __init__(self, q_seqlen, kv_seqlen):
        self.q_seqlen, self.kv_seqlen = q_seqlen, kv_seqlen

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        if shape[-2:] != (sum(self.q_seqlen), sum(self.kv_seqlen)):
            raise ValueError("shape does not match the sequence lengths")
        mask = torch.full(shape[-2:], -math.inf, dtype=dtype, device=device)
        qs = kv = 0
        for lq, lk in zip(self.q_seqlen, self.kv_seqlen):
            mask[qs : qs + lq, kv : kv + lk] = 0
            qs, kv = qs + lq, kv + lk
        return mask.expand(shape)


class FakeTensorBias:
    """Mimics ``LowerTriangularMaskWithTensorBias`` (a finite additive bias): must be refused."""

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        return torch.randn(shape, dtype=dtype, device=device)


def test_xformers_like_biases():
    q, k, v = qkv(n=6, s=6)
    out = softstep_attention(q, k, v, FakeLowerTriangularMask(), step="none")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    bd = FakeBlockDiagonalMask([2, 4], [2, 4])
    out = softstep_attention(q, k, v, bd)
    ref = torch.cat(
        [softstep_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :]),
         softstep_attention(q[..., 2:, :], k[..., 2:, :], v[..., 2:, :])], dim=-2,
    )
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="finite score biases"):
        softstep_attention(q, k, v, FakeTensorBias())


def test_real_xformers_biases():
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias", reason="xformers is not installed (optional extra)")
    q, k, v = qkv(n=6, s=6, dtype=torch.float32)
    out = softstep_attention(q, k, v, attn_bias.LowerTriangularMask(), step="none")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


# ---------------------------------------------------------------------------------------
# nn.MultiheadAttention and transformer layers
# ---------------------------------------------------------------------------------------


MHA_CONFIGS = [
    dict(batch_first=True),
    dict(batch_first=False, kdim=6, vdim=10),
    dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
    dict(batch_first=False, bias=False),
]


@pytest.mark.parametrize("cfg", MHA_CONFIGS)
def test_multihead_none_matches_torch(cfg):
    mha = nn.MultiheadAttention(16, 4, **cfg).double().eval()
    sw = MultiheadSoftStepAttention.from_multihead(mha, step="none").eval()
    kd, vd = cfg.get("kdim", 16), cfg.get("vdim", 16)
    bf = cfg["batch_first"]

    def seq(n, d):
        return torch.randn((2, n, d) if bf else (n, 2, d), dtype=D64)

    x, kk, vv = seq(5, 16), seq(7, kd), seq(7, vd)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    am = torch.rand(5, 7) > 0.8
    for kwargs in (
        {},
        dict(key_padding_mask=kpm),
        dict(attn_mask=am, key_padding_mask=kpm, average_attn_weights=False),
        dict(attn_mask=torch.zeros(5, 7, dtype=D64).masked_fill(am, -math.inf), need_weights=False),
    ):
        ref = mha(x, kk, vv, **kwargs)
        out = sw(x, kk, vv, **kwargs)
        torch.testing.assert_close(out[0], ref[0])
        if ref[1] is None:
            assert out[1] is None
        else:
            torch.testing.assert_close(out[1], ref[1])


def test_multihead_unbatched_causal_and_3d_mask():
    mha = nn.MultiheadAttention(8, 2).double().eval()
    sw = MultiheadSoftStepAttention.from_multihead(mha, step="none")
    x = torch.randn(5, 8, dtype=D64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=D64)
    ref = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(sw(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0], ref)
    xb = torch.randn(5, 3, 8, dtype=D64)
    m3 = torch.rand(3 * 2, 5, 5) > 0.7
    torch.testing.assert_close(sw(xb, xb, xb, attn_mask=m3)[0], mha(xb, xb, xb, attn_mask=m3)[0])
    with pytest.raises(ValueError, match="N\\*num_heads"):
        sw(xb, xb, xb, attn_mask=torch.ones(4, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim"):
        sw(torch.randn(5, 3, 6, dtype=D64), xb, xb)
    for error in (ValueError, RuntimeError):  # (RuntimeError: what nn.MultiheadAttention raises)
        with pytest.raises(error, match="pass attn_mask too"):
            sw(xb, xb, xb, is_causal=True)


def test_multihead_trains_and_keeps_state_dict_keys():
    mha = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True)
    sw = MultiheadSoftStepAttention.from_multihead(mha, mode="per_head").train()
    assert set(mha.state_dict()) < set(sw.state_dict())
    assert {k for k in sw.state_dict() if k.startswith("softstep.")} == {"softstep.step.raw"}
    x = torch.randn(3, 6, 16)
    out, w = sw(x, x, x)
    out.square().mean().backward()
    assert sw.softstep.step.raw.grad is not None and torch.isfinite(sw.in_proj_weight.grad).all()
    assert torch.isfinite(w).all()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's own fast path
def test_encoder_layer_and_encoder_none_match_torch():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=kpm)
        ref_causal = enc(x, mask=nn.Transformer.generate_square_subsequent_mask(6), is_causal=True)
        swapped = swap_attention(copy.deepcopy(enc), step="none")
        assert all(isinstance(m.self_attn, MultiheadSoftStepAttention) for m in swapped.layers)
        out = swapped(x, src_key_padding_mask=kpm)
        out_causal = swapped(x, mask=nn.Transformer.generate_square_subsequent_mask(6), is_causal=True)
    # the torch fast path zero-fills padded positions; compare real tokens
    torch.testing.assert_close(out[~kpm], ref[~kpm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_causal, ref_causal, atol=1e-5, rtol=1e-5)


def test_swap_attention_decoder_and_real_step():
    model = nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
                           batch_first=True).eval()
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        ref = model(src, tgt)
        swapped = swap_attention(copy.deepcopy(model), step="none")
        n_swapped = sum(isinstance(m, MultiheadSoftStepAttention) for m in swapped.modules())
        assert n_swapped == 3  # encoder self, decoder self, decoder cross
        torch.testing.assert_close(swapped(src, tgt), ref, atol=1e-5, rtol=1e-5)
        sig = swap_attention(copy.deepcopy(model), step="sigmoidal", init=(0.3, 0.7, 0.5))
        out = sig(src, tgt)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
    single = swap_attention(nn.MultiheadAttention(8, 2), step="none")
    assert isinstance(single, MultiheadSoftStepAttention)


# ---------------------------------------------------------------------------------------
# Monitoring
# ---------------------------------------------------------------------------------------


def test_monitor_per_layer_per_head_kept_fraction():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = swap_attention(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), init=(0.3, 0.8, 0.5)).eval()
    x = torch.randn(2, 10, 16)
    with AttentionMonitor(enc) as mon, torch.no_grad():
        enc(x)
    frac = mon.kept_fraction()
    assert list(frac) == ["layers.0.self_attn.softstep", "layers.1.self_attn.softstep"]
    for f in frac.values():
        assert f.shape == (4,) and ((f > 0) & (f <= 1)).all()
    assert "layers.0" in mon.summary()
    assert all(not m.track_stats for m in enc.modules() if isinstance(m, SoftStepAttention))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_monitor_counts_each_call_once_under_activation_checkpointing(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = swap_attention(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                           init=(0.3, 0.8, 0.5))
    x1, x2 = torch.randn(2, 10, 16, requires_grad=True), torch.randn(3, 10, 16, requires_grad=True)
    name = "self_attn.softstep"
    with AttentionMonitor(layer) as last:
        layer(x2)
    seen = []
    with AttentionMonitor(layer, accumulate=True) as plain:
        layer(x1).sum().backward()
        layer(x2).sum().backward()
    with AttentionMonitor(layer, accumulate=True) as mon:
        handle = layer.self_attn.softstep.register_stats_hook(lambda module, stats: seen.append(stats))
        for x in (x1, x2):
            checkpoint(layer, x, use_reentrant=use_reentrant).sum().backward()  # forward again in backward
        handle.remove()
    assert len(seen) == 2  # the recomputations are not calls
    torch.testing.assert_close(mon.kept_fraction()[name], plain.kept_fraction()[name])
    torch.testing.assert_close(mon.stats()[name].kept, last.stats()[name].kept)


def test_softstep_module_forward_returns_and_hooks_inside_the_wrapper():
    torch.manual_seed(0)
    mha = MultiheadSoftStepAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    seen = []
    mha.softstep.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        out, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
        mha(x, x, x, need_weights=False)
    assert len(seen) == 2
    inner_out, inner_weights = seen[0]
    torch.testing.assert_close(inner_weights, weights)
    assert isinstance(seen[1], torch.Tensor) and seen[1].shape == (3, 2, 5, 4)
    q = torch.randn(3, 2, 5, 4)
    plain = mha.softstep(q, q, q)
    o1, stats = mha.softstep(q, q, q, return_stats=True)
    o2, w = mha.softstep(q, q, q, need_weights=True)
    o3, stats3, w3 = mha.softstep(q, q, q, return_stats=True, need_weights=True)
    for o in (o1, o2, o3):
        torch.testing.assert_close(o, plain)
    torch.testing.assert_close(w3, w)
    torch.testing.assert_close(stats3.kept, stats.kept)
    torch.testing.assert_close(w @ q, plain)


def test_the_first_backward_of_a_process_is_seen_as_one_too():
    # the first backward's graph task has id 0: a check for ids above 0 missed its recomputations
    import subprocess
    import sys

    code = """
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from simwarp import swap_attention
from simwarp.monitoring import AttentionMonitor
layer = swap_attention(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True))
seen = []
with AttentionMonitor(layer, accumulate=True):
    layer.self_attn.softstep.register_stats_hook(lambda m, s: seen.append(s))
    checkpoint(layer, torch.randn(2, 5, 16, requires_grad=True), use_reentrant=False).sum().backward()
print(len(seen))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_monitor_accumulates_over_calls_and_nests():
    torch.manual_seed(0)
    layer = swap_attention(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                           init=(0.3, 0.8, 0.5)).eval()
    x1, x2 = torch.randn(2, 10, 16), torch.randn(3, 10, 16)
    name = "self_attn.softstep"
    with torch.no_grad():
        with AttentionMonitor(layer) as first:
            layer(x1)
        with AttentionMonitor(layer) as second:
            layer(x2)
        with AttentionMonitor(layer, accumulate=True) as both, AttentionMonitor(layer) as inner:
            layer(x1)
            layer(x2)
    f1, f2 = first.kept_fraction()[name], second.kept_fraction()[name]
    assert not torch.allclose(f1, f2)
    # rows weigh equally: 2·10 rows of the first call, 3·10 of the second
    torch.testing.assert_close(both.kept_fraction()[name], (2 * f1 + 3 * f2) / 5)
    torch.testing.assert_close(inner.kept_fraction()[name], f2)  # the last call
    torch.testing.assert_close(both.stats()[name].kept, second.stats()[name].kept)  # a nested monitor's
    assert first.kept_fraction()[name] is not None  # entering later monitors kept its record
    assert not layer.self_attn.softstep._stats_hooks and not layer.self_attn.softstep.track_stats
    with AttentionMonitor(layer) as mon:  # copies made inside a block do not take its hooks
        clone = copy.deepcopy(layer)
        pickled = pickle.loads(pickle.dumps(layer))
    assert not clone.self_attn.softstep._stats_hooks and not pickled.self_attn.softstep._stats_hooks
    with torch.no_grad():
        clone(x1)
    assert name not in mon.stats()


def test_encoder_layer_fast_path_does_not_bypass_softstep():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():  # the conditions of torch's fused inference fast path
        ref = layer(x)
        out = swap_attention(copy.deepcopy(layer), init=(0.4, 0.6, 0.3))(x)
    assert not torch.allclose(out, ref, atol=1e-4)


def test_encoder_built_after_the_swap_takes_nested_batches():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    reference = nn.TransformerEncoder(copy.deepcopy(layer), num_layers=2, enable_nested_tensor=False).eval()
    swapped_layer = simwarp.swap_attention(layer, step="none")
    encoder = nn.TransformerEncoder(swapped_layer, num_layers=2).eval()  # nested-tensor path on
    encoder.load_state_dict(simwarp.swap_attention(copy.deepcopy(reference), step="none").state_dict())
    assert encoder.use_nested_tensor
    x = torch.randn(2, 3, 16)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    with torch.no_grad():
        got = encoder(x, src_key_padding_mask=pad)
        want = reference(x, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_swap_keeps_sharing_and_frozen_parameters():
    mha = nn.MultiheadAttention(16, 4)
    mha.in_proj_weight.requires_grad_(False)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(mha)
            self.b = nn.ModuleList([mha])

    model = simwarp.swap_attention(Two())
    assert isinstance(model.a[0], simwarp.MultiheadSoftStepAttention) and model.a[0] is model.b[0]
    assert not model.a[0].in_proj_weight.requires_grad and model.a[0].out_proj.weight.requires_grad
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in model.a[0].parameters())


def test_swap_keeps_the_hooks_of_the_replaced_modules():
    """Hooks on a swapped nn.MultiheadAttention (a common way to capture attention maps) were
    silently lost: they run on the replacement, and their handles still remove them."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1, enable_nested_tensor=False)
    old = enc.layers[0].self_attn
    seen = []
    forward = old.register_forward_hook(lambda m, args, out: seen.append(("forward", type(m).__name__)))
    old.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    old.register_full_backward_hook(lambda m, gi, go: seen.append(("backward", type(m).__name__)))
    old.register_state_dict_post_hook(lambda m, sd, prefix, local: seen.append(("state_dict", type(m).__name__)))
    simwarp.swap_attention(enc, step="none")
    new = enc.layers[0].self_attn
    assert isinstance(new, simwarp.MultiheadSoftStepAttention)
    enc(torch.randn(2, 5, 16, requires_grad=True)).sum().backward()
    enc.state_dict()
    name = "MultiheadSoftStepAttention"
    assert seen == [("pre", name), ("forward", name), ("backward", name), ("state_dict", name)]
    seen.clear()
    forward.remove()
    new.eval()(torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    assert seen == [("pre", name)]


def test_swap_keeps_load_state_dict_hooks_and_those_of_a_module_swapped_alone():
    """load_state_dict pre-hooks hold their module weakly: taken over as they were, loading
    raised "You are trying to call the hook of a dead Module!" once the old module was gone."""
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    loaded = []
    layer.self_attn.register_load_state_dict_pre_hook(lambda module, *args: loaded.append(type(module).__name__))
    simwarp.swap_attention(layer, step="none")
    gc.collect()
    layer.load_state_dict(layer.state_dict())
    assert loaded == ["MultiheadSoftStepAttention"]
    mha, seen = nn.MultiheadAttention(16, 4), []
    mha.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    swapped = simwarp.swap_attention(mha, step="none")
    x = torch.randn(5, 2, 16)
    swapped(x, x, x)
    assert seen == ["MultiheadSoftStepAttention"]


def test_swap_keeps_the_parameter_objects_tied_weights_and_an_earlier_optimizer():
    """from_multihead copied the weights through state_dict(): tied parameters and a shared
    out_proj came apart, and an optimizer built before the swap trained dead copies."""
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.MultiheadAttention(8, 2, batch_first=True), nn.MultiheadAttention(8, 2, batch_first=True)
            self.b.out_proj = self.a.out_proj
            self.b.in_proj_weight = self.a.in_proj_weight

        def forward(self, x):
            return self.b(self.a(x, x, x)[0], x, x)[0]

    model = Tied()
    before = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    simwarp.swap_attention(model, step="none")
    after = {name: p for name, p in model.named_parameters(remove_duplicate=False) if "softstep" not in name}
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert model.a.out_proj is model.b.out_proj and model.a.in_proj_weight is model.b.in_proj_weight
    old = model.a.in_proj_weight.detach().clone()
    model(torch.randn(2, 5, 8)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.a.in_proj_weight.detach(), old)


def test_swap_names_unknown_options():
    with pytest.raises(TypeError, match=r"unexpected step options \['dtype'\]"):
        simwarp.swap_attention(nn.Sequential(nn.MultiheadAttention(8, 2)), dtype=torch.float64)
    with pytest.raises(TypeError, match=r"unexpected step options \['device'\]"):
        simwarp.MultiheadSoftStepAttention.from_multihead(nn.MultiheadAttention(8, 2), device="cpu")


def test_swap_warns_when_there_is_nothing_to_swap():
    """A model without nn.MultiheadAttention (a typo, a transformers model) came back unchanged
    and silently; a model swapped before does not warn."""
    with pytest.warns(UserWarning, match="found no nn.MultiheadAttention in Sequential"):
        simwarp.swap_attention(nn.Sequential(nn.Linear(4, 4)))
    swapped = simwarp.swap_attention(nn.Sequential(nn.MultiheadAttention(8, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simwarp.swap_attention(swapped)


def test_swap_replaces_every_name_of_a_module_and_leaves_custom_forwards_alone():
    mha = nn.MultiheadAttention(8, 2)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_a = self.attn_b = mha  # one parent, two names (named_children() yields one)
            self.stack = nn.ModuleList([mha] * 3)

    model = simwarp.swap_attention(Twice())
    swapped = [model.attn_a, model.attn_b, *model.stack]
    assert all(m is swapped[0] for m in swapped) and isinstance(swapped[0], simwarp.MultiheadSoftStepAttention)

    class Gated(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            out, w = super().forward(*args, **kwargs)
            return out * 0.5, w

    holder = nn.Sequential(Gated(8, 2))
    with pytest.warns(UserWarning, match="overrides nn.MultiheadAttention.forward"):
        simwarp.swap_attention(holder)
    assert type(holder[0]) is Gated


def test_swap_again_with_other_options_needs_overwrite():
    layer = simwarp.swap_attention(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), step="none")
    simwarp.swap_attention(layer, step="none")  # the same options: nothing to do
    with pytest.raises(ValueError, match="overwrite=True"):
        simwarp.swap_attention(layer, step="sigmoidal", mode="instance")
    assert layer.self_attn.softstep_options["step"] == "none"
    simwarp.swap_attention(layer, step="sigmoidal", mode="instance", overwrite=True)
    assert layer.self_attn.softstep_options == {"mode": "instance", "step": "sigmoidal", "init": None, "hidden": None}
    assert layer.self_attn.softstep.mode == "instance"
    out = layer(torch.randn(2, 5, 8))
    assert out.shape == (2, 5, 8) and torch.isfinite(out).all()
    del layer.self_attn.softstep_options  # as in a module pickled by an older simwarp
    with pytest.warns(UserWarning, match="cannot be checked"):
        simwarp.swap_attention(layer, step="none")
    assert layer.self_attn.softstep.mode == "instance"


def test_swap_changes_nothing_when_it_fails():
    """A parametrized MultiheadAttention cannot be taken over, and a swapped one asked for other
    options without overwrite raises: both before any module is replaced (the first layer was
    swapped, the second not, before)."""
    from torch.nn.utils import parametrize

    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, batch_first=True), 2, enable_nested_tensor=False)
    parametrize.register_parametrization(enc.layers[1].self_attn, "in_proj_weight", nn.Identity())
    with pytest.raises(ValueError, match="parametrized parameters.*nothing was swapped"):
        simwarp.swap_attention(enc)
    assert not any(isinstance(m, simwarp.MultiheadSoftStepAttention) for m in enc.modules())
    with pytest.raises(ValueError, match="swap first"):
        simwarp.MultiheadSoftStepAttention.from_multihead(enc.layers[1].self_attn)
    model = nn.ModuleList([simwarp.swap_attention(nn.TransformerEncoderLayer(8, 2, 16), step="none"),
                           nn.TransformerEncoderLayer(8, 2, 16)])
    with pytest.raises(ValueError, match="overwrite=True"):
        simwarp.swap_attention(model, step="poly")
    assert type(model[1].self_attn) is nn.MultiheadAttention
    instance = simwarp.swap_attention(nn.TransformerEncoderLayer(8, 2, 16), mode="instance")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the up-front check of the options warned "per_head ignores hidden"
        simwarp.swap_attention(instance, hidden=4, overwrite=True)
    assert instance.self_attn.softstep_options["hidden"] == 4
    with pytest.raises(ValueError, match="step must be one of"):  # a bad value, with overwrite: nothing recorded
        simwarp.swap_attention(model, step="bogus", overwrite=True)
    assert model[0].self_attn.softstep_options["step"] == "none" and type(model[1].self_attn) is nn.MultiheadAttention
    simwarp.swap_attention(model, step="none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_step_parameters_follow_the_module_dtype(dtype):
    built = simwarp.MultiheadSoftStepAttention(8, 2, dtype=dtype, mode="instance")
    copied = simwarp.MultiheadSoftStepAttention.from_multihead(nn.MultiheadAttention(8, 2, dtype=dtype))
    for module in (built, copied):
        assert {p.dtype for p in module.parameters()} == {dtype}


def test_returned_weights_are_the_ones_that_met_the_values():
    torch.manual_seed(0)
    layer = SoftStepAttention(2, 4)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3)
    torch.manual_seed(1)
    out, _, weights = layer.attend(q, k, v, dropout_p=0.5, need_weights=True)
    torch.testing.assert_close(out, weights @ v)
    kept = weights > 0
    assert 0 < kept.sum() < (layer.attend(q, k, v, need_weights=True)[2] > 0).sum()


@pytest.mark.parametrize("scale", [0.0, -0.7, 0.3])
def test_scale_accepts_what_sdpa_accepts(scale):
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    want = F.scaled_dot_product_attention(q, k, v, scale=scale)
    for given in (scale, np.float32(scale), torch.tensor(scale)):
        got = simwarp.softstep_attention(q, k, v, scale=given, step="none")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        simwarp.softstep_attention(q, k, v, scale=math.inf, step="none")
    out = simwarp.softstep_attention(q, k, v, dropout_p=np.float32(0.0), step="none")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_nested_batches_keep_gradients_in_training():
    mha = simwarp.MultiheadSoftStepAttention(8, 2, batch_first=True).train()
    a = torch.randn(3, 8, requires_grad=True)
    nested = torch.nested.as_nested_tensor([a, torch.randn(5, 8)])
    out, _ = mha(nested, nested, nested)
    out.to_padded_tensor(0.0).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and mha.in_proj_weight.grad is not None


def test_softstep_attention_traces_without_graph_breaks():
    q = torch.randn(2, 4, 16, 8)
    explanation = torch._dynamo.explain(lambda x: simwarp.softstep_attention(x, x, x, a=torch.tensor(0.2)))(q)
    assert explanation.graph_break_count == 0, [str(b.reason)[:120] for b in explanation.break_reasons]


def test_valid_counts_follow_causal_and_padding():
    q, k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 2)
    _, st = softstep_attention(q, k, v, is_causal=True, return_stats=True)
    assert st.valid.flatten().tolist() == [1, 2, 3, 4, 5]
    q, k, v = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 2)
    padding = torch.tensor([True, True, False, True, True, False]).view(1, 1, 1, 6)
    _, st = softstep_attention(q, k, v, attn_mask=padding, is_causal=True, return_stats=True)
    assert st.valid.flatten().tolist() == [1, 2, 2, 3]
    _, st = softstep_attention(q, k, v, attn_mask=padding, return_stats=True)
    assert st.valid.flatten().tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_one_value_head_broadcasts_over_the_key_heads(enable_gqa):
    """SDPA broadcasts a value with one head over the keys' heads; it was refused."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 2 if enable_gqa else 4, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 1, 7, 3, dtype=torch.float64)
    out = softstep_attention(q, k, v, step="none", enable_gqa=enable_gqa)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v.expand(-1, k.shape[1], -1, -1), enable_gqa=enable_gqa))
    with pytest.raises(ValueError, match="same number of heads" if enable_gqa else "do not broadcast"):
        softstep_attention(q, k, torch.randn(2, 3, 7, 3, dtype=torch.float64), step="none", enable_gqa=enable_gqa)


def test_one_key_head_broadcasts_over_the_value_heads_without_gqa():
    """Without GQA the heads are a batch dim: SDPA broadcasts a key with one head over the
    values' heads (and the queries'); it was refused ("must have the same number of heads")."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 1, 7, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(softstep_attention(q, k, v, step="none"), ref)
    torch.testing.assert_close(softstep_attention(q, k, v), softstep_attention(q, k.expand(2, 3, 7, 8), v))


def test_nested_tensors_are_refused_clearly():
    nested = torch.nested.nested_tensor([torch.randn(2, n, 8) for n in (3, 5)], layout=torch.jagged)
    with pytest.raises(ValueError, match=r"query is a nested \(jagged\) tensor"):
        softstep_attention(nested, nested, nested)


@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")  # (torch's, for L > S)
@pytest.mark.parametrize(("n", "s"), [(3, 7), (7, 7), (7, 3)])
@pytest.mark.parametrize("variant", ["causal_upper_left", "causal_lower_right"])
def test_pytorchs_causal_biases_as_sdpa_reads_them(variant, n, s):
    """torch.nn.attention.bias's causal masks (tensor subclasses) were read as additive float
    masks and refused ("entries other than 0 and -inf")."""
    from torch.nn.attention import bias

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, width, dtype=torch.float64) for length, width in ((n, 8), (s, 8), (s, 4)))
    causal = getattr(bias, variant)(n, s)
    allowed = causal._materialize(q.device)  # (the bool mask SDPA applies)
    out = softstep_attention(q, k, v, attn_mask=causal, step="none")
    want = softstep_attention(q, k, v, attn_mask=allowed, step="none")
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    rows = allowed.any(-1)  # (SDPA's rows without a key are NaN; ours are 0)
    torch.testing.assert_close(out[..., rows, :], F.scaled_dot_product_attention(q, k, v, attn_mask=causal)[..., rows, :])
    with pytest.raises(ValueError, match="CausalBias and is_causal"):
        softstep_attention(q, k, v, attn_mask=causal, is_causal=True)
    with pytest.raises(ValueError, match="CausalBias for"):
        softstep_attention(q[..., :1, :], k, v, attn_mask=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(4, 1), (1, 1), (2, 1, 4, 1), (1, 6), (4, 6)])
def test_valid_counts_of_a_mask_that_broadcasts(shape, causal):
    """A mask with a key dim of 1 (SDPA broadcasts it over the keys) counted one key per row,
    so the kept fraction came out above 1; every row's count is its expanded mask's."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 3)
    mask = torch.rand(shape) > 0.3
    mask.view(-1)[0] = True
    _, st = softstep_attention(q, k, v, attn_mask=mask, is_causal=causal, step="none", return_stats=True)
    full = mask.expand(2, 2, 4, 6)
    if causal:
        full = full & torch.ones(4, 6, dtype=torch.bool).tril()
    assert torch.equal(st.valid, full.sum(-1).to(st.valid.dtype))
    assert (st.kept <= st.valid).all()
    assert (st.kept_fraction <= 1).all()


def test_gqa_shape_errors_name_the_users_layout():
    """With grouped-query attention the backend sees (..., Hkv, G, L): shape errors named that
    layout ("mask of shape (1, 1, 1, 3, 7)") instead of the arguments the user passed."""
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 7\) does not broadcast to \(..., Hq, L, S\) = \(2, 4, 3, 6\)"):
        softstep_attention(q, k, v, enable_gqa=True, attn_mask=torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"a of shape \(2, 4, 5\) does not broadcast to the rows"):
        softstep_attention(q, k, v, enable_gqa=True, a=torch.full((2, 4, 5), 0.1))


def test_shape_errors_name_sdpas_arguments():
    """Without GQA the backend's checks named its own arguments ("mask of shape ... (..., n, m)",
    "leading dims of q ..."), not the attn_mask / query / key the caller passed."""
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8)
    with pytest.raises(ValueError, match=r"^attn_mask of shape \(3, 5, 7\) does not broadcast to \(..., L, S\) = \(2, 4, 5, 7\)"):
        softstep_attention(q, k, k, attn_mask=torch.ones(3, 5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^the leading dims of query \(2, 4, 5, 8\), key \(3, 4, 7, 8\) and value"):
        softstep_attention(q, torch.randn(3, 4, 7, 8), torch.randn(3, 4, 7, 8))
    mask = torch.rand(4, 5, 7) > 0.3  # leading dims of the mask and value alone still broadcast
    out = softstep_attention(q, k, torch.randn(3, 1, 4, 7, 6), attn_mask=mask, step="none")
    assert out.shape == (3, 2, 4, 5, 6)


def test_swap_draws_no_random_numbers():
    """The swapped module was built with its own (discarded) projections first: their init drew
    from the global generator, so a softmax and a SoftStep run from one seed diverged after it."""
    torch.manual_seed(0)
    nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, batch_first=True), 2, enable_nested_tensor=False)
    want = torch.randn(3)
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, batch_first=True), 2, enable_nested_tensor=False)
    simwarp.swap_attention(enc, mode="per_head", step="none")
    assert torch.equal(torch.randn(3), want)
    assert not any(p.is_meta for p in enc.parameters())


# ---------------------------------------------------------------------------------------
# Wrapper details a second mutation audit found untested
# ---------------------------------------------------------------------------------------


def test_multihead_wrapper_details():
    torch.manual_seed(0)
    mha = MultiheadSoftStepAttention(8, 2, step="none").eval()
    # -5000 is a score bias, not a mask (masked means -inf or at most -1e4)
    with pytest.raises(ValueError, match="entries other than 0"):
        additive_mask_to_bool(torch.tensor([0.0, -5000.0]))
    # is_causal with a key padding mask: the causal mask given is combined with the padding
    x = torch.randn(4, 2, 8)
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[:, 0] = True
    with torch.no_grad():
        hinted, _ = mha(x, x, x, attn_mask=causal, key_padding_mask=padding, is_causal=True)
        plain, _ = mha(x, x, x, attn_mask=causal, key_padding_mask=padding)
    torch.testing.assert_close(hinted[1:], plain[1:])
    # unbatched input: unbatched weights
    x2 = torch.randn(4, 8)
    assert mha(x2, x2, x2)[1].shape == (4, 4)
    # from_multihead keeps the mode; swap_attention turns the encoder's nested path off
    assert not MultiheadSoftStepAttention.from_multihead(nn.MultiheadAttention(8, 2, dropout=0.5).eval()).training
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=True)
    swap_attention(enc)
    assert enc.use_nested_tensor is False


def test_stats_counts_without_a_mask_and_over_empty_rows():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 3)
    _, st = softstep_attention(q, k, v, step="none", return_stats=True)
    assert st.valid.eq(5).all()
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0] = False  # an empty row: not counted
    mask[:, 0] = False
    _, st = softstep_attention(q, k, v, attn_mask=mask, step="none", return_stats=True)
    torch.testing.assert_close(st.head_kept_fraction(), torch.ones(2))


def test_swap_with_overwrite_restores_a_module_without_recorded_options():
    m = swap_attention(nn.Sequential(nn.MultiheadAttention(8, 2)), step="none")
    m[0].softstep_options = None  # as a module pickled before the options were recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_attention(m, overwrite=True, step="log")
    assert m[0].softstep.step.step == "log"


def test_monitor_restores_flags_and_starts_each_block_afresh():
    layer = swap_attention(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    soft = layer.self_attn.softstep
    soft.track_stats = True
    x = torch.randn(2, 5, 8)
    mon = AttentionMonitor(layer, accumulate=True)
    with mon:
        layer(x)
    assert soft.track_stats is True  # restored, not switched off
    first = mon.kept_fraction()
    with mon:
        pass
    assert mon.stats() == {} and mon.kept_fraction() == {}
    with mon:
        layer(x)
    torch.testing.assert_close(mon.kept_fraction()[next(iter(first))], next(iter(first.values())))
    # a head without rows to count is left out of the layer's mean in the summary
    two = SoftStepAttention(2, 8, step="none")
    q = torch.randn(1, 2, 3, 8)
    q[:, 0] = float("nan")
    with AttentionMonitor(nn.ModuleList([two])) as seen:
        two(q, q, q)
    assert "mean 1.000" in seen.summary()


def test_bad_inputs_found_by_an_audit_raise_errors_that_name_them():
    x = torch.randn(3, 2, 4)
    mha = MultiheadSoftStepAttention(4, 2)
    # flags: a string reversed the caller's intent (average_attn_weights="no" averaged)
    for kwargs in (dict(average_attn_weights="no"), dict(need_weights="yes"), dict(is_causal="yes")):
        with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be a bool"):
            mha(x, x, x, **kwargs)
    assert mha(x, x, x, need_weights=0)[1] is None and mha(x, x, x, is_causal=None)[0].shape == x.shape
    with pytest.raises(TypeError, match="key_padding_mask must be a torch.Tensor or None, got list"):
        mha(x, x, x, key_padding_mask=[[False] * 3] * 2)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        simwarp.softstep_attention(q, q, q, is_causal="yes")
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        simwarp.softstep_attention(q, q, q, enable_gqa="yes")
    with pytest.raises(TypeError, match="query must be a torch.Tensor, got list"):
        mha.softstep([[1.0]], q, q)
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        mha.softstep(q, q, q, return_stats="no")
    # constructor arguments: nn.MultiheadAttention asserts, or checks dropout only when applying it
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        MultiheadSoftStepAttention(5, 2)
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        MultiheadSoftStepAttention("4", 2)
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\], got 1.5"):
        MultiheadSoftStepAttention(4, 2, dropout=1.5)
    with pytest.raises(ValueError, match="head_dim must be a positive int or None"):
        SoftStepAttention(2, head_dim="4")
    for bad in (None, "x", [mha]):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            swap_attention(bad)
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            AttentionMonitor(bad)
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        swap_attention(nn.Sequential(), overwrite="yes")
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        AttentionMonitor(mha, accumulate="no")
    with pytest.raises(ValueError, match="digits must be a non-negative int"):
        AttentionMonitor(mha).summary(digits=-1)
    with pytest.raises(TypeError, match="query has dtype torch.float64 but this module's parameters are torch.float32"):
        mha(x.double(), x.double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes them on purpose
        assert mha(x.bfloat16(), x.bfloat16(), x.bfloat16())[0].dtype == torch.bfloat16


def test_monitoring_is_reachable_from_the_package():
    import subprocess
    import sys

    code = "import simwarp; print(simwarp.monitoring.AttentionMonitor.__name__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "AttentionMonitor"
