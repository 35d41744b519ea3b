"""Two-pass streaming over key blocks in plain PyTorch (CPU and CUDA).

Forward (docs/backend.md): pass 1 keeps each row's running min/max (and their key indices) over
valid keys; pass 2 recomputes scores block by block, applies the step and accumulates the
softmax into the output. Only per-row statistics are saved for backward.

For the built-in steps over the rows' own range, pass 1 has found each row's largest logit
(its best key, ``m = 1``), so pass 2 sums the mask form's numerators
(:func:`~simwarp.backend.common.masked_numerator`) directly, with no running maximum, and the
backward applies the closed-form :func:`~simwarp.backend.common.warp_backward` per block. User
steps and a range fixed from outside take the general path: an online softmax over
``ℓ = s/τ + φ(u)``; its backward applies the built-in steps' closed forms
(:func:`~simwarp.backend.common.closed_form_logits`) and pulls ``dℓ = w (δ - D)`` back through
each block's autograd graph of a user step, so every registered step gets exact gradients
without a hand-written derivative. Either way the similarity's own gradient is written out
(:func:`~simwarp.similarity.pairwise_similarity_backward`), so that ``torch.compile`` traces
the backward of the built-in steps (it cannot trace ``torch.autograd.grad``). The gradient of
the row range (``∂L/∂lo``, ``∂L/∂hi`` accumulated over blocks) is finally routed to the
argmin/argmax key of each row (the first such key on ties), as in ``docs/gradients.md``. Memory is
``O(rows · chunk)`` in both directions.
"""

from __future__ import annotations

import math

import torch

from simwarp._autograd import first_order, unaliased
from simwarp.backend.common import (
    WarpSpec,
    broadcast_shape,
    closed_form_logits,
    first_extreme_index,
    key_bias,
    known_maximum,
    masked_numerator,
    row_is_empty,
    row_range_indices,
    user_step,
    warp_backward,
    warp_logits,
    work_dtype,
)
from simwarp.similarity import (
    BlockSimilarity,
    paired_similarity_backward,
    pairwise_similarity_backward,
    rows_from,
)

#: Target number of score entries per block (rows × keys): 1 MB per float32 temporary. The
#: step math keeps a few dozen block-sized temporaries alive at peak (more in backward);
#: larger blocks were not faster on CPU (benchmarks/RESULTS.md).
BLOCK_ELEMENTS = 1 << 18


