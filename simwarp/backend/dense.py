"""The materialising implementation: the whole ``(..., n, m)`` matrix, one autograd graph.

Any metric and any registered step; small inputs only (memory grows as ``n · m``). It is the
reference the streaming and fused implementations are tested against (the built-in steps'
closed forms are themselves tested against plain-autograd statements in the tests).

Rows are independent, so the matrix is built in blocks of whole rows
(:data:`ROW_BLOCK_ELEMENTS` scores each): every block runs the complete contract (its rows'
range, step and softmax) with no recomputation, and its temporaries stay bounded and
cache-sized however large the call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from simwarp._autograd import exporting, first_order, unaliased
from simwarp.backend.common import (
    WarpSpec,
    WarpStats,
    broadcast_shape,
    key_bias,
    known_maximum,
    masked_numerator,
    routed_range_index,
    row_is_empty,
    row_range_indices,
    warp_backward,
    warp_logits,
    work_dtype,
)
from simwarp.similarity import pairwise_similarity


class _RowSetup(NamedTuple):
    """What both forms of the row math need besides the similarities and the step parameters."""

    s: torch.Tensor  # (..., n, m), expanded to the mask's leading dims
    bias: torch.Tensor | None  # validity (key_bias), or None
    self_offset: int | None  # leave-one-out without a bias: the diagonal holding each row's own key
    lo: torch.Tensor  # (..., n), constants
    hi: torch.Tensor
    index: tuple[torch.Tensor, torch.Tensor] | None  # keys lo and hi were read from (their gradient goes there)
    empty: torch.Tensor  # (..., n) bool


def _row_setup(s, mask, spec: WarpSpec, row_range, row_start: int) -> _RowSetup:
    """Validity and range of the rows of ``s``. ``row_range``: a fixed ``(lo, hi)`` (constants)
    instead of the rows' own range; ``row_start``: index of ``s``'s first row in the call (for
    ``causal`` / ``exclude_self``)."""
    n, m = s.shape[-2], s.shape[-1]
    if mask is None and spec.exclude_self and not spec.causal and row_range is None and m > 1:
        return _leave_one_out_setup(s, row_start + spec.self_offset, spec)
    if mask is not None:  # the mask may carry leading dims that only v has
        s = s.expand(broadcast_shape(s.shape, mask.shape))
    bias = key_bias(
        None if mask is None else mask.expand(s.shape),
        n, 0, m, causal=spec.causal, exclude_self=spec.exclude_self, dtype=s.dtype, device=s.device, row_start=row_start,
        self_offset=spec.self_offset,
    )
    empty = row_is_empty(bias, s.shape, s.device)
    # min/max with indices route the range gradient to one key per row (the first on ties),
    # exactly as the streaming implementations do.
    if row_range is not None:
        lo, hi = (x.detach().to(s.dtype).expand(s.shape[:-1]) for x in row_range)
        return _RowSetup(s, bias, None, lo, hi, None, empty)
    lo, lo_index, hi, hi_index = row_range_indices(s, bias, None, indices=_routes_range(s, spec))
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    return _RowSetup(s, bias, None, lo, hi, (lo_index, hi_index) if lo_index is not None else None, empty)


def _routes_range(s: torch.Tensor, spec: WarpSpec) -> bool:
    """Whether the range gradient flows back to ``s`` (else its key indices are not needed)."""
    return s.requires_grad and not spec.detach_range and spec.step.warps


def _leave_one_out_setup(s, own_offset: int, spec: WarpSpec) -> _RowSetup:
    """:func:`_row_setup` for ``exclude_self`` alone (the leave-one-out training case), without
    a bias matrix: each row's own key sits on one diagonal of the block (offset ``own_offset``:
    the block's first row index plus the call's ``self_offset``), excluded from the range
    reductions in place (:func:`row_range_indices`) and from the weights by the softmax."""
    lo, lo_index, hi, hi_index = row_range_indices(s, None, own_offset, indices=_routes_range(s, spec))
    empty = torch.zeros(s.shape[:-1], dtype=torch.bool, device=s.device)
    return _RowSetup(s, None, own_offset, lo, hi, (lo_index, hi_index) if lo_index is not None else None, empty)


def dense_logits(
    s: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor | None,
    spec: WarpSpec,
    row_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(logits, lo, hi, empty)`` for similarities ``s (..., n, m)``: logits
    ``(..., n, m)``, the rest ``(..., n)``. ``row_range``: a fixed ``(lo, hi)`` (constants)
    instead of the rows' own range; ``row_start``: index of ``s``'s first row in the call (for
    ``causal`` / ``exclude_self``)."""
    rows = _row_setup(s, mask, spec, row_range, row_start)
    index = rows.index if spec.step.warps else None  # step "none": the range is only reported
    logits = warp_logits(rows.s, rows.lo.unsqueeze(-1), rows.hi.unsqueeze(-1), rows.bias, a, b, t, spec, range_index=index)
    if rows.self_offset is not None:
        if logits is s:  # step "none" at temperature 1: the logits are the similarities themselves
            logits = s.clone()
        with torch.no_grad():
            logits.diagonal(rows.self_offset, -2, -1).fill_(-math.inf)
    return logits, rows.lo, rows.hi, rows.empty


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim; ``-inf`` with a zero gradient on rows that are all
    ``-inf`` (``torch.logsumexp``'s gradient is NaN there)."""
    return _RowSoftmax.apply(x)[1]


class _RowSoftmax(torch.autograd.Function):
    """``(w, lse)`` of logits over the last dim; a row that is all ``-inf`` gives ``w = 0`` and
    ``lse = -inf`` with zero gradients (``torch.softmax`` gives NaN there, ``logsumexp`` a NaN
    gradient). Backward: ``∂ℓ = w (∂w - Σ_j w ∂w + ∂lse)``."""

    @staticmethod
    def forward(ctx, logits):
        top = logits.amax(-1, keepdim=True)
        top = top.masked_fill(top == -math.inf, 0.0)  # per row
        w = (logits - top).exp_()
        total = w.sum(-1, keepdim=True)
        w.div_(total.clamp_min(torch.finfo(w.dtype).tiny))
        ctx.save_for_backward(w)
        return unaliased((w, (total.log_() + top).squeeze(-1)))

    @staticmethod
    @first_order
    def backward(ctx, g_w, g_lse):
        (w,) = ctx.saved_tensors
        return _softmax_backward(w, g_w, g_lse)


def _softmax_backward(w, g_w, g_lse):
    """``∂ℓ`` of ``(w, lse)`` = softmax and log-normaliser of ``ℓ``: ``w (∂w - Σ_j w ∂w + ∂lse)``."""
    if g_w is None:
        return w * g_lse.unsqueeze(-1)
    g = w * g_w
    shift = g.sum(-1, keepdim=True)
    if g_lse is not None:
        shift = shift - g_lse.unsqueeze(-1)
    return g.addcmul_(w, shift, value=-1.0)  # w ∂w - w shift, in the product's buffer


def _column_softmax_backward(w, columns, g_cols, g_lse):
    """:func:`_softmax_backward` for ``∂w`` given at ``columns`` only (``g_cols``, 0 elsewhere)."""
    if g_cols is None:
        return w * g_lse.unsqueeze(-1)
    w_g = w.gather(-1, columns).mul_(g_cols)
    shift = w_g.sum(-1, keepdim=True)
    if g_lse is not None:
        shift = shift - g_lse.unsqueeze(-1)
    return torch.mul(w, shift.neg_()).scatter_add_(-1, columns, w_g)


class _MaskedSoftmax(torch.autograd.Function):
    """``(w, lse, kept)`` of ``ℓ = s/τ + φ(u)`` (plus validity) over the last dim, from the mask
    form's numerators (:func:`masked_numerator`; the rows' own range is required). Backward:
    the softmax's ``∂ℓ`` into :func:`warp_backward`.

    With ``columns`` (``(..., n, c)`` key indices) the first output is ``w`` read at those keys
    only; its backward builds ``∂ℓ = w (∂w - Σ_j w ∂w + ∂lse)`` from the ``c`` entries of ``∂w``
    (one scaled copy of ``w`` plus a scatter) instead of from a dense ``∂w`` that is 0 elsewhere."""

    @staticmethod
    def forward(ctx, s, lo, hi, a, b, t, bias, self_offset, spec: WarpSpec, range_index, count_kept: bool, columns):
        num = masked_numerator(s, lo, hi, bias, a, b, t, spec, self_offset=self_offset, count_kept=count_kept)
        total = num.e.sum(-1, keepdim=True)
        w = num.e.mul_(total.clamp_min(torch.finfo(s.dtype).tiny).reciprocal())
        lse = total.log_().add_(hi, alpha=1.0 / spec.temperature).squeeze(-1)
        kept = torch.full(s.shape[:-1], math.nan, dtype=s.dtype, device=s.device) if num.kept is None else num.kept
        ctx.spec, ctx.n_saved = spec, len(num.saved)
        ctx.shapes = s.shape, lo.shape, hi.shape
        ctx.columns = columns is not None
        ctx.save_for_backward(w, num.u, num.inv, *num.saved, *(range_index or ()), *((columns,) if ctx.columns else ()))
        outputs = unaliased(((w if columns is None else w.gather(-1, columns)), lse, kept))
        ctx.mark_non_differentiable(outputs[2])
        return outputs

    @staticmethod
    @first_order
    def backward(ctx, g_w, g_lse, _):
        w, u, inv, *rest = ctx.saved_tensors
        columns = rest.pop() if ctx.columns else None
        saved, index = rest[: ctx.n_saved], rest[ctx.n_saved :]
        g = _softmax_backward(w, g_w, g_lse) if columns is None else _column_softmax_backward(w, columns, g_w, g_lse)
        spec: WarpSpec = ctx.spec
        grads = warp_backward(
            g, u, inv, spec.step.rule, saved, index or None, ctx.needs_input_grad[:6], 1.0 / spec.temperature, ctx.shapes
        )
        return (*grads, None, None, None, None, None, None)


def _masked_softmax(s, a, b, t, rows: _RowSetup, spec: WarpSpec, count_kept: bool, columns=None):
    """``(w, lse, kept)`` through :class:`_MaskedSoftmax` (built-in warping steps, own range)."""
    if columns is not None:
        columns = columns.expand(*rows.s.shape[:-1], columns.shape[-1])
    return _MaskedSoftmax.apply(
        rows.s, rows.lo.unsqueeze(-1), rows.hi.unsqueeze(-1), a, b, t, rows.bias, rows.self_offset,
        spec, routed_range_index(rows.index, spec, s), count_kept, columns,
    )


#: Scores per row block (see the module docstring): 4 MiB per float32 temporary; equal to
#: ``DENSE_AUTO_LIMIT``, so calls that ``impl="auto"`` sends here run as one block.
ROW_BLOCK_ELEMENTS = 1 << 20


def _row_blocks(n: int, entries_per_row: int):
    if exporting() or n * entries_per_row <= ROW_BLOCK_ELEMENTS:  # one block: n stays symbolic
        yield 0, n
        return
    rows = max(1, ROW_BLOCK_ELEMENTS // max(entries_per_row, 1))
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


def _rows(x, start: int, stop: int, dim: int):
    """Rows ``start:stop`` of ``x`` along ``dim`` (counted from the end), unless ``x`` is
    ``None`` or broadcast along it."""
    if x is None or x.dim() < -dim or x.shape[dim] == 1 or (start == 0 and stop == x.shape[dim]):
        return x  # (the whole of x keeps its identity: see similarity._gram)
    return x.narrow(dim, start, stop - start)


def _block_weights(
    s, a, b, t, mask, spec: WarpSpec, row_range, start: int, stop: int, with_stats: bool, columns=None, log: bool = False
):
    """Weights and stats of query rows ``start:stop``, from their similarities ``s``; without
    ``with_stats`` the stats' ``lse`` and ``kept`` may be NaN (not computed). With ``columns``
    the weights are read at those keys only; with ``log``, log-weights ``logits - lse``."""
    a, b, t = (_rows(p, start, stop, -2) for p in (a, b, t))
    mask = _rows(mask, start, stop, -2)
    columns = _rows(columns, start, stop, -2)
    row_range = None if row_range is None else tuple(_rows(x, start, stop, -1) for x in row_range)
    if spec.step.warps and known_maximum(spec, row_range) and not log:  # the mask form
        rows = _row_setup(s, mask, spec, row_range, start)
        w, lse, kept = _masked_softmax(s, a, b, t, rows, spec, count_kept=with_stats, columns=columns)
        return w, WarpStats(lse=lse, kept=kept, lo=rows.lo, hi=rows.hi, empty=rows.empty)
    logits, lo, hi, empty = dense_logits(s, a, b, t, mask, spec, row_range, row_start=start)
    # PyTorch's fused softmax needs a kept key in every row: true for step "none" unless a row
    # has no valid key (`empty`, checked on CPU only: no device sync, and not under
    # torch.compile, which would break the graph on the read-back).
    fused = (
        not with_stats
        and not log
        and logits.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and known_maximum(spec, row_range)
        and not bool(empty.any())
    )
    if not fused:
        w, lse = _RowSoftmax.apply(logits)
    else:  # no log-normaliser wanted and no all -inf row: PyTorch's fused CPU softmax
        w = torch.softmax(logits, -1)
        lse = torch.full(logits.shape[:-1], math.nan, dtype=w.dtype, device=w.device)
    kept = (logits > -math.inf).sum(-1).to(w.dtype) if with_stats else torch.full_like(lse, math.nan)
    if log:  # a row without a valid key: all -inf, as its logits
        w = logits - lse.masked_fill(lse == -math.inf, 0.0).unsqueeze(-1)
    if columns is not None:
        w = w.gather(-1, columns.expand(*w.shape[:-1], columns.shape[-1]))
    return w, WarpStats(lse=lse, kept=kept, lo=lo.detach(), hi=hi.detach(), empty=empty)


def _blocked(q, k, v, a, b, t, mask, spec: WarpSpec, row_range, per_block, with_stats: bool, columns=None, log=False):
    """Run ``per_block(w) -> tensor (..., rows, ·)`` over row blocks; concatenate."""
    dtype = work_dtype(q.dtype)
    qw, kw = q.to(dtype), k.to(dtype)
    batch = broadcast_shape(q.shape[:-2], k.shape[:-2], *(() if v is None else (v.shape[:-2],)))
    if mask is not None:
        batch = broadcast_shape(batch, mask.shape[:-2])
    parts, stats = [], []
    for start, stop in _row_blocks(q.shape[-2], k.shape[-2] * math.prod(batch)):
        s = pairwise_similarity(_rows(qw, start, stop, -2), kw, spec.metric, spec.scale)
        if s.shape[:-2] != batch:  # leading dims that only v carries (rare: a copy, as
            s = s.expand(*batch, *s.shape[-2:]).contiguous()  # leave-one-out writes s in place)
        w, st = _block_weights(s, a, b, t, mask, spec, row_range, start, stop, with_stats, columns, log)
        parts.append(per_block(w))
        stats.append(st)
    if len(parts) == 1:
        return parts[0], stats[0]
    return torch.cat(parts, -2), WarpStats(*(torch.cat(field, -1) for field in zip(*stats)))


def dense_weights(
    q, k, a, b, t, mask, spec: WarpSpec, row_range=None, with_stats: bool = True, columns=None, log: bool = False
) -> tuple[torch.Tensor, WarpStats]:
    """Weights ``(..., n, m)`` (softmax of the logits over valid keys; all 0 on a row with no
    valid key) and the rows' :class:`WarpStats` (``lse`` and ``kept`` only with ``with_stats``).
    With ``columns`` (``(..., n, c)`` key indices): the weights at those keys, ``(..., n, c)``.
    With ``log``: log-weights ``logits - lse`` (``-inf`` where the weight is 0)."""
    return _blocked(q, k, None, a, b, t, mask, spec, row_range, lambda w: w, with_stats, columns, log)


def dense_warp_attend(
    q, k, v, a, b, t, mask, spec: WarpSpec, dropout_p: float = 0.0, row_range=None, with_stats: bool = True
) -> tuple[torch.Tensor, WarpStats]:
    """Output ``(..., n, e)`` and :class:`WarpStats` (dropout acts on the weights, not the stats;
    ``lse`` and ``kept`` only with ``with_stats``)."""

    def attend(w):
        if dropout_p > 0:
            w = torch.nn.functional.dropout(w, dropout_p)
        return w @ v.to(w.dtype)

    out, stats = _blocked(q, k, v, a, b, t, mask, spec, row_range, attend, with_stats)
    return out.to(q.dtype), stats
