"""xformers attention biases as ``attn_mask`` of :func:`simwarp.softstep_attention`.

xformers is optional and never imported here: its bias objects
(``xformers.ops.fmha.attn_bias.LowerTriangularMask``, ``BlockDiagonalMask``,
``BlockDiagonalCausalMask``, ``LowerTriangularFromBottomRightMask``, …) are recognised by their
``materialize(shape, dtype, device)`` method, which returns the additive float bias (0 where a
query may attend, ``-inf`` elsewhere). The materialised bias goes through the same conversion as
any additive mask: biases carrying finite values (``LowerTriangularMaskWithTensorBias``,
ALiBi-style tensors) are refused with a :class:`ValueError`.

Alignment follows the bias object itself (``LowerTriangularMask`` is top-left aligned like
``is_causal=True``; the ``FromBottomRight`` variants are bottom-right aligned).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_attention_bias", "materialize_bias"]


def is_attention_bias(obj: Any) -> bool:
    """True for xformers-style attention-bias objects (not tensors, with ``materialize``)."""
    return not isinstance(obj, torch.Tensor) and callable(getattr(obj, "materialize", None))


def materialize_bias(bias: Any, query: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The additive float bias of ``bias`` for scores ``(..., L, S)`` of ``query (..., L, E)``.

    Tries the compact ``(L, S)`` shape first (enough for causal and block-diagonal biases) and
    falls back to the full ``(*query.shape[:-2], L, S)`` shape, which biases holding a tensor need.
    """
    n = query.shape[-2]
    try:
        dense = bias.materialize((n, kv_len), dtype=torch.float32, device=query.device)
    except Exception:  # noqa: BLE001 - any failure: retry with the full attention shape
        dense = bias.materialize((*query.shape[:-2], n, kv_len), dtype=torch.float32, device=query.device)
    if not isinstance(dense, torch.Tensor):
        raise TypeError(f"attn_mask {type(bias).__name__}.materialize() returned {type(dense).__name__}, not a tensor")
    return dense
