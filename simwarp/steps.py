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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    skip the range normalisation and the step entirely.
    """

    name: str
    log_mask: StepFn
    warps: bool = True

    def mask(self, u: torch.Tensor, a, b, t) -> torch.Tensor:
        """The multiplicative mask ``m(u) = exp(φ)`` (for plots and analysis)."""
        return self.log_mask(u, *(torch.as_tensor(p, dtype=u.dtype, device=u.device) for p in (a, b, t))).exp()


def _select(phi_band: torch.Tensor, dropped: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """``φ`` from its in-band expression: ``-inf`` where dropped, ``0`` above the band."""
    return phi_band.masked_fill(above, 0.0).masked_fill(dropped, -math.inf)


def sigmoidal_log_mask(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's sigmoidal step, in log space: ``φ = -softplus((log(b-u) - log(u-a)) / t)``."""
    below, above = u <= a, u >= b
    inside = ~(below | above)
    u_in = torch.where(inside, u, (a + b) * 0.5)  # in-band stand-ins keep the logs finite
    z = torch.log((b - u_in) / (u_in - a)) / t
    return _select(-F.softplus(z), below, above)


def log_log_mask(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The soft log step: ``φ = t/(1-t) · (b-u) · log(u/b)`` on ``0 < u < b`` (``a`` unused)."""
    dropped, above = u <= 0, u >= b
    u_in = torch.where(dropped | above, b * 0.5, u)
    return _select(t / (1 - t) * (b - u_in) * torch.log(u_in / b), dropped, above)


def poly_log_mask(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Transcendental-free step: a cubic smoothstep on a band of width ``t·(b-a)`` centred in ``[a, b]``.

    With ``c = 1 / (t (b - a))`` (one reciprocal per row) and
    ``y = (u - (a + b)/2) · c + 1/2``::

        m(u) = 0                 for y <= 0   (so every u <= a is dropped, and more when t < 1)
        m(u) = y² (3 - 2y)       for 0 < y < 1
        m(u) = 1                 for y >= 1   (every u >= b keeps its full weight)

    ``m`` is C¹ (zero slope at both band ends), monotone, and costs a subtract, a fused
    multiply-add and three multiplies per score. ``t → 0`` approaches a hard threshold at the
    band's midpoint; ``t = 1`` spreads the smoothstep over all of ``[a, b]``. In log space
    (``φ = log m``) its partial derivatives inside the band are, with ``x = (u - a)/(b - a)``
    and ``φ_y = 6 (1 - y) / (y (3 - 2y))``: ``φ_u = φ_y c``, ``φ_a = φ_y c (x - 1)``,
    ``φ_b = -φ_y c x``, ``φ_t = -φ_y (y - 1/2) / t`` (zero outside the band).
    """
    y = (u - (a + b) * 0.5) / (t * (b - a)) + 0.5
    dropped, above = y <= 0, y >= 1
    y_in = torch.where(dropped | above, 0.5, y)
    return _select(torch.log(y_in * y_in * (3 - 2 * y_in)), dropped, above)


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
            the row's best key (``u = 1``) finite.
        overwrite: allow replacing an existing step.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"step name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"step function for {name!r} must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"step {name!r} is already registered; pass overwrite=True to replace it")
    step = Step(name, fn)
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
    return tuple(_REGISTRY)


