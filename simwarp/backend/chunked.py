"""Two-pass streaming over key blocks in plain PyTorch (CPU and CUDA).

Forward (DESIGN §3): pass 1 keeps each row's running min/max (and their key indices) over
valid keys; pass 2 recomputes scores block by block, applies the step and runs an online
softmax into the output. Only per-row statistics are saved for backward.

Backward recomputes each block under autograd and pulls ``dℓ = w (δ - D)`` back through the
block's graph (similarity, range normalisation, step), so every metric and every registered
step gets exact gradients without a hand-written derivative. The gradient of the row range
(``∂L/∂lo``, ``∂L/∂hi`` accumulated over blocks) is finally routed to the argmin/argmax key of
each row (the first such key on ties), as in ``GRADIENTS.md``. Memory is ``O(rows · chunk)``
in both directions.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from simwarp.backend.common import (
    WarpSpec,
    key_bias,
    row_extremum,
    row_is_empty,
    warp_logits,
    work_dtype,
)
from simwarp.similarity import paired_similarity, pairwise_similarity

#: Target number of score entries per block (rows × keys): 1 MB per float32 temporary. The
#: step math keeps a few dozen block-sized temporaries alive at peak (more in backward);
#: larger blocks were not faster on CPU (benchmarks/RESULTS.md).
BLOCK_ELEMENTS = 1 << 18


def default_chunk_size(rows: int, m: int) -> int:
    """Key-block width so that ``rows · chunk ≈ BLOCK_ELEMENTS`` (at least 64, at most m)."""
    return max(1, min(m, max(64, BLOCK_ELEMENTS // max(rows, 1))))


def _blocks(m: int, chunk: int):
    for start in range(0, m, chunk):
        yield start, min(start + chunk, m)


class _KeyBlocks:
    """Similarities and key validity of one call, block by block (shared by both passes)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, mask, spec: WarpSpec, batch, dtype) -> None:
        self.n, self.m = q.shape[-2], k.shape[-2]
        self.qw, self.kw, self.spec = q.to(dtype), k.to(dtype), spec
        self.mask = None if mask is None else mask.expand(*batch, self.n, self.m)

    def __call__(self, start: int, stop: int):
        s = pairwise_similarity(self.qw, self.kw[..., start:stop, :], self.spec.metric, self.spec.scale)
        bias = key_bias(
            self.mask, self.n, start, stop, causal=self.spec.causal, exclude_self=self.spec.exclude_self,
            dtype=s.dtype, device=s.device,
        )
        return s, bias


def streaming_range(blocks: _KeyBlocks, batch, chunk: int):
    """Pass 1: each row's min/max over valid keys and their key indices (first index wins ties).

    Returns ``lo, hi, argmin, argmax, empty``, each ``(*batch, n)``; empty rows get ``lo = hi = 0``.
    """
    dtype, device, n = blocks.qw.dtype, blocks.qw.device, blocks.n
    lo = torch.full((*batch, n), math.inf, dtype=dtype, device=device)
    hi = torch.full((*batch, n), -math.inf, dtype=dtype, device=device)
    argmin = torch.zeros((*batch, n), dtype=torch.long, device=device)
    argmax = torch.zeros_like(argmin)
    for start, stop in _blocks(blocks.m, chunk):
        s, bias = blocks(start, stop)
        block_min, idx_min = row_extremum(s if bias is None else s - bias, largest=False)
        block_max, idx_max = row_extremum(s if bias is None else s + bias, largest=True)
        new_min, new_max = block_min < lo, block_max > hi
        lo, argmin = torch.where(new_min, block_min, lo), torch.where(new_min, idx_min + start, argmin)
        hi, argmax = torch.where(new_max, block_max, hi), torch.where(new_max, idx_max + start, argmax)
    empty = torch.isinf(lo)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0), argmin, argmax, empty


