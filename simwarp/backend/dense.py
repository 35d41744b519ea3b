"""The materialising reference: the whole ``(..., n, m)`` matrix at once, plain autograd.

Any metric and any registered step; small inputs only (memory grows as ``n · m``). It is the
oracle every other implementation is tested against.
"""

from __future__ import annotations

import math

import torch

from simwarp.backend.common import WarpSpec, WarpStats, key_validity, warp_logits, work_dtype
from simwarp.similarity import pairwise_similarity


def dense_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor | None,
    spec: WarpSpec,
    row_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(logits, lo, hi, empty)``: logits ``(..., n, m)``, the rest ``(..., n)``.
    ``row_range``: a fixed ``(lo, hi)`` (constants) instead of the rows' own range."""
    dtype = work_dtype(q.dtype)
    n, m = q.shape[-2], k.shape[-2]
    s = pairwise_similarity(q.to(dtype), k.to(dtype), spec.metric, spec.scale)
    if mask is not None:  # the mask may carry leading dims that only v has
        s = s.expand(torch.broadcast_shapes(s.shape, mask.shape))
    valid = key_validity(
        None if mask is None else mask.expand(s.shape),
        n, 0, m, causal=spec.causal, exclude_self=spec.exclude_self, device=s.device,
    )
    # min/max with indices route the range gradient to one key per row (the first on ties),
    # exactly as the streaming implementations do.
    if valid is None:
        empty = torch.zeros(s.shape[:-1], dtype=torch.bool, device=s.device)
    else:
        valid = valid.expand(s.shape)
        empty = ~valid.any(-1)
    if row_range is not None:
        lo, hi = (x.detach().to(dtype).expand(s.shape[:-1]) for x in row_range)
    elif valid is None:
        lo, hi = s.min(-1).values, s.max(-1).values
    else:
        lo = s.masked_fill(~valid, math.inf).min(-1).values.masked_fill(empty, 0.0)
        hi = s.masked_fill(~valid, -math.inf).max(-1).values.masked_fill(empty, 0.0)
    if spec.detach_range:
        lo, hi = lo.detach(), hi.detach()
    logits = warp_logits(s, lo.unsqueeze(-1), hi.unsqueeze(-1), valid, a, b, t, spec)
    return logits, lo, hi, empty


def _safe_lse(logits: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    # logsumexp of an all -inf row is -inf with a NaN gradient: compute it on a finite stand-in.
    return torch.logsumexp(logits.masked_fill(empty.unsqueeze(-1), 0.0), -1)


def dense_weights(q, k, a, b, t, mask, spec: WarpSpec, row_range=None) -> tuple[torch.Tensor, WarpStats]:
    """Weights ``(..., n, m)`` (softmax of the logits over valid keys; all 0 on a row with no
    valid key) and the rows' :class:`WarpStats`."""
    logits, lo, hi, empty = dense_logits(q, k, a, b, t, mask, spec, row_range)
    # with a fixed range a row may keep nothing although it has valid keys
    nothing = (logits == -math.inf).all(-1) if row_range is not None else empty
    lse = _safe_lse(logits, nothing)
    w = torch.exp(logits - lse.unsqueeze(-1))
    kept = (logits > -math.inf).sum(-1).to(w.dtype)
    stats = WarpStats(lse=lse.masked_fill(nothing, -math.inf), kept=kept, lo=lo.detach(), hi=hi.detach(), empty=empty)
    return w, stats


def dense_warp_attend(
    q, k, v, a, b, t, mask, spec: WarpSpec, dropout_p: float = 0.0, row_range=None
) -> tuple[torch.Tensor, WarpStats]:
    """Output ``(..., n, e)`` and :class:`WarpStats` (dropout acts on the weights, not the stats)."""
    w, stats = dense_weights(q, k, a, b, t, mask, spec, row_range)
    if dropout_p > 0:
        w = torch.nn.functional.dropout(w, dropout_p)
    return (w @ v.to(w.dtype)).to(q.dtype), stats
