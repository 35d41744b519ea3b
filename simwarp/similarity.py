"""Similarity metrics: the one place where ``sim(q, k)`` is defined.

Every metric returns a *similarity* (larger = closer), multiplied by ``scale``:

============== =========================================== =================
metric          similarity                                  default scale
============== =========================================== =================
``dot``         ``q · k``                                   ``d ** -0.5``
``cosine``      ``q · k / (‖q‖ ‖k‖)``                       ``1``
``l2``          ``-‖q - k‖``  (gradient 0 at distance 0)    ``1``
``sqeuclidean`` ``-‖q - k‖²``                               ``1``
``l1``          ``-Σ|q - k|``  (dense path only)            ``1``
============== =========================================== =================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS: tuple[str, ...] = ("dot", "cosine", "l2", "sqeuclidean", "l1")
STREAMING_METRICS: tuple[str, ...] = ("dot", "cosine", "l2", "sqeuclidean")

_COSINE_EPS = 1e-12


def check_metric(metric: str) -> None:
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def default_scale(metric: str, dim: int) -> float:
    """The scale used when ``scale=None``: ``dim ** -0.5`` for ``dot``, else 1."""
    return dim**-0.5 if metric == "dot" else 1.0


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))`` whose gradient is 0 (not inf or NaN) where ``x <= 0``.

    The zero entries are replaced *before* the square root, so that masking them
    afterwards never multiplies an infinite derivative by zero.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def _squared_distance(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    qq = q.pow(2).sum(-1, keepdim=True)
    kk = k.pow(2).sum(-1).unsqueeze(-2)
    return (qq + kk - 2.0 * (q @ k.transpose(-1, -2))).clamp_min(0.0)


def pairwise_similarity(
    q: torch.Tensor, k: torch.Tensor, metric: str = "dot", scale: float | None = None
) -> torch.Tensor:
    """All-pairs similarity.

    Args:
        q: queries ``(..., n, d)``.
        k: keys ``(..., m, d)``; leading dims broadcast with ``q``'s.
        metric: one of :data:`METRICS`.
        scale: multiplier; ``None`` uses :func:`default_scale`.

    Returns:
        ``(..., n, m)`` similarities.
    """
    check_metric(metric)
    c = default_scale(metric, q.shape[-1]) if scale is None else scale
    if metric == "dot":
        s = q @ k.transpose(-1, -2)
    elif metric == "cosine":
        s = F.normalize(q, dim=-1, eps=_COSINE_EPS) @ F.normalize(k, dim=-1, eps=_COSINE_EPS).transpose(-1, -2)
    elif metric == "sqeuclidean":
        s = -_squared_distance(q, k)
    elif metric == "l2":
        s = -safe_sqrt(_squared_distance(q, k))
    else:  # l1: materialises (..., n, m, d); dense path only
        s = -(q.unsqueeze(-2) - k.unsqueeze(-3)).abs().sum(-1)
    return s * c if c != 1.0 else s


def paired_similarity(
    q: torch.Tensor, k: torch.Tensor, metric: str = "dot", scale: float | None = None
) -> torch.Tensor:
    """Row-wise similarity ``sim(q[..., i, :], k[..., i, :])``; same function as
    :func:`pairwise_similarity` on its diagonal. ``q``, ``k``: ``(..., n, d)`` → ``(..., n)``."""
    check_metric(metric)
    c = default_scale(metric, q.shape[-1]) if scale is None else scale
    if metric == "dot":
        s = (q * k).sum(-1)
    elif metric == "cosine":
        s = (F.normalize(q, dim=-1, eps=_COSINE_EPS) * F.normalize(k, dim=-1, eps=_COSINE_EPS)).sum(-1)
    elif metric == "sqeuclidean":
        s = -(q - k).pow(2).sum(-1)
    elif metric == "l2":
        s = -safe_sqrt((q - k).pow(2).sum(-1))
    else:
        s = -(q - k).abs().sum(-1)
    return s * c if c != 1.0 else s