def default_chunk_size(rows: int, m: int) -> int:
    """Key-block width so that ``rows · chunk ≈ BLOCK_ELEMENTS`` (at least 64, at most m)."""
    return max(1, min(m, max(64, BLOCK_ELEMENTS // max(rows, 1))))


def block_ranges(m: int, chunk: int):
    """``(start, stop)`` of the blocks of ``chunk`` keys covering ``m``."""
    for start in range(0, m, chunk):
        yield start, min(start + chunk, m)


class _KeyBlocks:
    """Key validity of one call, block by block (shared by both passes and the backward).

    With ``skip`` (the mask form): under ``causal``, the rows before a block's first key see
    none of it and are left out (:meth:`first_row`), which halves causal work; and with
    ``exclude_self`` alone no bias is built: each row's own key lies on one diagonal of the
    block, returned as its offset, for the mask form to zero.
    """

    def __init__(self, n: int, m: int, mask, spec: WarpSpec, batch, dtype, device, skip: bool) -> None:
        self.n, self.m, self.spec, self.dtype, self.device = n, m, spec, dtype, device
        self.mask = None if mask is None else mask.expand(*batch, n, m)
        self.skip_rows = skip and spec.causal
        self.self_diagonal = skip and spec.exclude_self and not spec.causal and mask is None

    def first_row(self, start: int) -> int:
        """The first query row that may see key ``start`` (``n``: none does)."""
        return min(start, self.n) if self.skip_rows else 0

    def validity(self, start: int, stop: int, r0: int = 0) -> tuple[torch.Tensor | None, int | None]:
        """``(bias, self_offset)`` of keys ``start:stop`` for query rows ``r0:``."""
        spec = self.spec
        if self.self_diagonal:
            return None, r0 + spec.self_offset - start
        bias = key_bias(
            rows_from(self.mask, r0), self.n - r0, start, stop, causal=spec.causal, exclude_self=spec.exclude_self,
            dtype=self.dtype, device=self.device, row_start=r0, self_offset=spec.self_offset,
        )
        return bias, None


def streaming_range(sim: BlockSimilarity, blocks: _KeyBlocks, batch, chunk: int, indices: bool = True):
    """Pass 1: each row's min/max over valid keys and, with ``indices``, their key indices
    (first index wins ties; else ``None``). Without ``indices`` the extremes are taken on the
    blocks' scores and only they are mapped to similarities
    (:class:`~simwarp.similarity.BlockSimilarity`); with them, on the similarities, whose
    ties (rounding, ``l2``'s clamp at distance 0) the scores may not share: the range
    gradient goes to the first key of equal similarity, as in the dense path.

    Returns ``lo, hi, argmin, argmax, empty``, each ``(*batch, n)``; empty rows get ``lo = hi = 0``.
    """
    q, n = sim.q, blocks.n
    lo = torch.full((*batch, n), math.inf, dtype=q.dtype, device=q.device)
    hi = torch.full((*batch, n), -math.inf, dtype=q.dtype, device=q.device)
    argmin = torch.zeros((*batch, n), dtype=torch.long, device=q.device) if indices else None
    argmax = torch.zeros_like(argmin) if indices else None
    for start, stop in block_ranges(blocks.m, chunk):
        r0 = blocks.first_row(start)
        if r0 >= n:
            break
        r = sim.scores(start, stop, r0)
        if indices:
            r = sim.similarity_(r, r0)
        bias, self_offset = blocks.validity(start, stop, r0)
        # On CPU the indexed reductions are scalar loops: take the block's extremes vectorised
        # and search the indices only in the rows whose running extreme the block improves
        # (boolean indexing: data-dependent shapes, so not under torch.compile).
        later = indices and r.device.type == "cpu" and not torch.compiler.is_compiling()
        block_min, idx_min, block_max, idx_max = row_range_indices(r, bias, self_offset, indices=indices and not later)
        lo_r, hi_r = lo[..., r0:], hi[..., r0:]
        # A NaN extreme (a NaN score) is kept, so that the row's output is NaN as on the dense path
        new_min, new_max = (block_min < lo_r) | block_min.isnan(), (block_max > hi_r) | block_max.isnan()
        if later:
            argmin[..., r0:][new_min] = first_extreme_index(r, bias, self_offset, new_min, largest=False) + start
            argmax[..., r0:][new_max] = first_extreme_index(r, bias, self_offset, new_max, largest=True) + start
        elif indices:
            argmin_r, argmax_r = argmin[..., r0:], argmax[..., r0:]
            argmin_r.copy_(torch.where(new_min, idx_min + start, argmin_r))
            argmax_r.copy_(torch.where(new_max, idx_max + start, argmax_r))
        lo_r.copy_(torch.where(new_min, block_min, lo_r))
        hi_r.copy_(torch.where(new_max, block_max, hi_r))
    empty = (lo == math.inf) & (hi == -math.inf)  # the start values (a valid score may be ±inf)
    lo, hi = lo.masked_fill_(empty, 0.0), hi.masked_fill_(empty, 0.0)
    if not indices:
        lo, hi = (sim.similarity_(x.unsqueeze(-1)).squeeze(-1).masked_fill_(empty, 0.0) for x in (lo, hi))
    return lo, hi, argmin, argmax, empty


class _ChunkedWarp(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, v, a, b, t, mask, spec: WarpSpec, chunk: int, dropout_p: float, seed: int | torch.Tensor, row_range, indices: bool,
        aliases: tuple[int, int],
    ):
        ctx.aliases = aliases
        qkv_in = (q, k, v)
        q, k, v = _resolve(qkv_in, aliases)
        dtype = work_dtype(q.dtype)
        batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        n, m, e = q.shape[-2], k.shape[-2], v.shape[-1]
        sim = BlockSimilarity(q.to(dtype), k.to(dtype), spec.metric, spec.scale)
        mask_form = known_maximum(spec, row_range)
        blocks = _KeyBlocks(n, m, mask, spec, batch, dtype, q.device, skip=mask_form)

        if row_range is None:
            lo, hi, argmin, argmax, empty = streaming_range(sim, blocks, batch, chunk, indices)
        else:  # a range fixed by the caller (e.g. over a bank sharded across ranks): a constant
            lo, hi = (x.detach().to(dtype).expand(*batch, n).clone() for x in row_range)
            argmin = argmax = None
            empty = None  # known after pass 2
        lo1, hi1 = lo.unsqueeze(-1), hi.unsqueeze(-1)

        # Pass 2: step + softmax + value accumulation.
        run_max = torch.full((*batch, n), -math.inf, dtype=dtype, device=q.device)
        denom = torch.zeros((*batch, n), dtype=dtype, device=q.device)
        acc = torch.zeros((*batch, n, e), dtype=dtype, device=q.device)
        kept = torch.zeros((*batch, n), dtype=dtype, device=q.device)
        any_valid = torch.zeros((*batch, n), dtype=torch.bool, device=q.device)
        dropout = _Dropout(dropout_p, seed, n, q.device)
        for start, stop in block_ranges(m, chunk):
            r0 = blocks.first_row(start)
            if r0 >= n:
                break
            s = sim.similarity_(sim.scores(start, stop, r0), r0)
            bias, self_offset = blocks.validity(start, stop, r0)
            v_block = v[..., start:stop, :].to(dtype)
            if mask_form:
                num = masked_numerator(
                    s, *(rows_from(x, r0) for x in (lo1, hi1)), bias, *(rows_from(x, r0) for x in (a, b, t)), spec,
                    self_offset=self_offset, count_kept=True,
                )
                denom[..., r0:] += num.e.sum(-1)
                acc[..., r0:, :] += dropout(num.e, r0, start) @ v_block
                kept[..., r0:] += num.kept
                continue
            if empty is None:
                any_valid |= ~row_is_empty(bias, (*batch, *s.shape[-2:]), s.device)  # (the mask's batch too)
            logits = warp_logits(s, lo1, hi1, bias, a, b, t, spec)
            new_max = torch.maximum(run_max, logits.amax(-1))
            shift = new_max.masked_fill(torch.isinf(new_max), 0.0)
            rescale = torch.exp(run_max - shift)
            p = torch.exp(logits - shift.unsqueeze(-1))
            denom = denom * rescale + p.sum(-1)
            acc = acc * rescale.unsqueeze(-1) + dropout(p, r0, start) @ v_block
            kept += (logits > -math.inf).sum(-1)
            run_max = new_max
        if empty is None:
            empty = ~any_valid
        if mask_form:
            run_max = hi / spec.temperature
        nonempty = denom > 0
        inv_denom = torch.where(nonempty, 1.0 / torch.where(nonempty, denom, 1.0), 0.0)
        out = acc * inv_denom.unsqueeze(-1)
        lse = torch.where(denom == 0, -math.inf, run_max + torch.log(denom))  # NaN rows stay NaN, as dense
        if not mask_form:  # an inf logit (a fixed range, a user step): NaN, as dense
            lse = lse.masked_fill(run_max == math.inf, math.nan)

        ctx.spec, ctx.chunk, ctx.has_mask, ctx.mask_form = spec, chunk, mask is not None, mask_form
        ctx.dropout_p, ctx.fixed_range = dropout_p, row_range is not None
        hashed_seed = seed if isinstance(seed, torch.Tensor) else None  # saved: it may be a graph value
        ctx.int_seed = None if hashed_seed is not None else seed
        optional_mask = () if mask is None else (mask,)
        ctx.save_for_backward(*qkv_in, a, b, t, *optional_mask, hashed_seed, out, lse, inv_denom, lo, hi, argmin, argmax)
        outputs = unaliased((out.to(q.dtype), lse, kept, lo, hi, empty))
        ctx.mark_non_differentiable(*outputs[2:])
        return outputs

    @staticmethod
    @first_order
    def backward(ctx, g_out, g_lse, *_unused):
        saved = list(ctx.saved_tensors)
        q, k, v = _resolve(saved[:3], ctx.aliases)
        a, b, t = saved[3:6]
        mask = saved[6] if ctx.has_mask else None
        hashed_seed, out, lse, inv_denom, lo, hi, argmin, argmax = saved[-8:]
        spec: WarpSpec = ctx.spec
        need_q, need_k, need_v = _resolve(ctx.needs_input_grad[:3], ctx.aliases)
        need_a, need_b, need_t = ctx.needs_input_grad[3:6]
        dtype = work_dtype(q.dtype)
        batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
        blocks = _KeyBlocks(n, m, mask, spec, batch, dtype, q.device, skip=ctx.mask_form)

        g = torch.zeros_like(out) if g_out is None else g_out.to(dtype)
        delta_row = (g * out).sum(-1)  # D in docs/gradients.md
        if g_lse is not None:
            delta_row = delta_row - g_lse.to(dtype)
        delta_row = delta_row.unsqueeze(-1)
        lse_safe = lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1)
        inv_denom = inv_denom.unsqueeze(-1)

        track_range = not (spec.detach_range or ctx.fixed_range) and (need_q or need_k)
        need_s = need_q or need_k
        # The step's parameters and the row range: leaves of each block's autograd graph for a
        # user step; the built-in steps' closed forms (warp_backward) need no leaves, and
        # requires_grad_ broke torch.compile's graph here before torch 2.12.
        leaves = user_step(spec)
        a_, b_, t_ = (p.detach().requires_grad_(need and leaves) for p, need in ((a, need_a), (b, need_b), (t, need_t)))
        lo_ = lo.detach().unsqueeze(-1).requires_grad_(track_range and leaves)
        hi_ = hi.detach().unsqueeze(-1).requires_grad_(track_range and leaves)
        step_leaves = [a_, b_, t_, lo_, hi_]
        sums: list[torch.Tensor | None] = [None] * len(step_leaves)

        def accumulate(i: int, grad: torch.Tensor | None, r0: int = 0) -> None:
            """Add a block's gradient for ``step_leaves[i]``, computed for rows ``r0:`` only."""
            if grad is None:
                return
            leaf = step_leaves[i]
            if grad.shape != leaf.shape:  # a per-row leaf, seen from row r0 on
                full = torch.zeros_like(leaf)
                full.narrow(-2, r0, grad.shape[-2]).copy_(grad)
                grad = full
            sums[i] = grad if sums[i] is None else sums[i] + grad

        # The similarity is differentiated in closed form (pairwise_similarity_backward), so
        # that torch.compile traces this backward for the built-in steps.
        qw, kw = q.to(dtype), k.to(dtype)
        sim = BlockSimilarity(qw, kw, spec.metric, spec.scale)
        dq = torch.zeros((*q.shape[:-2], n, d), dtype=dtype, device=q.device) if need_q else None
        dk = torch.zeros_like(k, dtype=dtype) if need_k else None
        dv = torch.zeros_like(v, dtype=dtype) if need_v else None
        dropout = _Dropout(ctx.dropout_p, ctx.int_seed if hashed_seed is None else hashed_seed, n, q.device)
        for start, stop in block_ranges(m, ctx.chunk):
            r0 = blocks.first_row(start)
            if r0 >= n:
                break
            v_c = v[..., start:stop, :].to(dtype)
            bias, self_offset = blocks.validity(start, stop, r0)
            s = sim.similarity_(sim.scores(start, stop, r0), r0)
            g_r, delta_r = rows_from(g, r0), rows_from(delta_row, r0)
            lo_r, hi_r, a_r, b_r, t_r = (rows_from(x, r0) for x in (lo_, hi_, a_, b_, t_))
            closed = None
            if ctx.mask_form:
                num = masked_numerator(s, lo_r.detach(), hi_r.detach(), bias, a_r, b_r, t_r, spec, self_offset=self_offset)
                w = num.e.mul_(rows_from(inv_denom, r0))

                def closed(g, needs, shapes, num=num):
                    return warp_backward(g, num.u, num.inv, spec.step.rule, num.saved, None, needs, 1.0 / spec.temperature, shapes)
            else:  # a range fixed from outside (built-in steps: closed form) or a user step (autograd)
                closed_form = closed_form_logits(s, lo_.detach(), hi_.detach(), bias, a_, b_, t_, spec)
                if closed_form is not None:
                    logits, closed = closed_form
                else:
                    with torch.enable_grad():
                        s_leaf = s.requires_grad_(need_s)
                        logits = warp_logits(s_leaf, lo_, hi_, bias, a_, b_, t_, spec)
                w = torch.exp(logits.detach() - lse_safe)
            w_out = dropout(w, r0, start)  # the weights that multiplied v in forward
            if need_v:
                dv[..., start:stop, :] += (w_out.transpose(-1, -2) @ g_r).sum_to_size(v_c.shape)
            d_logits = (g_r @ v_c.transpose(-1, -2)).mul_(w_out).sub_(w * delta_r)
            if closed is not None:
                needs = (need_s, track_range, track_range, need_a, need_b, need_t)
                gs, *step_grads = closed(d_logits, needs, (s.shape, lo_r.shape, hi_r.shape))
                for i, grad in enumerate(step_grads[2:] + step_grads[:2]):  # (a, b, t, lo, hi)
                    accumulate(i, grad, r0)
            else:
                wrt = [x for x in (s_leaf, *step_leaves) if x.requires_grad]
                if not wrt or not logits.requires_grad:  # e.g. a user step constant in a, b, t
                    continue
                grads = dict(zip(map(id, wrt), torch.autograd.grad(logits, wrt, d_logits, allow_unused=True)))
                for i, leaf in enumerate(step_leaves):
                    accumulate(i, grads.get(id(leaf)))
                gs = grads.get(id(s_leaf))
            if gs is None:
                continue
            dq_r, dk_c = pairwise_similarity_backward(
                gs, rows_from(qw, r0), kw[..., start:stop, :], s, spec.metric, spec.scale, need_q, need_k,
                centre=sim.keys.centre,  # (the forward's: not recomputed per block)
            )
            if need_q:
                dq[..., r0:, :] += dq_r
            if need_k:
                dk[..., start:stop, :] += dk_c

        da, db, dt, g_lo, g_hi = sums
        if track_range and (g_lo is not None or g_hi is not None):
            # Route ∂L/∂lo and ∂L/∂hi to the similarity of each row's argmin / argmax key.
            kx, qx = kw.expand(*batch, m, d), qw.expand(*batch, n, d)
            for idx, g_ext in ((argmin, g_lo), (argmax, g_hi)):
                if g_ext is None:
                    continue
                index = idx.unsqueeze(-1).expand(*batch, n, d)
                dq_e, dk_e = paired_similarity_backward(
                    g_ext.squeeze(-1).expand(*batch, n), qx, torch.gather(kx, -2, index), spec.metric, spec.scale
                )
                if need_q:
                    dq += dq_e.sum_to_size(dq.shape)
                if need_k:
                    dk += torch.zeros_like(kx).scatter_add_(-2, index, dk_e).sum_to_size(k.shape)

        dq, dk, dv = (None if x is None else x.to(like.dtype) for x, like in ((dq, q), (dk, k), (dv, v)))
        dq, dk, dv = _sum_roles((dq, dk, dv), ctx.aliases)
        return dq, dk, dv, da, db, dt, None, None, None, None, None, None, None, None


def _aliases(q, k, v) -> tuple[int, int]:
    """The slot (0 = q, 1 = k, 2 = v) of the tensor that fills the ``k`` and ``v`` roles.

    Self-attention passes one tensor for all three, and ``torch.compile`` cannot trace an
    autograd function given one tensor twice: each tensor is passed once (``None`` in the slots
    of its other roles) and the gradients of its roles are summed in backward."""
    return (0 if k is q else 1), (0 if v is q else 1 if v is k else 2)


def _distinct(qkv: tuple, aliases: tuple[int, int]) -> tuple:
    """``(q, k, v)`` with ``None`` in the slots of aliased roles."""
    return tuple(x if i == 0 or src == i else None for i, (x, src) in enumerate(zip(qkv, (0, *aliases))))


def _resolve(qkv: tuple, aliases: tuple[int, int]) -> tuple:
    """Undo :func:`_distinct` (on the tensors or on their ``needs_input_grad`` flags)."""
    q, k = qkv[0], qkv[aliases[0]]
    return q, k, (q, k, qkv[2])[aliases[1]]


def _sum_roles(grads: tuple, aliases: tuple[int, int]) -> tuple:
    """The gradients of ``(q, k, v)``'s roles summed into the slots :func:`_distinct` keeps."""
    out = list(grads)
    for role, src in ((2, aliases[1]), (1, aliases[0])):  # v's may go to k's slot first
        if src != role and out[role] is not None:
            out[src] = out[role] if out[src] is None else out[src] + out[role]
            out[role] = None
    return tuple(out)


_LOW32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of int64 values in ``[0, 2^32)`` onto that range: two multiply-xorshift
    rounds (constants from Wellons' hash prospector). Both multipliers are below 2^31, so the
    products of 32-bit values stay inside int64: no overflow, in eager mode or compiled."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _LOW32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _LOW32
    return x ^ (x >> 15)


def _draw_hash_seed(device: torch.device) -> torch.Tensor:
    """Two 32-bit seeds ``(2,)`` int64 for :func:`hashed_keep`, from torch's generator."""
    return torch.randint(0, 2**32, (2,), dtype=torch.int64, device=device)


def _draw_seed(device: torch.device) -> int | torch.Tensor:
    """A call's dropout seed from torch's default generator (``torch.manual_seed`` reproduces
    the masks): an int for the eager generator, a tensor (kept in the graph) under compile."""
    if torch.compiler.is_compiling():
        return _draw_hash_seed(device)
    return int(torch.randint(0, 2**62, ()))


def hashed_keep(seed: torch.Tensor, p: float, shape: torch.Size, rows: int, row0: int = 0, col0: int = 0) -> torch.Tensor:
    """Keep decisions ``(*batch, r, c)`` of the weight block whose first query row is ``row0`` and
    first key is ``col0``: each a hash of (seed, batch entry, row, key), kept with probability
    ``1 - p`` rounded to a multiple of 2^-32. Any block of a call draws its part of one mask.

    Args:
        seed: int64 ``(2,)`` of values in ``[0, 2^32)``.
        rows: query rows per batch entry (``n``), which number the rows.
    """
    *batch, r, c = shape
    device = seed.device
    entry = torch.arange(math.prod(batch), device=device).view(*batch, 1, 1)
    row = torch.arange(row0, row0 + r, device=device).view(r, 1)
    col = torch.arange(col0, col0 + c, device=device)
    s0, s1 = seed.unbind()
    row_key = _mix32(_mix32(((entry * rows + row) & _LOW32) ^ s0) ^ s1)
    return _mix32(row_key ^ _mix32(col ^ s1)) >= _drop_threshold(p)


def _drop_threshold(p: float) -> int:
    return min(round(p * 2.0**32), 2**32 - 1)  # a weight is dropped where its hash is below


class _Dropout:
    """Inverted dropout on weight blocks whose masks the backward replays without storing them.

    With an int ``seed`` (eager mode) the blocks are drawn in order from a generator seeded
    once per call, and the backward visits them in the same order. With a tensor ``seed``
    (under ``torch.compile``, which can neither trace a generator nor read a seed back) each
    keep decision is :func:`hashed_keep` of the weight's position, which the compiler fuses
    with the block's other elementwise work; in eager mode that hash costs about three
    ``torch.rand`` draws, hence the generator there.
    """

    def __init__(self, p: float, seed: int | torch.Tensor, rows: int, device: torch.device) -> None:
        self.p, self.rows, self.hash_seed, self.generator = p, rows, None, None
        if p == 0:
            return
        if isinstance(seed, torch.Tensor):
            self.hash_seed = seed
            self.scale = 2.0**32 / (2**32 - _drop_threshold(p))  # 1 / P(keep) of the rounded rate
        else:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    def __call__(self, w: torch.Tensor, row0: int, col0: int) -> torch.Tensor:
        if self.hash_seed is not None:
            keep = hashed_keep(self.hash_seed, self.p, w.shape, self.rows, row0, col0)
            return w * (keep.to(w.dtype) * self.scale)  # a product: a dropped NaN weight stays NaN
        if self.generator is None:
            return w
        keep = torch.rand(w.shape, generator=self.generator, device=w.device, dtype=w.dtype) >= self.p
        return w * keep / (1.0 - self.p)


def _chunk_for(q, k, v, chunk_size: int | None):
    batch = broadcast_shape(q.shape[:-2], k.shape[:-2], *(() if v is None else (v.shape[:-2],)))
    rows = q.shape[-2] * math.prod(batch)
    return batch, (default_chunk_size(rows, k.shape[-2]) if chunk_size is None else chunk_size)


def chunked_warp_attend(
    q, k, v, a, b, t, mask, spec: WarpSpec, chunk_size: int | None, dropout_p: float = 0.0, row_range=None
):
    """Streaming forward/backward; returns ``(out, lse, kept, lo, hi, empty)``."""
    _, chunk = _chunk_for(q, k, v, chunk_size)
    seed = _draw_seed(q.device) if dropout_p > 0 else 0
    # The argmin/argmax keys only route the range gradient; the indexed reductions are slow on CPU.
    indices = torch.is_grad_enabled() and not spec.detach_range and (q.requires_grad or k.requires_grad)
    aliases = _aliases(q, k, v)
    return _ChunkedWarp.apply(*_distinct((q, k, v), aliases), a, b, t, mask, spec, chunk, dropout_p, seed, row_range, indices, aliases)


@torch.no_grad()
def chunked_warp_range(q, k, mask, spec: WarpSpec, chunk_size: int | None):
    """Pass 1 alone: ``(lo, hi, empty)`` per row, streaming over key blocks (no gradients)."""
    batch, chunk = _chunk_for(q, k, None, chunk_size)
    dtype = work_dtype(q.dtype)
    blocks = _KeyBlocks(q.shape[-2], k.shape[-2], mask, spec, batch, dtype, q.device, skip=True)
    sim = BlockSimilarity(q.to(dtype), k.to(dtype), spec.metric, spec.scale)
    lo, hi, _, _, empty = streaming_range(sim, blocks, batch, chunk, indices=False)
    return lo, hi, empty