class _ChunkedWarp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, t, mask, spec: WarpSpec, chunk: int, dropout_p: float, seed: int, row_range):
        dtype = work_dtype(q.dtype)
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        n, m, e = q.shape[-2], k.shape[-2], v.shape[-1]
        scores = _KeyBlocks(q, k, mask, spec, batch, dtype)

        if row_range is None:
            lo, hi, argmin, argmax, empty = streaming_range(scores, batch, chunk)
        else:  # a range fixed by the caller (e.g. over a bank sharded across ranks): a constant
            lo, hi = (x.detach().to(dtype).expand(*batch, n).clone() for x in row_range)
            argmin = argmax = torch.zeros((*batch, n), dtype=torch.long, device=q.device)
            empty = None  # known after pass 2
        lo1, hi1 = lo.unsqueeze(-1), hi.unsqueeze(-1)

        # Pass 2: step + online softmax + value accumulation.
        run_max = torch.full((*batch, n), -math.inf, dtype=dtype, device=q.device)
        denom = torch.zeros((*batch, n), dtype=dtype, device=q.device)
        acc = torch.zeros((*batch, n, e), dtype=dtype, device=q.device)
        kept = torch.zeros((*batch, n), dtype=dtype, device=q.device)
        any_valid = torch.zeros((*batch, n), dtype=torch.bool, device=q.device)
        dropout = _Dropout(dropout_p, seed, q.device)
        for start, stop in _blocks(m, chunk):
            s, bias = scores(start, stop)
            if empty is None:
                any_valid |= ~row_is_empty(bias, s.shape, s.device)
            logits = warp_logits(s, lo1, hi1, bias, a, b, t, spec)
            new_max = torch.maximum(run_max, logits.amax(-1))
            shift = new_max.masked_fill(torch.isinf(new_max), 0.0)
            rescale = torch.exp(run_max - shift)
            p = torch.exp(logits - shift.unsqueeze(-1))
            denom = denom * rescale + p.sum(-1)
            acc = acc * rescale.unsqueeze(-1) + dropout(p) @ v[..., start:stop, :].to(dtype)
            kept += (logits > -math.inf).sum(-1)
            run_max = new_max
        if empty is None:
            empty = ~any_valid
        nonempty = denom > 0
        denom = torch.where(nonempty, denom, 1.0)
        out = torch.where(nonempty.unsqueeze(-1), acc / denom.unsqueeze(-1), 0.0)
        lse = torch.where(nonempty, run_max + torch.log(denom), -math.inf)

        ctx.spec, ctx.chunk, ctx.has_mask = spec, chunk, mask is not None
        ctx.dropout_p, ctx.seed, ctx.fixed_range = dropout_p, seed, row_range is not None
        optional_mask = () if mask is None else (mask,)
        ctx.save_for_backward(q, k, v, a, b, t, *optional_mask, out, lse, lo, hi, argmin, argmax)
        ctx.mark_non_differentiable(kept, lo, hi, empty)
        return out.to(q.dtype), lse, kept, lo, hi, empty

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_lse, *_unused):
        saved = list(ctx.saved_tensors)
        q, k, v, a, b, t = saved[:6]
        mask = saved[6] if ctx.has_mask else None
        out, lse, lo, hi, argmin, argmax = saved[-6:]
        spec: WarpSpec = ctx.spec
        need_q, need_k, need_v, need_a, need_b, need_t = ctx.needs_input_grad[:6]
        dtype = work_dtype(q.dtype)
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
        mask_x = None if mask is None else mask.expand(*batch, n, m)

        g = torch.zeros_like(out) if g_out is None else g_out.to(dtype)
        delta_row = (g * out).sum(-1)  # D in GRADIENTS.md
        if g_lse is not None:
            delta_row = delta_row - g_lse.to(dtype)
        lse_safe = lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1)

        track_range = not (spec.detach_range or ctx.fixed_range) and (need_q or need_k)
        q_ = q.detach().requires_grad_(need_q)
        a_, b_, t_ = (p.detach().requires_grad_(need) for p, need in ((a, need_a), (b, need_b), (t, need_t)))
        lo_ = lo.detach().unsqueeze(-1).requires_grad_(track_range)
        hi_ = hi.detach().unsqueeze(-1).requires_grad_(track_range)
        graph_leaves = [q_, a_, b_, t_, lo_, hi_]
        sums: list[torch.Tensor | None] = [None] * len(graph_leaves)
        dk = torch.zeros_like(k) if need_k else None
        dv = torch.zeros_like(v) if need_v else None

        dropout = _Dropout(ctx.dropout_p, ctx.seed, q.device)
        for start, stop in _blocks(m, ctx.chunk):
            k_c = k[..., start:stop, :].detach().requires_grad_(need_k)
            v_c = v[..., start:stop, :].to(dtype)
            bias = key_bias(
                mask_x, n, start, stop, causal=spec.causal, exclude_self=spec.exclude_self, dtype=dtype, device=q.device
            )
            with torch.enable_grad():
                s = pairwise_similarity(q_.to(dtype), k_c.to(dtype), spec.metric, spec.scale)
                logits = warp_logits(s, lo_, hi_, bias, a_, b_, t_, spec)
            w = torch.exp(logits.detach() - lse_safe)
            w_out = dropout(w)  # the weights that multiplied v in forward
            if need_v:
                dv[..., start:stop, :] += (w_out.transpose(-1, -2) @ g).sum_to_size(v_c.shape).to(v.dtype)
            d_logits = w_out * (g @ v_c.transpose(-1, -2)) - w * delta_row.unsqueeze(-1)
            wrt = [x for x in (*graph_leaves, k_c) if x.requires_grad]
            if not wrt:
                continue
            grads = dict(zip(map(id, wrt), torch.autograd.grad(logits, wrt, d_logits, allow_unused=True)))
            for i, leaf in enumerate(graph_leaves):
                gi = grads.get(id(leaf))
                if gi is not None:
                    sums[i] = gi if sums[i] is None else sums[i] + gi
            if need_k and grads.get(id(k_c)) is not None:
                dk[..., start:stop, :] += grads[id(k_c)]

        dq, da, db, dt, g_lo, g_hi = sums
        if track_range and (g_lo is not None or g_hi is not None):
            # Route ∂L/∂lo and ∂L/∂hi to the similarity of each row's argmin / argmax key.
            k_leaf = k.detach().requires_grad_(need_k)
            with torch.enable_grad():
                kx = k_leaf.to(dtype).expand(*batch, m, d)
                qx = q_.to(dtype).expand(*batch, n, d)
                picked = [torch.gather(kx, -2, idx.unsqueeze(-1).expand(*batch, n, d)) for idx in (argmin, argmax)]
                s_range = [paired_similarity(qx, kp, spec.metric, spec.scale) for kp in picked]
            seeds = [torch.zeros_like(s_range[0]) if gr is None else gr.squeeze(-1) for gr in (g_lo, g_hi)]
            wrt = [x for x in (q_, k_leaf) if x.requires_grad]
            range_grads = torch.autograd.grad(s_range, wrt, seeds, allow_unused=True)
            range_grads = dict(zip(map(id, wrt), range_grads))
            if need_q and range_grads.get(id(q_)) is not None:
                dq = range_grads[id(q_)] if dq is None else dq + range_grads[id(q_)]
            if need_k and range_grads.get(id(k_leaf)) is not None:
                dk += range_grads[id(k_leaf)]

        if need_q and dq is None:
            dq = torch.zeros_like(q)
        return dq, dk, dv, da, db, dt, None, None, None, None, None, None


