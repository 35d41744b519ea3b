"""Step functions (the warp) and their learned parameterisation, :class:`SoftStep`.

A *step* maps a range-normalised similarity ``u ∈ [0, 1]`` and per-row parameters
``(a, b, t)`` to a log-mask ``φ = log m(u)``: ``-inf`` where the neighbour is dropped
(weight exactly 0), ``0`` where it is kept untouched. The backend adds ``φ`` to the
softmax logits, so ``w ∝ m(u) · exp(s / τ)``.

Built-in steps (see ``docs/math.md``):

* ``"sigmoidal"`` (exactly sparse): ``m = 0`` for ``u ≤ a``, ``1`` for ``u ≥ b``, else
  ``(u-a)^(1/t) / ((u-a)^(1/t) + (b-u)^(1/t))``.
* ``"log"`` (soft): ``log m = t/(1-t) · (b-u) · log(u/b)`` for ``u < b``, ``0`` above.
* ``"poly"`` (exactly sparse, no transcendentals in the fused kernel): a cubic smoothstep
  ``y²(3 - 2y)`` on ``y = (u - (a+b)/2) / (t (b-a)) + 1/2``, clamped to ``[0, 1]``.
* ``"none"``: ``φ = 0``; the backend reduces to a plain softmax over similarities.

User steps are added with :func:`register_step`; they run on the dense and chunked paths.
A step function must be *gradient safe*: compute the band expression on inputs that are
valid everywhere (replace out-of-band ``u`` first), then select, so that no NaN or inf
reaches autograd from the entries it discards.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from simwarp._autograd import as_flag, first_order, is_int, unaliased

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_A: float = 0.1
"""Default lower threshold: neighbours with ``u ≤ a`` get weight 0."""
DEFAULT_B: float = 0.9
"""Default upper threshold: neighbours with ``u ≥ b`` keep their full softmax weight."""
DEFAULT_T: float = 0.5
"""Default shape: small ``t`` switches sharply inside the band, large ``t`` gently."""


@dataclass(frozen=True)
class Step:
    """A registered step: ``log_mask(u, a, b, t) -> φ`` (same shape as ``u``).

    ``warps=False`` marks a step whose ``φ`` is identically 0 (``"none"``), so the backend can
    skip the range normalisation and the step entirely. ``rule`` is the closed form of a
    built-in step (:class:`StepRule`); the backend fuses it with the range normalisation.
    """

    name: str
    log_mask: StepFn
    warps: bool = True
    rule: StepRule | None = None

    def mask(self, u: torch.Tensor, a, b, t) -> torch.Tensor:
        """The multiplicative mask ``m(u) = exp(φ)`` (for plots and analysis)."""
        return self.log_mask(u, *(torch.as_tensor(p, dtype=u.dtype, device=u.device) for p in (a, b, t))).exp()


# The built-in steps have closed forms (`StepRule`), written for CPU speed: no data-dependent
# `where`/`masked_fill` (an order of magnitude slower than arithmetic on random masks) and no
# transcendental evaluated at 0, ±inf, a subnormal or an underflowing result (slow paths of the
# vectorised math library). Every log sees a clamped, normal argument, and a dropped neighbour
# gets its exact -inf (log form) from the 0/1 indicator of its band coordinate (`_inside`) and
# its exact 0 (mask form) from that indicator or, for "sigmoidal", from an exponential clamped to
# overflow to inf. The backward divides only by quantities clamped away from 0 (`_guard`); entries
# outside the band, whose true partials are 0, receive a zero upstream gradient from the
# backend's softmax and so contribute exactly 0.


class StepRule:
    """Closed form of a step: ``forward(u, a, b, t) -> (φ, saved)``, its mask form
    ``mask(u, a, b, t) -> (m, saved)`` and
    ``backward(saved, g_φ, needs, range_sums) -> (g_u, g_a, g_b, g_t, sums)``.

    ``mask`` returns ``m = exp(φ)`` (exactly 0 where ``φ = -inf``; where ``m`` would fall below
    the smallest normal number it may be raised to about that size or flushed to 0) and the same ``saved`` as
    ``forward``, so one ``backward`` (in terms of ``g_φ``) serves both forms. It lets the backend
    multiply the softmax numerator by ``m`` instead of adding ``φ`` to the logits, which saves the
    ``log`` (and, for ``"poly"``, is free of transcendentals). ``g_u`` has ``φ``'s (full) shape and
    is a fresh tensor the caller may update in place; ``g_a, g_b, g_t`` are reduced to the
    parameters' shapes, ``None`` where ``needs`` is False. With ``range_sums`` (the caller needs
    the gradient of the range normalisation) a rule may return ``sums = (Σ_j g_u, Σ_j g_u u)``
    per row (shape ``(..., n, 1)``), which it often has at hand; ``None`` lets the caller compute them.
    """

    @staticmethod
    def forward(u, a, b, t) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        raise NotImplementedError

    @classmethod
    def mask(cls, u, a, b, t) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        phi, saved = cls.forward(u, a, b, t)
        return phi.exp_(), saved

    @classmethod
    def mask_affine(
        cls, s, gap, scale, shift, a, b, t
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
        """``mask`` of ``u = s · scale + shift = 1 + gap · scale`` and ``u`` itself, or ``None``
        if ``backward`` always returns the range sums without it.

        ``scale``, ``shift``: per-row constants (:func:`~simwarp.backend.common.unit_affine`);
        ``gap = s - hi``, the scores' distance below the row maximum (the caller overwrites it
        afterwards: do not keep it). Rounding puts one end of the range exactly where it
        belongs: ``s · scale + shift`` (here) is exactly 0 at the row minimum, which the ``log``
        step needs (its weight falls to 0 with infinite slope there); ``1 + gap · scale`` is
        exactly 1 at the row maximum (the ``sigmoidal`` step, steep below ``b = 1``)."""
        u = (s * scale).add_(shift)
        m, saved = cls.mask(u, a, b, t)
        return m, saved, u

    @staticmethod
    def support(saved) -> torch.Tensor:
        """A fresh float tensor, 1 where the key lies in the step's support (``φ > -inf``, i.e.
        ``m > 0`` in exact arithmetic) and 0 elsewhere (also for a NaN coordinate), from the
        ``saved`` of ``mask``: the kept count does not depend on ``m`` underflowing."""
        raise NotImplementedError

    @staticmethod
    def backward(saved, g_phi, needs, range_sums: bool = False) -> tuple:
        raise NotImplementedError


def _guard(dtype: torch.dtype) -> float:
    """Lower clamp for divisors in the backward: far below any in-band value, yet its
    reciprocal times the largest per-row factors (``1/t``, ``1/(b-a)``) stays finite."""
    return torch.finfo(dtype).tiny ** 0.5


def _safe_log_(x: torch.Tensor) -> torch.Tensor:
    """In-place ``log`` of ``x >= 0`` with the argument clamped to the normal range."""
    info = torch.finfo(x.dtype)
    return x.clamp_(info.tiny, info.max).log_()


def _inside(band_coordinate: torch.Tensor) -> torch.Tensor:
    """The 0/1 indicator of ``band_coordinate > 0`` for ``band_coordinate >= 0`` (between 0 and 1
    on subnormal values, where the mask it multiplies is below the normal range anyway)."""
    return torch.mul(band_coordinate, 1 / torch.finfo(band_coordinate.dtype).tiny).clamp_max_(1.0)


def _drop_(phi: torch.Tensor, band_coordinate: torch.Tensor) -> torch.Tensor:
    """``φ = -inf`` where ``band_coordinate`` (``>= 0``) is 0; ``φ`` must be ``< 0`` there."""
    return phi.div_(_inside(band_coordinate))


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` of a positive per-row factor (``t (b - a)``, ``t``), at most the dtype's
    largest value: an infinite factor would turn the zero gradient of a key outside the band
    into NaN (``0 · inf``); the largest finite value keeps it 0 and still sends every key off
    the band's centre to a clamp (a band narrower than the dtype resolves)."""
    return torch.reciprocal(x).clamp_max_(torch.finfo(x.dtype).max)


