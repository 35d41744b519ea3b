"""Fused Triton kernels for the simwarp backend (``impl="triton"``).

Importing this package imports :mod:`triton` (the ``gpu`` extra); :mod:`simwarp` itself never
does, it imports this package lazily when the fused path is chosen.

Supported: metrics ``dot``, ``cosine``, ``sqeuclidean``, ``l2``; steps ``sigmoidal``, ``log``,
``poly``, ``none``; any bool mask (causal, ``exclude_self``, key padding and general masks
are applied inside the kernels); float16 / bfloat16 / float32 inputs with float32
accumulation (float64 only in the CPU interpreter); head and value dims up to 256; any
sequence lengths; dropout on the weights (Philox draws inside the kernels, replayed in the
backward). CUDA tensors run compiled kernels; CPU tensors run the same kernels in
Triton's interpreter when ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import re

import torch
import triton  # (ImportError here = the fused backend is unavailable)

from simwarp.backend.common import WarpSpec, WarpStats, check_dropout_p
from simwarp.backend.triton.launch import (
    KERNEL_STEPS,
    KernelConfig,
    dropout_keep_mask,
    fused_warp_attend,
    interpreting,
    unsupported_reason,
)

__all__ = [
    "KERNEL_STEPS",
    "KernelConfig",
    "dropout_keep_mask",
    "interpreting",
    "supports",
    "triton_warp_attend",
    "unsupported_reason",
    "triton_version",
    "version_problem",
    "MIN_TRITON",
]

#: The oldest Triton the kernels support (torch 2.10 brings it; each torch release pins its
#: Triton): the kernels were run on a GPU with 3.6 and compile for sm_90 with 3.6 and newer.
#: Triton 3.0 and 3.1 abort the process compiling them for Hopper GPUs, and the CPU interpreter
#: has no float64 ``tl.dot`` before 3.5.
MIN_TRITON = (3, 6)


def triton_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of the installed Triton (or of ``version``, e.g. ``"3.10.0+git1a2b"``)."""
    return tuple(int(part) for part in re.findall(r"\d+", triton.__version__ if version is None else version)[:2])


def version_problem(version: str | None = None) -> str | None:
    """Why the installed Triton (or ``version``) cannot run the fused kernels, ``None`` if it can."""
    version = triton.__version__ if version is None else version
    if triton_version(version) >= MIN_TRITON:
        return None
    need = ".".join(map(str, MIN_TRITON))
    return (
        f"triton {version} is older than {need}, the oldest the fused kernels support (each torch release "
        f"pins its triton: upgrade torch to one that brings triton>={need})"
    )


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: WarpSpec) -> bool:
    """True if :func:`triton_warp_attend` can run this call."""
    return unsupported_reason(q, k, v, spec) is None


def triton_warp_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor | None,
    spec: WarpSpec,
    *,
    config: KernelConfig | None = None,
    return_skipped: bool = False,
    count_kept: bool = True,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
):
    """Fused SoftStep attention (the backend contract of :func:`simwarp.warp_attend`).

    Args:
        q: ``(..., n, d)``; k: ``(..., m, d)``; v: ``(..., m, e)``; leading dims broadcast.
        a, b, t: step parameters of the compute dtype, 0-dim or broadcastable to ``(..., n, 1)``.
        mask: bool, broadcastable to ``(..., n, m)``, True = may attend; or ``None``.
        spec: the call's :class:`~simwarp.backend.common.WarpSpec`.
        config: launch knobs (:class:`KernelConfig`); ``None`` = heuristics.
        return_skipped: also return the fraction of visited key tiles that block skipping
            left out (a 0-dim float tensor on the inputs' device; no synchronisation).
        count_kept: fill ``WarpStats.kept``; ``False`` skips the per-score count (a few
            percent of the forward) and leaves it NaN.
        dropout_p: inverted dropout on the weights, drawn inside the kernels (16-bit draws:
            ``dropout_p`` is rounded to a multiple of 2^-16, survivors are scaled by
            ``1 / P(keep)`` of that rounded rate). The statistics are those without dropout.
        dropout_seed: the masks' key, a 1-element int64 tensor on the inputs' device (default:
            drawn from torch's generator); :func:`dropout_keep_mask` returns the mask it gives.

    Returns:
        ``(out (..., n, e), WarpStats)`` and, with ``return_skipped``, the skipped fraction.

    Raises:
        ValueError: if the call is not supported by the kernels (see :func:`unsupported_reason`).
    """
    reason = unsupported_reason(q, k, v, spec)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run this call: {reason}; use impl='chunked' or 'auto'")
    _check_dropout(dropout_p, dropout_seed, q.device)
    out, lse, kept, lo, hi, empty, skip = fused_warp_attend(
        q, k, v, a, b, t, mask, spec, config, count_kept, dropout_p, dropout_seed
    )
    stats = WarpStats(lse=lse, kept=kept, lo=lo, hi=hi, empty=empty)
    if not return_skipped:
        return out, stats
    counts = skip.reshape(-1, 2).sum(0, dtype=torch.float64)
    fraction = counts[0] / counts[1].clamp_min(1.0)
    return out, stats, fraction


def _check_dropout(dropout_p, seed, device: torch.device) -> None:
    check_dropout_p(dropout_p, allow_one=False)  # (warp_attend handles 1)
    if seed is None:
        return
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        got = f"{seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, torch.Tensor) else type(seed).__name__
        raise TypeError(f"dropout_seed must be a 1-element int64 tensor or None, got {got}")
    if seed.device != device:
        raise ValueError(f"dropout_seed must be on the inputs' device {device}, got {seed.device}")