BUILTIN_STEPS = ("sigmoidal", "log", "poly", "none")
register_step("sigmoidal", sigmoidal_log_mask)
register_step("log", log_log_mask)
register_step("poly", poly_log_mask)
_REGISTRY["none"] = Step("none", none_log_mask, warps=False)  # identically 0: the backend skips it


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
    a = eps + (1 - 2 * eps) * torch.sigmoid(raw[..., 0])
    b = a + (eps + (1 - eps) * torch.sigmoid(raw[..., 1])) * (1 - a)
    t = eps + (1 - 2 * eps) * torch.sigmoid(raw[..., 2])
    return a, b, t


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def raw_from_params(a: float, b: float, t: float) -> torch.Tensor:
    """Inverse of :func:`params_from_raw` for scalars (used for initialisation)."""
    eps = PARAM_MARGIN
    if not (eps < a < 1 - eps and a < b <= 1.0 and eps < t < 1 - eps):
        raise ValueError(
            f"init must satisfy {eps} < a < b <= 1, a < {1 - eps} and {eps} < t < {1 - eps}, got a={a}, b={b}, t={t}"
        )
    width = min(max(((b - a) / (1 - a) - eps) / (1 - eps), 1e-6), 1 - 1e-6)
    return torch.tensor(
        [_logit((a - eps) / (1 - 2 * eps)), _logit(width), _logit((t - eps) / (1 - 2 * eps))]
    )


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

    Args:
        mode: one of :data:`MODES`.
        in_features: size of the conditioning vector (``"instance"`` only).
        num_heads: number of heads (``"per_head"`` only).
        hidden: hidden width of the instance MLP; ``None`` = a single Linear.
        step: the step's registered name (kept with the parameters).
        init: initial ``(a, b, t)``; defaults to ``(DEFAULT_A, DEFAULT_B, DEFAULT_T)``. The
            instance network starts with zero weights so every row starts at ``init``.
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
        get_step(step)
        init = (DEFAULT_A, DEFAULT_B, DEFAULT_T) if init is None else tuple(float(x) for x in init)
        if len(init) != 3:
            raise ValueError(f"init must be (a, b, t), got {init!r}")
        raw0 = raw_from_params(*init)
        self.mode, self.step, self.in_features, self.num_heads = mode, step, in_features, num_heads
        if mode == "global":
            self.raw = nn.Parameter(raw0.clone())
        elif mode == "per_head":
            if not isinstance(num_heads, int) or num_heads < 1:
                raise ValueError(f"mode='per_head' needs num_heads >= 1, got {num_heads!r}")
            self.raw = nn.Parameter(raw0.repeat(num_heads, 1))
        else:
            if not isinstance(in_features, int) or in_features < 1:
                raise ValueError(f"mode='instance' needs in_features >= 1, got {in_features!r}")
            last = nn.Linear(in_features if hidden is None else hidden, 3)
            nn.init.zeros_(last.weight)
            with torch.no_grad():
                last.bias.copy_(raw0)
            self.net = last if hidden is None else nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), last)

    def forward(self, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(a, b, t)`` shaped for :func:`simwarp.warp_attend`.

        Args:
            cond: ``(..., in_features)`` conditioning vectors, required in ``"instance"`` mode
                and ignored otherwise.
        """
        if self.mode == "instance":
            if cond is None:
                raise ValueError("SoftStep(mode='instance') needs a conditioning tensor `cond`")
            if cond.shape[-1] != self.in_features:
                raise ValueError(
                    f"cond must have last dim in_features={self.in_features}, got shape {tuple(cond.shape)}"
                )
            return params_from_raw(self.net(cond))
        a, b, t = params_from_raw(self.raw)
        if self.mode == "per_head":
            return a[:, None], b[:, None], t[:, None]
        return a, b, t

    def kwargs(self, cond: torch.Tensor | None = None) -> dict:
        """``dict(step=..., a=..., b=..., t=...)`` for ``warp_attend(q, k, v, **softstep.kwargs(q))``."""
        a, b, t = self(cond)
        return {"step": self.step, "a": a, "b": b, "t": t}

    def curve(self, u: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The current mask ``m(u)`` on a grid ``u (g,)``; ``(..., g)`` with the parameters' leading shape."""
        a, b, t = (p.detach().unsqueeze(-1) for p in self(cond))
        return get_step(self.step).mask(u.to(a.dtype), a, b, t)

    def extra_repr(self) -> str:
        extra = f"mode={self.mode!r}, step={self.step!r}"
        if self.mode == "global":
            a, b, t = (float(p) for p in self())
            extra += f", a={a:.3f}, b={b:.3f}, t={t:.3f}"
        elif self.mode == "per_head":
            extra += f", num_heads={self.num_heads}"
        return extra
