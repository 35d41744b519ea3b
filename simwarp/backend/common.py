"""Row math shared by every backend implementation, and the argument checks.

One row of the contract (docs/math.md): similarities ``s`` → range ``[lo, hi]`` over the valid
keys → ``u = (s - lo) / (hi - lo)`` (``u = 1`` on a flat row) → logits
``ℓ = s / τ + φ(u)`` with ``φ = step.log_mask(u, a, b, t)``, ``-inf`` where the key is invalid.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy
import torch

from simwarp._autograd import as_flag, first_order, is_finite_real, is_int, unaliased
from simwarp.similarity import STREAMING_METRICS, check_metric
from simwarp.steps import DEFAULT_A, DEFAULT_B, DEFAULT_T, Step, get_step

IMPLS = ("auto", "dense", "chunked", "triton")


class WarpStats(NamedTuple):
    """Per-row statistics, each of shape ``(..., n)``.

    Attributes:
        lse: log-normaliser ``log Σ_j m_ij exp(s_ij / τ)`` over valid keys (``-inf`` for a row
            with no valid key). Differentiable.
        kept: number of valid keys the step keeps, i.e. in its support (``φ > -inf``: ``m(u) > 0``
            in exact arithmetic, even where ``m`` underflows) (float).
            Softmax can still make their weights negligible (exactly 0 where ``m`` underflows):
            for ``step="none"`` every valid key counts. NaN where ``lse`` is NaN (a NaN or
            inf among the row's scores).
        lo: minimum similarity over the row's valid keys (0 for an empty row).
        hi: maximum similarity over the row's valid keys (0 for an empty row).
        empty: True where the row has no valid key (its output is exactly 0). With a fixed
            ``row_range``, a row whose keys in this call all fall below the band also outputs
            0 with ``lse = -inf``, but is not empty.

    The statistics are in the compute dtype: float32 for float16/bfloat16 inputs.
    """

    lse: torch.Tensor
    kept: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    empty: torch.Tensor


@dataclass(frozen=True)
class WarpSpec:
    """The non-tensor configuration of one backend call (validated)."""

    metric: str
    scale: float | None
    step: Step
    temperature: float
    causal: bool
    exclude_self: bool
    detach_range: bool
    self_offset: int = 0  # with exclude_self: query i's own key is key i + self_offset


def broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target``."""
    try:
        return broadcast_shape(shape, target) == tuple(target)
    except RuntimeError:
        return False


def broadcast_shape(*shapes) -> torch.Size:
    """:func:`torch.broadcast_shapes` of plain shapes, in plain Python (about 10x faster: it is
    called several times per backend call); raises ``RuntimeError`` where they do not broadcast."""
    ndim = max([0, *map(len, shapes)])  # no ``default=``: torch.compile cannot trace it
    out = [1] * ndim
    for shape in shapes:
        for i, d in enumerate(shape, ndim - len(shape)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[i] = d
    return torch.Size(out)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Internal compute dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums that must not round (target moments, the sharded explain's rescaling):
    float64, or float32 on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def key_bias(
    mask: torch.Tensor | None,
    n: int,
    start: int,
    stop: int,
    *,
    causal: bool,
    exclude_self: bool,
    dtype: torch.dtype,
    device: torch.device,
    row_start: int = 0,
    self_offset: int = 0,
) -> torch.Tensor | None:
    """Validity of keys ``start:stop`` for the ``n`` query rows ``row_start:row_start + n`` as an
    additive bias: ``0`` where the key is valid, ``-inf`` where it is not; ``None`` = all valid.

    ``mask`` must already be expanded to ``(..., n, m)`` over these rows (a view). Causal is
    top-left aligned, as in :func:`torch.nn.functional.scaled_dot_product_attention`: key ``j``
    is visible to query ``i`` iff ``j <= i``; with ``exclude_self`` query ``i`` loses key
    ``i + self_offset``. A bias (rather than a bool mask applied with
    ``masked_fill``) costs one add per use, has an identity gradient, and the structural parts
    are built from diagonals instead of index comparisons.
    """
    bias = None
    if causal or exclude_self:
        width, offset = stop - start, row_start - start  # row i meets key i + row_start at column i + offset
        if causal:  # key column c is hidden from row i iff c - i > offset
            bias = torch.full((n, width), -math.inf, dtype=dtype, device=device).triu_(offset + 1)
        else:
            bias = torch.zeros((n, width), dtype=dtype, device=device)
        if exclude_self:
            bias.diagonal(offset=offset + self_offset).fill_(-math.inf)
    if mask is not None:
        zero = torch.zeros((), dtype=dtype, device=device)
        user = torch.where(mask[..., start:stop], zero, -math.inf)
        bias = user if bias is None else user + bias
    return bias


def row_is_empty(bias: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(..., n)`` bool: rows of ``shape = (..., n, c)`` with no valid key under ``bias``."""
    if bias is None:
        return torch.zeros(shape[:-1], dtype=torch.bool, device=device)
    return (bias.amax(-1) == -math.inf).expand(shape[:-1])


#: Block length of :func:`row_extremum`'s two-level search.
_EXTREMUM_BLOCK = 64


def row_extremum(x: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.max(-1)`` (``largest``) or ``x.min(-1)``: values and the index of the *first* extreme
    element of each row, as ``torch.max``/``torch.min`` return them.

    PyTorch's reductions with indices are scalar loops on CPU (~15x slower than ``amax``), so
    long contiguous rows (at least 8 blocks; 2.5-6x faster from 1024 keys) are searched in two levels: the extreme of each block of
    :data:`_EXTREMUM_BLOCK` elements (vectorised), the first extreme block, then the first
    extreme element inside it.
    """
    # Under compile and export first: with a symbolic length, `m < 8 * width` would become a
    # guard that caps the exported program's dynamic range.
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.stride(-1) != 1:
        return x.max(-1) if largest else x.min(-1)
    m, width = x.shape[-1], _EXTREMUM_BLOCK
    if m < 8 * width:
        return x.max(-1) if largest else x.min(-1)
    blocks = m // width
    head = x[..., : blocks * width].unflatten(-1, (blocks, width))
    block_values, block = head.amax(-1).max(-1) if largest else head.amin(-1).min(-1)
    inside = head.gather(-2, block[..., None, None].expand(*block.shape, 1, width)).squeeze(-2)
    index = block * width + (inside.argmax(-1) if largest else inside.argmin(-1))
    if blocks * width == m:
        return block_values, index
    tail_values, tail_index = x[..., blocks * width :].max(-1) if largest else x[..., blocks * width :].min(-1)
    tail_wins = tail_values > block_values if largest else tail_values < block_values
    return torch.where(tail_wins, tail_values, block_values), torch.where(tail_wins, tail_index + blocks * width, index)


def row_range_indices(
    s: torch.Tensor, bias: torch.Tensor | None, self_offset: int | None, *, indices: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(lo, lo_index, hi, hi_index)``: each row's min/max over its valid keys and the first
    key attaining each (no gradients; without ``indices`` the indices are ``None`` and the
    reductions are vectorised ``amin``/``amax``, several times faster on CPU than the indexed
    ones). Invalid keys are those under ``bias`` (from
    :func:`key_bias`) or, with ``self_offset``, on that diagonal of ``s`` (each row's own key),
    which is set to ±inf in place for the reductions and restored (so ``s`` must not be saved
    for backward yet); a row with no valid key gets ``±inf``. Under ``torch.compile`` the
    diagonal is masked out of place instead (``s`` may be a view made inside an autograd
    function, which compiled graphs must not write to; the compiler fuses the mask into the
    reductions)."""
    if self_offset is not None and torch.compiler.is_compiling():
        n, m = s.shape[-2:]
        own = torch.arange(n, device=s.device).unsqueeze(-1) + self_offset == torch.arange(m, device=s.device)
        own_bias = torch.zeros((n, m), dtype=s.dtype, device=s.device).masked_fill_(own, -math.inf)
        return row_range_indices(s, own_bias if bias is None else bias + own_bias, None, indices=indices)

    def extremum(x: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if indices:
            return row_extremum(x, largest)
        return (x.amax(-1) if largest else x.amin(-1)), None

    with torch.no_grad():
        own = s.detach().diagonal(self_offset, -2, -1) if self_offset is not None else None
        kept = None if own is None else own.clone()
        if own is not None:
            own.fill_(math.inf)
        lo, lo_index = extremum(s if bias is None else s - bias, largest=False)
        if own is not None:
            own.fill_(-math.inf)
        hi, hi_index = extremum(s if bias is None else s + bias, largest=True)
        if own is not None:
            own.copy_(kept)
    return lo, lo_index, hi, hi_index


def first_extreme_index(
    s: torch.Tensor, bias: torch.Tensor | None, self_offset: int | None, rows: torch.Tensor, largest: bool
) -> torch.Tensor:
    """The first key index of the max (``largest``) or min of the valid keys of the selected
    ``rows`` (bool, ``s``'s shape without the key dim, possibly broadcast-larger), as a 1-D
    tensor in ``rows``' order: :func:`row_range_indices`' indices for a subset of rows. The
    streaming pass 1 uses it on CPU for the rows whose running extreme a block improves (few
    after the first blocks), so that most blocks need only the vectorised reductions."""
    with torch.no_grad():
        shape = (*rows.shape, s.shape[-1])
        x = s.detach().expand(shape)[rows]  # (K, keys), a copy
        if bias is not None:
            picked = bias.expand(shape)[rows]
            x = x.add_(picked) if largest else x.sub_(picked)
        if self_offset is not None:
            which, row = torch.arange(x.shape[0], device=x.device), rows.nonzero()[:, -1]
            own = row + self_offset
            inside = (own >= 0) & (own < x.shape[-1])
            x[which[inside], own[inside]] = -math.inf if largest else math.inf
        return x.argmax(-1) if largest else x.argmin(-1)


def routed_range_index(range_index, spec: WarpSpec, s: torch.Tensor):
    """``range_index`` if the range gradient must reach ``s`` through those keys, else ``None``."""
    return range_index if range_index is not None and not spec.detach_range and s.requires_grad else None


def _unit_scale(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c, width, flat, inv)`` per row: ``width = c·hi - c·lo``, the range ``u`` divides by,
    with ``c = 1/2`` where ``hi - lo`` overflows (similarities beyond about half the dtype's
    maximum: halving is exact, and such a row is normalised like any other) and 1 elsewhere;
    ``flat`` where ``width`` is below the dtype's smallest normal number ``tiny`` (all
    similarities equal, or a subnormal range, whose reciprocal overflows; any larger range
    divides safely: ``1 / r <= 1 / tiny``, and ``|lo| / r <= 2^24`` as ``r`` is at least one unit
    in the last place of ``lo``); ``inv = 1/(hi - lo)``, 0 on flat rows."""
    # few operations (small calls are bound by their count): c·hi - c·lo is hi - lo where c = 1,
    # as c·lo is exact, and c / inf is the flat rows' 0
    c = (hi - lo == math.inf).to(hi.dtype).mul_(-0.5).add_(1.0)
    width = torch.addcmul(hi * c, lo, c, value=-1.0)
    flat = width < torch.finfo(hi.dtype).tiny
    return c, width, flat, c / width.masked_fill(flat, math.inf)


def unit_affine(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv, shift)`` per row with ``u = s · inv + shift = (s - lo) / (hi - lo)``; on flat rows
    (:func:`_unit_scale`) ``inv = 0`` and ``shift = 1`` (``u = 1``)."""
    _, _, flat, inv = _unit_scale(lo, hi)
    return inv, flat.to(lo.dtype) - lo * inv


def unit_range(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, inv)``: ``u = (s - lo) / (hi - lo)`` and ``inv = 1 / (hi - lo)`` per row; on flat
    rows (:func:`_unit_scale`) ``inv = 0``, ``u = 1``.

    ``u`` is taken as ``1 + (s - hi) / (hi - lo)``, a division, so that both ends are exact:
    0 at ``s = lo`` (the ``log`` step drops the row minimum) and 1 at ``s = hi``, where
    ``s · inv + shift`` may give ``1 - ulp``: inside a band that ends at ``b = 1``, where the
    ``sigmoidal`` step's partials are ``O(1)`` (the mask form takes the same care,
    :meth:`~simwarp.steps.StepRule.mask_affine`)."""
    c, width, flat, inv = _unit_scale(lo, hi)
    u = torch.addcmul((hi * c).neg_(), s, c).div_(width.masked_fill(flat, math.inf))  # flat: 0, so u = 1
    return u.add_(1.0), inv


def _range_gradients(g_u: torch.Tensor, u: torch.Tensor, inv: torch.Tensor, sums=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂lo, ∂hi)`` of ``u`` from ``g_u = ∂L/∂u``: ``inv Σ_j g_u (u - 1)`` and ``-inv Σ_j g_u u``
    (zero on flat rows, where ``inv = 0``); shapes ``(..., n, 1)``. ``sums``: ``(Σ_j g_u, Σ_j g_u u)``
    if already known (:meth:`StepRule.backward`).

    A row's own range puts its valid keys' ``u`` in ``[0, 1]`` (a fixed range has no gradient);
    a masked key's ``u`` may overflow to ``±inf`` where its ``g_u`` is 0, so ``u`` is clamped to
    ``[-1, 2]`` first (``0 · inf`` would be NaN)."""
    if sums is None:
        sums = g_u.sum(-1, keepdim=True), torch.linalg.vecdot(g_u, u.clamp(-1.0, 2.0)).unsqueeze(-1)
    sum_gu, sum_gu_u = sums
    return (sum_gu_u - sum_gu).mul_(inv), (sum_gu_u * inv).neg_()


class _NormalizedRange(torch.autograd.Function):
    # u = (s - lo) / r with r = hi - lo, u = 1 on flat rows (unit_affine), where it is constant.
    # ∂s = g inv, and ∂lo, ∂hi from _range_gradients.
    @staticmethod
    def forward(ctx, s, lo, hi):
        u, inv = unit_range(s, lo, hi)
        ctx.save_for_backward(u, inv)
        ctx.shapes = s.shape, lo.shape, hi.shape
        return unaliased(u)

    @staticmethod
    @first_order
    def backward(ctx, g):
        u, inv = ctx.saved_tensors
        s_shape, lo_shape, hi_shape = ctx.shapes
        need_s, need_lo, need_hi = ctx.needs_input_grad
        gs = (g * inv).sum_to_size(s_shape) if need_s else None
        g_lo = g_hi = None
        if need_lo or need_hi:
            g_lo, g_hi = _range_gradients(g, u, inv)
            g_lo, g_hi = g_lo.sum_to_size(lo_shape), g_hi.sum_to_size(hi_shape)
        return gs, g_lo, g_hi


def normalized_range(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``u = (s - lo) / (hi - lo)`` with ``lo``, ``hi`` of shape ``(..., n, 1)``; ``u = 1`` on flat
    rows (with zero gradient there). ``s``: ``(..., n, c)``."""
    return _NormalizedRange.apply(s, lo, hi)


def warp_backward(g, u, inv, rule, rule_saved, range_index, needs, inv_temperature: float, shapes):
    """Gradients of ``ℓ = s/τ + φ(u)``, ``u = (s - lo)/(hi - lo)``, from ``g = ∂L/∂ℓ`` (docs/gradients.md).

    With ``g_u`` from the rule and ``inv = 1/(hi - lo)`` (0 on flat rows): ``∂s = g/τ + g_u inv``,
    and ``∂lo``, ``∂hi`` from :func:`_range_gradients`; with ``range_index`` (the keys ``lo`` and
    ``hi`` were read from) those go straight into ``∂s`` at these keys. ``needs``: the
    ``needs_input_grad`` of ``(s, lo, hi, a, b, t)``; ``shapes``: those of ``s``, ``lo``, ``hi``.
    ``rule=None`` is step ``"none"``. Returns ``(∂s, ∂lo, ∂hi, ∂a, ∂b, ∂t)``, ``None`` where not needed.
    """
    need_s, need_lo, need_hi, need_a, need_b, need_t = needs
    s_shape, lo_shape, hi_shape = shapes
    if rule is None:  # step "none": ℓ = s/τ
        return (g * inv_temperature).sum_to_size(s_shape) if need_s else None, None, None, None, None, None
    track_range = range_index is not None and need_s or need_lo or need_hi
    gu, ga, gb, gt, sums = rule.backward(rule_saved, g, (need_s or track_range, need_a, need_b, need_t), track_range)
    g_lo = g_hi = gs = None
    if track_range:
        g_lo, g_hi = _range_gradients(gu, u, inv, sums)
    if need_s:
        gs = gu.mul_(inv).add_(g, alpha=inv_temperature)
        if range_index is not None:
            lo_index, hi_index = range_index
            gs.scatter_add_(-1, lo_index.unsqueeze(-1), g_lo).scatter_add_(-1, hi_index.unsqueeze(-1), g_hi)
            g_lo = g_hi = None
        gs = gs.sum_to_size(s_shape)
    if g_lo is not None:
        g_lo, g_hi = g_lo.sum_to_size(lo_shape), g_hi.sum_to_size(hi_shape)
    return gs, g_lo, g_hi, ga, gb, gt


class _WarpLogits(torch.autograd.Function):
    # One node for ℓ = s/τ + φ(u), u = (s - lo)/(hi - lo), with a closed-form step (StepRule);
    # backward: warp_backward.
    @staticmethod
    def forward(ctx, s, lo, hi, a, b, t, rule, inv_temperature: float, range_index):
        u, inv = unit_range(s, lo, hi)
        phi, saved = rule.forward(u, a, b, t)
        ctx.rule, ctx.inv_temperature, ctx.n_saved = rule, inv_temperature, len(saved)
        ctx.shapes = s.shape, lo.shape, hi.shape
        ctx.save_for_backward(u, inv, *saved, *(range_index or ()))
        return unaliased(phi.add_(s, alpha=inv_temperature))  # φ is the rule's fresh output

    @staticmethod
    @first_order
    def backward(ctx, g):
        u, inv, *rest = ctx.saved_tensors
        saved, index = rest[: ctx.n_saved], rest[ctx.n_saved :]
        grads = warp_backward(
            g, u, inv, ctx.rule, saved, index or None, ctx.needs_input_grad[:6], ctx.inv_temperature, ctx.shapes
        )
        return (*grads, None, None, None)


def warp_logits(
    s: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    spec: WarpSpec,
    range_index: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits ``ℓ = s / τ + φ(u)`` for a block of keys, ``-inf`` where invalid or dropped.

    Args:
        s: ``(..., n, c)`` similarities; ``lo``, ``hi``: ``(..., n, 1)``; ``bias``: validity
            from :func:`key_bias`, broadcastable to ``s``, or ``None``; ``a, b, t``:
            broadcastable to ``(..., n, 1)``.
        range_index: ``(argmin, argmax)``, each ``(..., n)``: the keys of ``s`` that ``lo`` and
            ``hi`` are (as constants) when the range is the rows' own; their gradients then go
            to ``s`` at these keys (built-in steps). ``None``: ``lo``, ``hi`` are inputs of
            their own.
    """
    if spec.step.warps and spec.step.rule is not None:
        routed = routed_range_index(range_index, spec, s)
        if range_index is not None:
            lo, hi = lo.detach(), hi.detach()
        logits = _WarpLogits.apply(s, lo, hi, a, b, t, spec.step.rule, 1.0 / spec.temperature, routed)
    elif spec.step.warps:
        if range_index is not None and not spec.detach_range:
            lo, hi = (s.gather(-1, i.unsqueeze(-1)) for i in range_index)
        phi = spec.step.log_mask(normalized_range(s, lo, hi), a, b, t)
        logits = torch.add(phi, s, alpha=1.0 / spec.temperature)  # a new tensor: safe to update in place
    else:
        logits = s / spec.temperature if spec.temperature != 1.0 else s
    if bias is None:
        return logits
    if logits is not s and logits.shape == broadcast_shape(logits.shape, bias.shape):
        return logits.add_(bias)
    return logits + bias


def user_step(spec: WarpSpec) -> bool:
    """Whether the step is a user's (``register_step``): no closed-form gradient, autograd's."""
    return spec.step.warps and spec.step.rule is None


def closed_form_logits(s, lo, hi, bias, a, b, t, spec: WarpSpec):
    """:func:`warp_logits` without autograd for the built-in steps and ``"none"`` (``None`` for a
    user step), and the closed-form backward of that block: ``logits, backward`` with
    ``backward(g, needs, shapes)`` as :func:`warp_backward` takes them. For a streaming backward
    that ``torch.compile`` traces (no ``torch.autograd.grad``)."""
    rule, inv_temperature = spec.step.rule, 1.0 / spec.temperature
    if user_step(spec):
        return None
    if spec.step.warps:
        u, inv = unit_range(s, lo, hi)
        phi, saved = rule.forward(u, a, b, t)
        logits = phi.add_(s, alpha=inv_temperature)
    else:
        u = inv = saved = None
        logits = s * inv_temperature
    if bias is not None:
        logits = logits + bias

    def backward(g, needs, shapes):
        return warp_backward(g, u, inv, rule, saved, None, needs, inv_temperature, shapes)

    return logits, backward


def known_maximum(spec: WarpSpec, row_range) -> bool:
    """Whether the mask form applies: a built-in step (or none) over the rows' own range, so
    each row's best valid key (``s = hi``, ``u = 1``) has ``m = 1`` and ``hi/τ`` is its largest logit."""
    return row_range is None and (spec.step.rule is not None or not spec.step.warps)


class MaskedNumerator(NamedTuple):
    """The mask form of a block of scores (see :func:`masked_numerator`)."""

    e: torch.Tensor  # (..., n, c): m(u) · exp((s - hi)/τ), exactly 0 where invalid or dropped
    u: torch.Tensor | None  # what warp_backward needs (None for step "none", or if the rule sums for itself)
    inv: torch.Tensor | None
    saved: tuple
    kept: torch.Tensor | None  # (..., n) valid keys in the step's support (m > 0 exactly), if counted


def masked_numerator(
    s: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    spec: WarpSpec,
    *,
    self_offset: int | None = None,
    count_kept: bool = False,
) -> MaskedNumerator:
    """Softmax numerators of a block of keys in the mask form of a built-in step.

    ``e = m(u) · exp((s - hi)/τ)`` with ``m = exp(φ)`` from :meth:`StepRule.mask`, where ``hi``
    (``(..., n, 1)``) is the maximum over the rows' valid keys (:func:`known_maximum`), so
    ``e <= 1`` and the normaliser ``Σ_j e_j >= ~1``: no running maximum is needed, the
    ``log`` of the mask and the ``exp`` of ``φ`` are saved, and the exponential is taken as
    ``exp2`` (PyTorch's fastest) of an argument clamped to ``[log2(tiny), 0]`` (numerators
    below the normal range are raised to it; invalid keys with ``s > hi`` stay finite before
    the bias zeroes them). ``bias``: validity from :func:`key_bias`, broadcastable to ``s``;
    ``self_offset``: instead of a bias, the diagonal of ``s`` that holds each row's own key
    (excluded). ``s`` must already have the full broadcast shape.
    """
    gap = torch.sub(s, hi)
    u = inv = m = None
    saved: tuple = ()
    if spec.step.warps:
        inv, shift = unit_affine(lo, hi)
        m, saved, u = spec.step.rule.mask_affine(s, gap, inv, shift, a, b, t)
    lowest = math.log2(torch.finfo(s.dtype).tiny)
    # log2(e)/τ computed here: a module-level float read in an autograd.Function's forward breaks
    # torch.compile(dynamic=True) of two such calls in one graph (dynamo lifts it as a symbolic input)
    e = gap.mul_(1.0 / (math.log(2.0) * spec.temperature)).clamp_(lowest, 0.0)
    if bias is not None:
        e.add_(bias)
    e.exp2_()
    if m is not None:
        e.mul_(m)
    if self_offset is not None:
        e.diagonal(self_offset, -2, -1).zero_()
    kept = None
    if count_kept:  # the support in {0, 1}: a float sum (a sum of bools converts them to int64 first, 4x slower on CPU)
        valid = torch.ones_like(e) if m is None else spec.step.rule.support(saved)
        if bias is not None:
            valid.masked_fill_(bias == -math.inf, 0.0)
        if self_offset is not None:
            valid.diagonal(self_offset, -2, -1).zero_()
        kept = valid.sum(-1)
    return MaskedNumerator(e, u, inv, saved, kept)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------


def _shape(x) -> tuple:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def check_inputs(q, k, v, mask, exclude_self: bool, self_offset: int = 0) -> torch.Size:
    """Validate tensors; return the broadcast leading (batch) shape."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape (..., rows, features), got {_shape(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (..., n, d) and k (..., m, d) must share d, got q {_shape(q)} and k {_shape(k)}")
    if q.shape[-1] == 0:
        raise ValueError(f"q and k need at least one feature (d >= 1), got q {_shape(q)} and k {_shape(k)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k (..., m, d) and v (..., m, e) must share m, got k {_shape(k)} and v {_shape(v)}")
    try:
        batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"leading dims of q {_shape(q)}, k {_shape(k)} and v {_shape(v)} do not broadcast"
        ) from None
    n, m = q.shape[-2], k.shape[-2]
    if not is_int(self_offset, 0):
        raise ValueError(f"self_offset must be a non-negative int, got {self_offset!r}")
    if self_offset and not exclude_self:
        raise ValueError(f"self_offset={self_offset} needs exclude_self=True")
    if exclude_self and n + self_offset > m:
        if self_offset:
            raise ValueError(
                f"exclude_self with self_offset={self_offset} needs n + self_offset <= m (every query's own key "
                f"among the keys), got q {_shape(q)} and k {_shape(k)}"
            )
        raise ValueError(
            f"exclude_self=True needs n <= m (query i's own key is key i), got q {_shape(q)} and k {_shape(k)}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask must be on q's device {q.device}, got {mask.device}")
        if not broadcasts_to(mask.shape, (*batch, n, m)):
            raise ValueError(f"mask of shape {_shape(mask)} does not broadcast to (..., n, m) = {(*batch, n, m)}")
    return batch


def _inside(name: str, x):
    """Whether step parameter ``name`` (``a``, ``b`` or ``t``) lies in its range
    (:data:`_PARAM_RANGES`): a bool for a float, a bool tensor for a tensor; NaN is outside."""
    low, high, high_inclusive = _PARAM_RANGES[name]
    return (x > low) & ((x <= high) if high_inclusive else (x < high))


def _in_domain(params: dict[str, torch.Tensor | float]) -> torch.Tensor:
    """0-dim bool: every tensor among ``params`` (``a``, ``b``, ``t``; at least one is a tensor)
    lies in its range, and ``a < b`` wherever one of them is a tensor. Each is reduced on its
    own, so an empty tensor does not hide another's values."""
    checks = [_inside(name, x).all() for name, x in params.items() if isinstance(x, torch.Tensor)]
    a, b = params["a"], params["b"]
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        checks.append((a < b).all())
    return torch.stack(checks).all()


def _check_param_values(name: str, x: torch.Tensor) -> None:
    """Raise the ``ValueError`` that says how ``x`` leaves step parameter ``name``'s range, if it does."""
    xd = x.detach()
    if not bool(_inside(name, xd).all()):
        if bool(torch.isnan(xd).any()):
            raise ValueError(
                f"{name} contains NaN (shape {_shape(x)}); where the step parameters are computed from the "
                "inputs (SoftStep(mode='instance'), a head's instance mode), NaN or inf in the queries causes this; "
                "otherwise the SoftStep's own values are NaN (a diverged training step, a corrupt checkpoint)"
            )
        raise ValueError(f"{name} must lie in {_range_text(name)}, got values in [{xd.min().item()}, {xd.max().item()}]")


def _same_device(x: torch.device, y: torch.device | str) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when the index is left open."""
    y = torch.device(y)
    return x.type == y.type and (x.index is None or y.index is None or x.index == y.index)


def device_constants(values: list[float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``values`` as a 1-D tensor on ``device`` without synchronising the stream.

    ``torch.tensor(values, device="cuda")`` copies from pageable host memory, which waits for
    every kernel already queued and leaves the GPU idle while the host queues the next ones.
    On CUDA the values go through pinned memory with a non-blocking copy (the caching host
    allocator keeps the source alive until the copy has run): one copy instead of a fill
    kernel per value. Under CUDA-graph capture a copy would replay from host memory that has
    been reused since, so there, under ``torch.compile`` (whose tracer cannot ask whether a
    capture is running) and on other devices each value is a fill."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    if device.type == "cuda" and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])


_PARAM_RANGES = {"a": (0.0, 1.0, False), "b": (0.0, 1.0, True), "t": (0.0, 1.0, False)}


def _rounded(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to ``dtype`` (float32 or float64, the compute dtypes), as a Python float."""
    if dtype == torch.float32:
        return float(numpy.float32(x)) if abs(x) < 3.4e38 else x
    return x


def _range_text(name: str) -> str:
    low, high, high_inclusive = _PARAM_RANGES[name]
    return f"({low}, {high}{']' if high_inclusive else ')'}"


def _check_float_param(name: str, x: float, given: float | None = None) -> None:
    if not _inside(name, x):
        shown = f"{given} ({x} in the compute dtype)" if given is not None and given != x else f"{x}"
        raise ValueError(f"{name} must lie in {_range_text(name)}, got {shown}")


def resolve_params(
    a, b, t, *, batch: torch.Size, n: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn ``a, b, t`` (None, float or tensor broadcastable to ``(..., n)``) into tensors
    of the compute dtype broadcastable to ``(..., n, 1)``; check ``0 < a < b <= 1``, ``0 < t < 1``
    (Python floats always, tensors where it costs no device synchronisation: on the CPU)."""
    resolved: dict[str, torch.Tensor | float] = {}
    for name, x, default in (("a", a, DEFAULT_A), ("b", b, DEFAULT_B), ("t", t, DEFAULT_T)):
        if x is None:
            x = default
        if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)):  # NumPy reals too
            raise TypeError(f"{name} must be a float, a tensor or None, got {type(x).__name__}")
        if not isinstance(x, torch.Tensor):
            given, x = float(x), _rounded(float(x), dtype)  # checked as computed: 1 - 1e-9 is 1.0 in float32
            _check_float_param(name, x, given)
        else:
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
            if not _same_device(x.device, device):
                raise ValueError(f"{name} must be on the inputs' device {device}, got {x.device}")
            if not broadcasts_to(x.shape, (*batch, n)):
                raise ValueError(f"{name} of shape {_shape(x)} does not broadcast to the rows (..., n) = {(*batch, n)}")
            x = x.to(dtype)
        resolved[name] = x
    # Tensor values are read back only on the CPU in eager mode: on accelerators that would
    # synchronise, and under torch.compile it would break the graph (as on accelerators, tensor
    # parameters are then trusted; SoftStep produces valid ones by construction).
    on_cpu = torch.device(device).type == "cpu" and not torch.compiler.is_compiling()
    tensors = {name: x for name, x in resolved.items() if isinstance(x, torch.Tensor)}
    on_host = {name: x for name, x in resolved.items() if isinstance(x, float)}
    a_ge_b = False
    # one read for every check: small CPU calls are bound by per-operation overhead
    if tensors and on_cpu and all(x.dim() == 0 for x in tensors.values()):
        on_host.update(zip(tensors, torch.stack([x.detach() for x in tensors.values()]).tolist()))
        for name in tensors:
            _check_float_param(name, on_host[name])
    elif tensors and on_cpu and not bool(_in_domain(resolved)):
        for name, x in tensors.items():  # which one (the ranges first, as for floats)
            _check_param_values(name, x)
        a_ge_b = True
    if "a" in on_host and "b" in on_host:
        a_ge_b = on_host["a"] >= on_host["b"]
    if a_ge_b:
        raise ValueError("a must be smaller than b for every row (0 < a < b <= 1)")
    floats = [name for name, x in resolved.items() if isinstance(x, float)]
    if floats:  # one small tensor for all float parameters
        values = device_constants([resolved[name] for name in floats], dtype, device)
        resolved.update(zip(floats, values.unbind()))
    return tuple(p.unsqueeze(-1) if p.dim() > 0 else p for p in (resolved["a"], resolved["b"], resolved["t"]))


def as_real(name: str, value, kind: str) -> float:
    """``value`` as a Python float: Python and NumPy reals and one-element tensors without
    gradient are accepted (as SDPA accepts them), bools and anything else are a ``TypeError``
    that names ``name``; ``kind`` says what is expected."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return float(value)


def check_dropout_p(dropout_p, allow_one: bool = True, name: str = "dropout_p") -> float:
    """``dropout_p`` as a float in ``[0, 1]`` (``[0, 1)`` without ``allow_one``; ``TypeError`` /
    ``ValueError`` naming ``name`` otherwise). 1 drops every weight, as in SDPA and ``nn.Dropout``."""
    interval = "[0, 1]" if allow_one else "[0, 1)"
    dropout_p = as_real(name, dropout_p, f"a float in {interval}")
    if not (0.0 <= dropout_p < 1.0 or (allow_one and dropout_p == 1.0)):
        raise ValueError(f"{name} must be a float in {interval}, got {dropout_p!r}")
    return dropout_p


def check_chunk_size(chunk_size) -> None:
    """``chunk_size``: a positive int or ``None`` (``ValueError`` otherwise)."""
    if chunk_size is not None and not is_int(chunk_size, 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_impl(impl) -> None:
    """``impl``: one of :data:`IMPLS` (``ValueError`` otherwise)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_backend_options(metric: str, impl: str, chunk_size, scale=None, temperature=1.0) -> tuple[float | None, float]:
    """What the backend would refuse at the first call, checked when a front end is built:
    ``impl``, ``chunk_size``, ``scale``, ``temperature`` and a metric that only the dense path
    has. Returns ``(scale, temperature)`` as the backend takes them (Python floats)."""
    check_metric(metric)
    check_impl(impl)
    check_chunk_size(chunk_size)
    spec = make_spec(metric, scale, "none", temperature, False, False, False)
    if metric not in STREAMING_METRICS and impl in ("chunked", "triton"):
        raise ValueError(f"metric={metric!r} is only available with impl='dense' (got impl={impl!r})")
    return spec.scale, spec.temperature


#: The smallest softmax temperature: float32's smallest normal, so that ``1/τ`` (and the
#: kernels' ``log2(e)/τ``) are finite float32 factors.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def check_float32_scale(name: str, value: float, inputs: str = "") -> None:
    """A similarity factor that float32 computes with: a normal float32 (a smaller one rounds
    similarities of ordinary size to 0 or a subnormal: flat rows) whose double is finite
    (``sqeuclidean`` scores ``2 · scale · q·k`` in one GEMM). ``inputs``: for the message."""
    info = torch.finfo(torch.float32)
    if not info.tiny <= value <= info.max / 2:
        raise ValueError(f"{name} must be between {info.tiny:.3g} and {info.max / 2:.3g}{inputs}, got {value!r}")


def make_spec(
    metric, scale, step, temperature, causal, exclude_self, detach_range, self_offset: int = 0, dtype: torch.dtype | None = None
) -> WarpSpec:
    """The checked options of a backend call. ``dtype``: the inputs' dtype, where known: below
    float64 the similarity factor ``scale`` is checked by :func:`check_float32_scale`."""
    check_metric(metric)
    if scale is not None:
        scale = as_real("scale", scale, "a positive finite float or None")
        if not is_finite_real(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
        if dtype is not None and work_dtype(dtype) != torch.float64:
            check_float32_scale("scale", scale, f" for {dtype} inputs")
    temperature = as_real("temperature", temperature, "a positive float")
    if not is_finite_real(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be at least {MIN_TEMPERATURE:.3g}, got {temperature!r}")
    return WarpSpec(
        metric=metric,
        scale=scale,
        step=get_step(step),
        temperature=float(temperature),
        causal=as_flag("causal", causal),
        exclude_self=as_flag("exclude_self", exclude_self),
        detach_range=as_flag("detach_range", detach_range),
        self_offset=int(self_offset) if exclude_self else 0,
    )