class _Dropout:
    """Inverted dropout on weight blocks whose masks replay identically in backward: the
    blocks are drawn in the same order from a generator seeded once per call."""

    def __init__(self, p: float, seed: int, device: torch.device) -> None:
        self.p = p
        self.generator = None
        if p > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            return w
        keep = torch.rand(w.shape, generator=self.generator, device=w.device, dtype=w.dtype) >= self.p
        return w * keep / (1.0 - self.p)


def _chunk_for(q, k, v, chunk_size: int | None):
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], *(() if v is None else (v.shape[:-2],)))
    rows = q.shape[-2] * math.prod(batch)
    return batch, (default_chunk_size(rows, k.shape[-2]) if chunk_size is None else chunk_size)


def chunked_warp_attend(
    q, k, v, a, b, t, mask, spec: WarpSpec, chunk_size: int | None, dropout_p: float = 0.0, row_range=None
):
    """Streaming forward/backward; returns ``(out, lse, kept, lo, hi, empty)``."""
    _, chunk = _chunk_for(q, k, v, chunk_size)
    # Seed drawn from torch's default generator, so torch.manual_seed makes dropout reproducible.
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else 0
    return _ChunkedWarp.apply(q, k, v, a, b, t, mask, spec, chunk, dropout_p, seed, row_range)


@torch.no_grad()
def chunked_warp_range(q, k, mask, spec: WarpSpec, chunk_size: int | None):
    """Pass 1 alone: ``(lo, hi, empty)`` per row, streaming over key blocks (no gradients)."""
    batch, chunk = _chunk_for(q, k, None, chunk_size)
    lo, hi, _, _, empty = streaming_range(_KeyBlocks(q, k, mask, spec, batch, work_dtype(q.dtype)), batch, chunk)
    return lo, hi, empty