def _reduce(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Sum a broadcast gradient back to the shape of the input it belongs to."""
    return grad.sum_to_size(like.shape) if grad is not None and grad.shape != like.shape else grad


def _row_constant(*params: torch.Tensor) -> bool:
    """Whether the parameters are constant along the key (last) dimension."""
    return all(p.dim() == 0 or p.shape[-1] == 1 for p in params)


class SigmoidalRule(StepRule):
    """On the band coordinate ``x = (u-a)/(b-a)`` clamped to ``[0, 1]``, with ``ρ = log2((1-x)/x)``:
    ``m = 1 / (1 + 2^(ρ/t))`` (0 at ``x = 0``, 1 at ``x = 1``), ``φ = log m = -softplus(ρ ln2 / t)``.
    With ``h = g_φ (1 - m) / (t x (1 - x))`` (``= g_φ φ_x``):
    ``∂u = h / (b-a)``,  ``∂a = h (x - 1) / (b-a)``,  ``∂b = -h x / (b-a)``,  ``∂t = g_φ (1 - m) ρ ln2 / t²``.

    ``ρ`` is taken of a ratio clamped to the normal range and ``ρ/t`` is clamped to
    ``[log2(tiny), log2(max) + 1]``, so ``2^(ρ/t)`` is either normal or ``inf`` (``m = 0``
    exactly: at ``x = 0``, or where ``m`` would be below about ``2^-128``) and no transcendental
    meets 0, inf or a subnormal."""

    @staticmethod
    def _exponent(rho, t):
        """``ρ / t`` clamped so that ``2^(ρ/t)`` is normal or ``inf``."""
        info = torch.finfo(rho.dtype)
        return torch.div(rho, t).clamp_(math.log2(info.tiny), math.log2(info.max) + 1.0)

    @staticmethod
    def forward(u, a, b, t):
        m, saved = SigmoidalRule.mask(u, a, b, t)
        x, rho = saved[:2]
        # softplus is linear above `threshold` (error e^-threshold): 40 is exact in float64
        phi = torch.nn.functional.softplus(SigmoidalRule._exponent(rho, t).mul_(math.log(2.0)), threshold=40.0).neg_()
        return _drop_(phi, x), saved

    @staticmethod
    def mask(u, a, b, t):
        # a division: u = b gives x = 1 exactly (times 1/(b - a) it may be 1 - ulp, inside the band)
        x = torch.sub(u, a).div_(b - a).clamp_(0.0, 1.0)
        return SigmoidalRule._mask_of_band(x, a, b, t)

    @staticmethod
    def mask_affine(s, gap, scale, shift, a, b, t):
        # x = (u - a)/(b - a) with u - a = gap · scale + (1 - a), from the gap below the row
        # maximum: the best key gets x = (1 - a)/(b - a) exactly, 1 for b = 1 (with 1 - ulp it
        # would lie in the band, where φ's partials are ~ulp^(1/t - 1)/t: O(1) for t near 1).
        # A division: the product scale / (b - a) overflows on rows of tiny range and band.
        x = torch.mul(gap, scale).add_(1 - a).div_(b - a).clamp_(0.0, 1.0)  # (addcmul broadcasts slowly)
        m, saved = SigmoidalRule._mask_of_band(x, a, b, t)
        return m, saved, None

    @staticmethod
    def support(saved):
        return torch.sign(saved[0])  # x in [0, 1] (a NaN x gives 0: a NaN row keeps no key)

    @staticmethod
    def _mask_of_band(x, a, b, t):
        info = torch.finfo(x.dtype)
        rho = torch.reciprocal(x).sub_(1.0).clamp_(info.tiny, info.max).log2_()  # (1 - x)/x = 1/x - 1
        m = SigmoidalRule._exponent(rho, t).exp2_().add_(1.0).reciprocal_()
        return m, (x, rho, m, a, b, t)

    @staticmethod
    def backward(saved, g_phi, needs, range_sums: bool = False):
        x, rho, m, a, b, t = saved
        need_u, need_a, need_b, need_t = needs
        width = b - a
        inv_tw, inv_t = _reciprocal(t * width), _reciprocal(t)
        g_kept = torch.addcmul(g_phi, g_phi, m, value=-1.0)  # g_φ (1 - m)
        # g_φ φ_x t; 0 outside the band (x(1-x) = 0 meets g_φ (1 - m) = 0 there)
        h = torch.addcmul(x, x, x, value=-1.0).clamp_min_(_guard(x.dtype))
        h = torch.div(g_kept, h, out=h)
        if not _row_constant(a, b, t):
            ga = _reduce((x - 1.0).mul_(h).mul_(inv_tw), a) if need_a else None
            gb = _reduce(torch.mul(h, x).mul_(-inv_tw), b) if need_b else None
            # times ln2/t, then 1/t: t² alone is subnormal (then 1/t² inf, and 0 · inf NaN) for t < 1e-19
            gt = _reduce(g_kept.mul_(rho).mul_(inv_t * math.log(2.0)).mul_(inv_t), t) if need_t else None
            gu = h.mul_(inv_tw)
            sums = None
            if range_sums:  # u = a + x (b - a) wherever ∂u is not 0
                sums = (gu.sum(-1, keepdim=True), (x * width).add_(a).mul_(gu).sum(-1, keepdim=True))
            return (gu if need_u or range_sums else None), ga, gb, gt, sums
        gt = g_kept.mul_(rho).sum(-1, keepdim=True).mul_(inv_t * math.log(2.0)).mul_(inv_t) if need_t else None
        gu = h.mul_(inv_tw)  # ∂u
        ga = gb = sums = None
        if need_a or need_b or range_sums:  # with S0 = Σ ∂u, Sx = Σ ∂u x (and u = a + x (b - a) in the band)
            s0 = gu.sum(-1, keepdim=True)
            sx = torch.mul(gu, x, out=g_kept).sum(-1, keepdim=True)  # g_kept's buffer is free (and warm)
            ga = _reduce(sx - s0, a) if need_a else None
            gb = _reduce(-sx, b) if need_b else None
            sums = (s0, a * s0 + width * sx) if range_sums else None
        return (gu if need_u else None), ga, gb, _reduce(gt, t), sums


class LogRule(StepRule):
    """φ = k (b - v) log(v / b) with v = clamp(u, 0, b), k = t / (1 - t) (``a`` unused).
    ∂u = k ((b - v)/v - log(v/b)),  ∂b = k (log(v/b) - (b - v)/b),  ∂t = φ / (t (1 - t))."""

    @staticmethod
    def forward(u, a, b, t):
        v = torch.minimum(u, b).clamp_min_(0.0)
        phi = _safe_log_(v / b).mul_(b - v).mul_(t / (1 - t))  # v = b gives 0
        return _drop_(phi, v), (u, b, t)  # u <= 0 is dropped

    @staticmethod
    def support(saved):
        return torch.sign(saved[0]).clamp_min_(0.0)  # u > 0 (NaN: 0)

    @staticmethod
    def backward(saved, g_phi, needs, range_sums: bool = False):
        u, b, t = saved
        need_u, _, need_b, need_t = needs
        v = torch.minimum(u, b).clamp_min_(_guard(u.dtype))  # u <= 0 is dropped: g_φ = 0 there
        k = t / (1 - t)
        log_vb = torch.log(v / b)
        gap = b - v
        gu = gb = gt = None
        if need_u:
            gu = (gap / v).sub_(log_vb).mul_(k).mul_(g_phi)
        if need_b:
            gb = _reduce((log_vb - gap / b).mul_(k).mul_(g_phi), b)
        if need_t:
            gt = _reduce((log_vb.mul_(gap)).mul_(g_phi).div_((1 - t) ** 2), t)
        return gu, None, gb, gt, None


class PolyRule(StepRule):
    """φ = log m(y), m = y² (3 - 2y) on y = clamp((u - (a+b)/2) c + 1/2, 0, 1), c = 1/(t (b - a)).
    With φ_y = 6 (1 - y) / (y (3 - 2y)) and h = g_φ φ_y c:  ∂u = h,  ∂a = h (t (y - 1/2) - 1/2),
    ∂b = -h (t (y - 1/2) + 1/2),  ∂t = -h (y - 1/2) (b - a): ``u - (a+b)/2 = (y - 1/2) t (b - a)``
    wherever h is not 0 (in the band), so the backward needs ``y`` alone (a masked key's ``u``
    may overflow to ±inf, where its zero gradient would meet it as 0 · inf)."""

    @staticmethod
    def forward(u, a, b, t):
        m, saved = PolyRule.mask(u, a, b, t)
        return _drop_(_safe_log_(m), saved[-1]), saved

    @staticmethod
    def mask(u, a, b, t):
        c = _reciprocal(t * (b - a))
        y = (u * c).add_(0.5 - (a + b) * 0.5 * c).clamp_(0.0, 1.0)
        return torch.mul(y, -2.0).add_(3.0).mul_(y).mul_(y), (a, b, t, y)  # 0 for y <= 0, 1 for y >= 1

    @staticmethod
    def support(saved):
        return torch.sign(saved[-1])  # y in [0, 1] (NaN: 0)

    @staticmethod
    def backward(saved, g_phi, needs, range_sums: bool = False):
        a, b, t, y = saved
        need_u, need_a, need_b, need_t = needs
        width = b - a
        y_in = y.clamp_min(_guard(y.dtype))  # y = 0 is dropped (g_φ = 0 there); φ_y(1) = 0
        den = torch.mul(y_in, -2.0).add_(3.0).mul_(y_in)
        h = y_in.neg_().add_(1.0).mul_(6.0).div_(den).mul_(g_phi).mul_(_reciprocal(t * width))  # g_φ φ_y c, in y_in's buffer
        ga = gb = gt = sums = None
        if _row_constant(a, b, t):  # per-row sums S0 = Σ h and P = Σ h (y - 1/2)
            s0 = h.sum(-1, keepdim=True)
            if need_a or need_b or need_t or range_sums:
                p = torch.linalg.vecdot(h, y).unsqueeze(-1) - 0.5 * s0
                ga = _reduce(t * p - 0.5 * s0, a) if need_a else None
                gb = _reduce(-(t * p + 0.5 * s0), b) if need_b else None
                gt = _reduce(-p * width, t) if need_t else None
                sums = (s0, (a + b) * 0.5 * s0 + t * width * p) if range_sums else None  # (Σ h, Σ h u)
        else:
            centred = (y - 0.5).mul_(h)  # h (y - 1/2)
            ga = _reduce(t * centred - 0.5 * h, a) if need_a else None
            gb = _reduce(-(t * centred + 0.5 * h), b) if need_b else None
            gt = _reduce(-centred * width, t) if need_t else None
        return (h if need_u else None), ga, gb, gt, sums


class _ClosedFormStep(torch.autograd.Function):
    """One autograd node for a :class:`StepRule` (the step used on its own)."""

    @staticmethod
    def forward(ctx, u, a, b, t, rule: type[StepRule]):
        phi, saved = rule.forward(u, a, b, t)
        ctx.rule, ctx.u_shape = rule, u.shape
        ctx.save_for_backward(*saved)
        return unaliased(phi)

    @staticmethod
    @first_order
    def backward(ctx, g_phi):
        gu, ga, gb, gt, _ = ctx.rule.backward(ctx.saved_tensors, g_phi, ctx.needs_input_grad[:4])
        return (None if gu is None else gu.sum_to_size(ctx.u_shape)), ga, gb, gt, None


def _rule_step(rule: type[StepRule], doc: str) -> StepFn:
    """The ``log_mask`` of a closed-form step (16-bit inputs run in float32: the guards need its range)."""

    def log_mask(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if u.dtype in (torch.float16, torch.bfloat16):
            return _ClosedFormStep.apply(u.float(), a.float(), b.float(), t.float(), rule).to(u.dtype)
        return _ClosedFormStep.apply(u, a, b, t, rule)

    log_mask.__doc__ = doc
    return log_mask


sigmoidal_log_mask = _rule_step(
    SigmoidalRule,
    """The paper's sigmoidal step, in log space: ``φ = -softplus((log(b-u) - log(u-a)) / t)``.

    Partials inside the band, with ``p = u - a``, ``q = b - u``, ``z = log(q/p)/t`` and
    ``σ = sigmoid(z)``: ``φ_u = σ (1/p + 1/q) / t``, ``φ_a = -σ / (t p)``, ``φ_b = -σ / (t q)``,
    ``φ_t = σ z / t`` (zero outside the band).
    """,
)
sigmoidal_log_mask.__name__ = sigmoidal_log_mask.__qualname__ = "sigmoidal_log_mask"

log_log_mask = _rule_step(
    LogRule, """The soft log step: ``φ = t/(1-t) · (b-u) · log(u/b)`` on ``0 < u < b`` (``a`` unused)."""
)
log_log_mask.__name__ = log_log_mask.__qualname__ = "log_log_mask"

poly_log_mask = _rule_step(
    PolyRule,
    """Transcendental-free step: a cubic smoothstep on a band of width ``t·(b-a)`` centred in ``[a, b]``.

    With ``c = 1 / (t (b - a))`` (one reciprocal per row) and
    ``y = (u - (a + b)/2) · c + 1/2``::

        m(u) = 0                 for y <= 0   (so every u <= a is dropped, and more when t < 1)
        m(u) = y² (3 - 2y)       for 0 < y < 1
        m(u) = 1                 for y >= 1   (every u >= b keeps its full weight)

    ``m`` is C¹ (zero slope at both band ends), monotone, and costs a subtract, a fused
    multiply-add and three multiplies per score (the fused kernels multiply by ``m``; this
    log-space form takes one ``log``). ``t → 0`` approaches a hard threshold at the
    band's midpoint; ``t = 1`` spreads the smoothstep over all of ``[a, b]``. In log space
    (``φ = log m``) its partial derivatives inside the band are, with ``x = (u - a)/(b - a)``
    and ``φ_y = 6 (1 - y) / (y (3 - 2y))``: ``φ_u = φ_y c``, ``φ_a = φ_y c (x - 1)``,
    ``φ_b = -φ_y c x``, ``φ_t = -φ_y (y - 1/2) / t`` (zero outside the band).
    """,
)
poly_log_mask.__name__ = poly_log_mask.__qualname__ = "poly_log_mask"


def none_log_mask(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """No warping: ``φ = 0`` (plain softmax over the similarities)."""
    return torch.zeros_like(u)


_REGISTRY: dict[str, Step] = {}


def register_step(name: str, fn: StepFn, *, overwrite: bool = False) -> Step:
    """Register a user step for the dense and chunked backends.

    Args:
        name: the name passed as ``step=`` to :func:`simwarp.warp_attend` and friends.
        fn: ``fn(u, a, b, t) -> φ`` with ``u`` of shape ``(..., n, m)`` and ``a, b, t``
            broadcastable to it (``(..., n, 1)``); returns ``log m(u)`` with ``-inf`` for
            dropped neighbours. Must be gradient safe (see the module docstring) and keep
            the row's best key (``u = 1``) finite. The backend evaluates the step on whole
            blocks, invalid keys included, and masks afterwards; registered steps therefore
            receive ``u`` clamped to ``[0, 1]``.
        overwrite: allow replacing an existing user step (the built-in steps cannot be
            replaced: their closed forms and kernels would be lost for the process).

    The step's output is checked for shape and dtype (it must be ``u``'s) on every call;
    its values are not (that would cost a device synchronisation): keep ``φ(1) = 0`` so the
    best key survives, or rows can come out all zero without being flagged ``empty``.

    Returns:
        The registered :class:`Step`.

    Raises:
        TypeError: an empty or non-str ``name``, or an ``fn`` that is not callable.
        ValueError: a built-in name, or a name taken without ``overwrite``; at call time, an
            output of another shape or dtype than ``u``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"step name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"step function for {name!r} must be callable, got {type(fn).__name__}")
    overwrite = as_flag("overwrite", overwrite)
    try:
        inspect.signature(fn).bind(None, None, None, None)
    except TypeError:
        raise TypeError(f"step function for {name!r} must take (u, a, b, t), got the signature {inspect.signature(fn)}") from None
    except ValueError:  # no signature to read (a builtin): the call will tell
        pass
    if name in BUILTIN_STEPS:
        raise ValueError(f"{name!r} is a built-in step (with closed forms and kernels); register yours under another name")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"step {name!r} is already registered; pass overwrite=True to replace it")

    def clamped(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phi = fn(u.clamp(0.0, 1.0), a, b, t)
        # shape and dtype are free to check (no device synchronisation); values are not checked
        if not isinstance(phi, torch.Tensor) or phi.shape != u.shape or phi.dtype != u.dtype:
            raise ValueError(
                f"step {name!r} must return log m(u) as a tensor of u's shape {tuple(u.shape)} and dtype "
                f"{u.dtype}, got {tuple(getattr(phi, 'shape', ()))} {getattr(phi, 'dtype', type(phi).__name__)}"
            )
        return phi

    clamped.__name__ = clamped.__qualname__ = getattr(fn, "__name__", name)
    clamped.__doc__ = getattr(fn, "__doc__", None)
    step = Step(name, clamped)
    _REGISTRY[name] = step
    return step


def get_step(step: str | Step) -> Step:
    """Look up a step by name (or pass a :class:`Step` through)."""
    if isinstance(step, Step):
        return step
    if not isinstance(step, str) or step not in _REGISTRY:
        raise ValueError(f"step must be one of {available_steps()}, got {step!r}")
    return _REGISTRY[step]


def available_steps() -> tuple[str, ...]:
    """Names of the registered steps, the built-in ones first (``step=`` accepts each)."""
    return tuple(_REGISTRY)


BUILTIN_STEPS = ("sigmoidal", "log", "poly", "none")
# The built-in steps accept any real u (invalid keys may lie outside [0, 1]): no clamp needed.
_REGISTRY.update(
    sigmoidal=Step("sigmoidal", sigmoidal_log_mask, rule=SigmoidalRule),
    log=Step("log", log_log_mask, rule=LogRule),
    poly=Step("poly", poly_log_mask, rule=PolyRule),
    none=Step("none", none_log_mask, warps=False),  # identically 0: the backend skips it
)


# ---------------------------------------------------------------------------------------
# Learned parameterisation
# ---------------------------------------------------------------------------------------

MODES = ("global", "per_head", "instance")


PARAM_MARGIN: float = 1e-3
"""Keeps learned parameters away from their bounds, so saturated sigmoids still give
``0 < a < b <= 1`` and ``0 < t < 1`` in float32 (and float16) arithmetic."""


def params_from_raw(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map unconstrained ``raw[..., 0:3]`` to ``(a, b, t)`` with ``0 < a < b ≤ 1``, ``0 < t < 1``.

    With ``ε = PARAM_MARGIN``: ``a = ε + (1 - 2ε) σ(raw₀)``, ``b = a + (ε + (1 - ε) σ(raw₁)) (1 - a)``,
    ``t = ε + (1 - 2ε) σ(raw₂)``; so ``a ∈ [ε, 1-ε]``, ``b - a ≥ ε²`` and ``t ∈ [ε, 1-ε]`` even
    when a sigmoid saturates to exactly 0 or 1.
    """
    eps = PARAM_MARGIN
    if raw.dtype in (torch.float16, torch.bfloat16):  # too coarse near 1 to keep b > a
        raw = raw.float()
    # one sigmoid and one affine map for all three (few autograd nodes: this runs every step)
    low = torch.tensor([eps, eps, eps], dtype=raw.dtype, device=raw.device)
    span = torch.tensor([1 - 2 * eps, 1 - eps, 1 - 2 * eps], dtype=raw.dtype, device=raw.device)
    a, width, t = torch.addcmul(low, torch.sigmoid(raw[..., :3]), span).unbind(-1)
    return a, torch.addcmul(a, width, 1 - a), t


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def raw_from_params(a: float, b: float, t: float) -> torch.Tensor:
    """Inverse of :func:`params_from_raw` for scalars (used for initialisation): a ``(3,)``
    float64 CPU tensor."""
    eps = PARAM_MARGIN
    if not (eps < a < 1 - eps and a < b <= 1.0 and eps < t < 1 - eps):
        raise ValueError(
            f"init must satisfy {eps} < a < b <= 1, a < {1 - eps} and {eps} < t < {1 - eps}, got a={a}, b={b}, t={t}"
        )
    if (b - a) / (1 - a) < eps * (1 + 1e-6):
        raise ValueError(
            f"init b - a must be at least {eps} · (1 - a) = {eps * (1 - a):.3g} (the margin that keeps learned "
            f"steps valid, simwarp.steps.PARAM_MARGIN), got a={a}, b={b}"
        )
    width = min(max(((b - a) / (1 - a) - eps) / (1 - eps), 1e-6), 1 - 1e-6)
    return torch.tensor(  # float64 (on the CPU, whatever the default device): a float64 module starts at init exactly
        [_logit((a - eps) / (1 - 2 * eps)), _logit(width), _logit((t - eps) / (1 - 2 * eps))], dtype=torch.float64, device="cpu"
    )


class _StartAtInit(nn.Linear):
    """The instance network's output layer (``→`` raw ``(a, b, t)``). Its ``reset_parameters``
    zeroes the weights and sets the bias to ``init``'s raw values, so every row starts at
    ``init``, also where initialisers reset each module that holds parameters (building on the
    meta device, FSDP), which the owning :class:`SoftStep` does not."""

    def __init__(self, in_features: int, init: tuple[float, float, float]) -> None:
        self.__dict__["init"] = init  # read by reset_parameters, which nn.Linear's constructor calls
        super().__init__(in_features, 3)

    def reset_parameters(self) -> None:
        _start_at(self, self.init)

    def _get_name(self) -> str:
        return "Linear"  # (what it is, for printing)


@torch.no_grad()
def _start_at(layer: nn.Linear, init: tuple[float, float, float]) -> None:
    """``layer`` (the instance network's output) giving ``init`` for every input."""
    layer.weight.zero_()
    layer.bias.copy_(raw_from_params(*init))


def check_init(init) -> tuple[float, float, float]:
    """``init`` (any iterable of three reals ``(a, b, t)``) as floats, checked as the step
    parameters are (``TypeError`` / ``ValueError`` otherwise)."""
    try:
        values = tuple(float(x) for x in init)
    except (TypeError, ValueError):
        raise TypeError(f"init must be three floats (a, b, t) or None, got {init!r}") from None
    if len(values) != 3:
        raise ValueError(f"init must be (a, b, t), got {init!r}")
    raw_from_params(*values)  # checks the values
    return values


class SoftStep(nn.Module):
    """Learned step parameters ``(a, b, t)`` for the backend.

    Modes:
        * ``"global"``: three learned scalars; ``forward()`` returns 0-dim tensors.
        * ``"per_head"``: ``num_heads × 3``; returns ``(num_heads, 1)`` tensors that broadcast
          against rows laid out as ``(..., num_heads, n)``.
        * ``"instance"``: a Linear (or, with ``hidden``, a two-layer MLP) maps a conditioning
          vector ``cond (..., in_features)`` (usually the query) to its own ``(a, b, t)``;
          returns ``(...)`` tensors, one per row.

    The valid ranges ``0 < a < b ≤ 1``, ``0 < t < 1`` hold by construction. Use
    :meth:`kwargs` to splat the step and its parameters into :func:`simwarp.warp_attend`.
    A step that does not warp (``"none"``) ignores ``(a, b, t)``: they are then constants
    (a buffer, no network), so the module has no parameters that never get a gradient
    (which ``DistributedDataParallel`` refuses).

    Args:
        mode: one of :data:`MODES`.
        in_features: size of the conditioning vector (``"instance"`` only).
        num_heads: number of heads (``"per_head"`` only).
        hidden: hidden width of the instance MLP; ``None`` = a single Linear.
        step: the step's registered name (kept with the parameters).
        init: initial ``(a, b, t)``; defaults to ``(0.1, 0.9, 0.5)`` (``DEFAULT_A``,
            ``DEFAULT_B``, ``DEFAULT_T``). The learned values keep a margin inside the valid
            ranges (:data:`PARAM_MARGIN` ``= 1e-3``), and so must ``init``: ``1e-3 < a < 0.999``,
            ``b - a >= 1e-3 · (1 - a)``, ``b <= 1``, ``1e-3 < t < 0.999``. The instance network
            starts with zero weights so every row starts at ``init``.
    """

    def __init__(
        self,
        mode: str = "global",
        in_features: int | None = None,
        num_heads: int | None = None,
        hidden: int | None = None,
        step: str = "sigmoidal",
        init: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value, needed in (("in_features", in_features, "instance"), ("num_heads", num_heads, "per_head"),
                                    ("hidden", hidden, "instance")):
            if value is None:
                continue
            if not is_int(value, 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if mode != needed:
                warnings.warn(f"SoftStep(mode={mode!r}) ignores {name} (it shapes mode={needed!r})", UserWarning, stacklevel=2)
        in_features, num_heads, hidden = (None if x is None else int(x) for x in (in_features, num_heads, hidden))
        get_step(step)
        init = (DEFAULT_A, DEFAULT_B, DEFAULT_T) if init is None else check_init(init)
        self.mode, self.step, self.in_features, self.num_heads = mode, step, in_features, num_heads
        self.init = init
        if mode == "per_head" and (not isinstance(num_heads, int) or num_heads < 1):
            raise ValueError(f"mode='per_head' needs num_heads >= 1, got {num_heads!r}")
        if mode == "instance" and (not isinstance(in_features, int) or in_features < 1):
            raise ValueError(f"mode='instance' needs in_features >= 1, got {in_features!r}")
        shape = (num_heads, 3) if mode == "per_head" else (3,)
        if not get_step(step).warps:
            self.register_buffer("raw", torch.empty(shape))
        elif mode in ("global", "per_head"):
            self.raw = nn.Parameter(torch.empty(shape))
        else:
            last = _StartAtInit(in_features if hidden is None else hidden, init)
            self.net = last if hidden is None else nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), last)
        if "raw" in self._parameters or "raw" in self._buffers:
            self._start_at_init()

    def reset_parameters(self) -> None:
        """Back to the initial step: ``(a, b, t) = init`` for every head and row (the instance
        network: its last layer's weights zero, a hidden layer initialised as ``nn.Linear``
        does). Also what ``module.to_empty(...)`` after building on the meta device needs."""
        init = getattr(self, "init", None)
        if init is None:
            raise RuntimeError("this SoftStep was saved by an older simwarp and does not record its init; build a new one")
        if "raw" in self._parameters or "raw" in self._buffers:
            self._start_at_init()
            return
        if isinstance(self.net, nn.Sequential):
            self.net[0].reset_parameters()
        _start_at(self.net if isinstance(self.net, nn.Linear) else self.net[-1], init)  # (also a plain Linear of an older module)

    @torch.no_grad()
    def _start_at_init(self) -> None:
        self.raw.copy_(raw_from_params(*self.init).expand_as(self.raw))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if "raw" in self._buffers:  # no warping: checkpoints from before it had constants held an unused network
            old = [key for key in state_dict if key.startswith(prefix + "net.")]
            if old:
                warnings.warn(
                    f"SoftStep(step={self.step!r}) does not warp and has no step network: the checkpoint's "
                    f"{old} are left out (an instance-mode network, saved before such steps held constants, or "
                    "trained with a warping step: then build the module with that step to use it)",
                    UserWarning,
                    stacklevel=2,
                )
            for key in old:
                del state_dict[key]
            if old and prefix + "raw" not in state_dict:
                state_dict[prefix + "raw"] = self.raw
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(a, b, t)`` shaped for :func:`simwarp.warp_attend`.

        Args:
            cond: ``(..., in_features)`` conditioning vectors, required in ``"instance"`` mode
                and ignored otherwise.
        """
        if self.mode == "instance":
            if cond is None:
                raise ValueError("SoftStep(mode='instance') needs a conditioning tensor `cond`")
            if not isinstance(cond, torch.Tensor):
                raise TypeError(f"cond must be a floating-point torch.Tensor, got {type(cond).__name__}")
            if not cond.is_floating_point():
                raise TypeError(f"cond must be a floating-point tensor, got dtype {cond.dtype}")
            if cond.dim() == 0 or cond.shape[-1] != self.in_features:
                raise ValueError(
                    f"cond must have last dim in_features={self.in_features}, got shape {tuple(cond.shape)}"
                )
            if "raw" in self._buffers:  # a step that does not warp: constants, one per row
                return tuple(p.expand(cond.shape[:-1]) for p in params_from_raw(self.raw))
            weight = next(self.net.parameters())
            # the step parameters are the network's dtype, like global mode's, whatever the
            # queries' dtype (the backend casts a, b, t to the compute dtype)
            return params_from_raw(self.net(cond.to(weight.dtype)))
        a, b, t = params_from_raw(self.raw)
        if self.mode == "per_head":
            return a[:, None], b[:, None], t[:, None]
        return a, b, t

    def kwargs(self, cond: torch.Tensor | None = None) -> dict:
        """``dict(step=..., a=..., b=..., t=...)`` for ``warp_attend(q, k, v, **softstep.kwargs(q))``."""
        a, b, t = self(cond)
        return {"step": self.step, "a": a, "b": b, "t": t}

    def curve(self, u: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The current mask ``m(u)`` on a grid ``u (g,)``: ``(g,)`` in global mode, ``(H, 1, g)``
        per head, ``(..., g)`` per row of ``cond (..., in_features)`` in instance mode."""
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"u must be a torch.Tensor grid of points in [0, 1], got {type(u).__name__}")
        a, b, t = (p.detach().unsqueeze(-1) for p in self(cond))
        return get_step(self.step).mask(u.to(a.dtype), a, b, t)

    def extra_repr(self) -> str:
        extra = f"mode={self.mode!r}, step={self.step!r}"
        if self.mode == "global" and not self.raw.is_meta:
            a, b, t = (float(p.detach()) for p in self())
            extra += f", a={a:.3f}, b={b:.3f}, t={t:.3f}"
        elif self.mode == "per_head":
            extra += f", num_heads={self.num_heads}"
        return extra
