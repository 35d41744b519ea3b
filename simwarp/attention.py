"""SoftStep attention: a drop-in replacement for softmax attention.

* :func:`softstep_attention` — the signature and ``(B, H, L, E)`` layout of
  :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA), computed by the simwarp
  backend (:func:`simwarp.warp_attend`, metric ``"dot"``), never by a softmax of its own.
* :class:`SoftStepAttention` — holds the learned step parameters (:class:`simwarp.SoftStep`)
  and calls :func:`softstep_attention`.
* :class:`MultiheadSoftStepAttention` — the constructor, parameters and ``forward`` of
  :class:`torch.nn.MultiheadAttention`; :meth:`MultiheadSoftStepAttention.from_multihead`
  keeps a trained module's projection weights.
* :func:`swap_attention` — replaces every ``nn.MultiheadAttention`` in a module tree.

With ``step="none"`` every entry point reproduces its softmax peer to float tolerance. The one
deliberate difference: a query row with no valid key (fully masked row, padding-only
sequence) outputs zeros here, where SDPA outputs NaN on some kernels and versions, and an
additive mask of large finite negatives (``finfo.min``) gives uniform weights.
"""

from __future__ import annotations

import numbers
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.hooks import RemovableHandle

from simwarp._autograd import (
    as_flag,
    autocast_enabled,
    autocast_like_sdpa,
    is_finite_real,
    is_int,
    recomputing_in_backward,
    require,
)
from simwarp.backend import warp_attend, warp_weights
from simwarp.backend.common import as_real, broadcast_shape, broadcasts_to, check_dropout_p
from simwarp.integrations.xformers import is_attention_bias, materialize_bias
from simwarp.steps import SoftStep

__all__ = [
    "AttentionStats",
    "MASKED_BIAS_THRESHOLD",
    "MultiheadSoftStepAttention",
    "SoftStepAttention",
    "additive_mask_to_bool",
    "softstep_attention",
    "swap_attention",
]

#: An additive float-mask entry at or below this value (or ``-inf``) means "masked out". Any
#: such bias makes the softmax weight underflow to exactly 0 in every float dtype, and it covers
#: the usual conventions (``-inf``, ``torch.finfo(dtype).min``, ``-1e4``, ``-1e9``).
MASKED_BIAS_THRESHOLD: float = -1e4
# (formatted once: under torch.compile(dynamic=True) the float is symbolic and cannot be formatted)
_THRESHOLD_TEXT = f"{MASKED_BIAS_THRESHOLD:g}"


class AttentionStats(NamedTuple):
    """Per-query-row statistics of one attention call, each of shape ``(B, H, L)``.

    Attributes:
        lse: log-normaliser (``-inf`` on rows with no valid key); differentiable.
        kept: number of keys the step keeps (in its support; every valid key for ``step="none"``;
            NaN on a row with a NaN or inf score).
        valid: number of keys the row was allowed to attend to (mask, causal, padding).
        lo, hi: the row's similarity range over valid keys.
        empty: True where the row has no valid key (its output is exactly 0).
    """

    lse: torch.Tensor
    kept: torch.Tensor
    valid: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    empty: torch.Tensor

    @property
    def kept_fraction(self) -> torch.Tensor:
        """``kept / valid`` per row, ``(B, H, L)``; 0 on empty rows."""
        return torch.where(self.empty, torch.zeros_like(self.kept), self.kept / self.valid.clamp_min(1))

    def head_kept_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head, the sum of the kept fractions of the non-empty rows with a count (not NaN
        rows) and their number: ``(H,)`` each."""
        frac = self.kept_fraction.detach()
        ok = ~self.empty & ~frac.isnan()
        dims = tuple(d for d in range(frac.dim()) if d != frac.dim() - 2)
        return frac.masked_fill(~ok, 0.0).sum(dims), ok.to(frac.dtype).sum(dims)

    def head_kept_fraction(self) -> torch.Tensor:
        """Mean kept fraction per head over all non-empty rows of the batch (NaN rows left out):
        ``(H,)``; NaN for a head without any such row (nothing to count, not "nothing kept")."""
        total, rows = self.head_kept_sums()
        return total / rows


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------


def additive_mask_to_bool(mask: torch.Tensor, name: str = "attn_mask") -> torch.Tensor:
    """Convert an additive float mask to a bool mask (True = may attend).

    ``0`` → True; ``-inf`` or any value ``<= MASKED_BIAS_THRESHOLD`` → False. Finite non-zero
    biases above the threshold (ALiBi, relative-position biases) shift individual scores, which
    a key-validity mask cannot express: they raise :class:`ValueError`.
    """
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    if mask.requires_grad:
        raise ValueError(
            f"{name} requires grad: it carries a learned score bias (e.g. the relative-position tables that "
            "BEiT and Swin add through the attention mask), which SoftStep attention cannot apply; it accepts "
            "bool masks and fixed additive masks of 0 and -inf"
        )
    blocked = mask <= MASKED_BIAS_THRESHOLD
    allowed = blocked | (mask == 0)
    require(
        allowed,
        f"{name} holds entries other than 0 and -inf / <= {_THRESHOLD_TEXT} (finite score biases, NaN or "
        "+inf): SoftStep attention accepts bool masks or additive "
        f"masks whose entries are 0 (attend) or -inf / <= {_THRESHOLD_TEXT} (masked). Score biases "
        "(ALiBi, relative-position tables, Swin's -100 window masks) are not supported.",
        lambda: f" Found e.g. {mask[~allowed].flatten()[:3].tolist()}.",
    )
    return ~blocked


def _from_causal_bias(attn_mask: Any, is_causal: bool, n: int, s: int, device: torch.device) -> tuple[Any, bool]:
    """PyTorch's causal mask objects (``torch.nn.attention.bias.causal_upper_left`` /
    ``causal_lower_right``) as SDPA reads them: ``(attn_mask, is_causal)``, upper-left as
    ``is_causal=True``, lower-right (the last query sees every key: a KV cache, chunked
    prefill) as a bool mask. Anything else passes through."""
    # Only a loaded module can have made a CausalBias; importing it here would pull in
    # torch._dynamo (over a second) for every ``import simwarp``.
    bias_module = sys.modules.get("torch.nn.attention.bias")
    if bias_module is None or not isinstance(attn_mask, bias_module.CausalBias):
        return attn_mask, is_causal
    if is_causal:
        raise ValueError("attn_mask is a CausalBias and is_causal=True: give one of them (as SDPA)")
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (n, s):
        raise ValueError(
            f"attn_mask is a CausalBias for (L, S) = {(attn_mask.seq_len_q, attn_mask.seq_len_kv)}, the query and "
            f"key have (L, S) = {(n, s)}"
        )
    if attn_mask.variant == bias_module.CausalVariant.UPPER_LEFT:
        return None, True
    return torch.ones(n, s, dtype=torch.bool, device=device).tril(s - n), False


def _as_bool_mask(attn_mask: Any, q: torch.Tensor, s: int) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    if is_attention_bias(attn_mask):
        attn_mask = additive_mask_to_bool(materialize_bias(attn_mask, q, s), f"attn_mask ({type(attn_mask).__name__})")
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(
            f"attn_mask must be a bool tensor, an additive float tensor, an xformers attention bias or None, "
            f"got {type(attn_mask).__name__}"
        )
    mask = additive_mask_to_bool(attn_mask, "attn_mask")
    if mask.device != q.device:
        raise ValueError(f"attn_mask must be on the query's device {q.device}, got {mask.device}")
    return mask


# ---------------------------------------------------------------------------------------
# Grouped-query layout
# ---------------------------------------------------------------------------------------


def _any_heads(shape: torch.Size, rows_dims: int) -> tuple[int, ...]:
    """``shape`` with its heads dim (the one before the last ``rows_dims``) set to 1."""
    return tuple(1 if i == len(shape) - rows_dims - 1 else d for i, d in enumerate(shape))


def _split_heads(x: torch.Tensor, heads: int, groups: int, rows_dims: int, name: str) -> torch.Tensor:
    """View ``x`` (broadcastable to ``(..., heads * groups, *rows)``) as ``(..., heads, groups, *rows)``.

    ``rows_dims`` is the number of trailing dims after the head dim (2 for masks ``(L, S)``, 1
    for step parameters ``(L,)``). Size-1 head dims become ``(1, 1)``.
    """
    if x.dim() <= rows_dims:
        return x
    hd = x.shape[-rows_dims - 1]
    if hd != 1 and hd != heads * groups:  # (not `in`: dynamo mis-evaluates it on symbolic sizes)
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} has {hd} heads where the query has {heads * groups} "
            f"(key/value heads: {heads}); give one value per query head or 1"
        )
    if hd == heads * groups and groups > 1:
        return x.unflatten(-rows_dims - 1, (heads, groups))
    return x.unsqueeze(-rows_dims - 1)


def _valid_counts(mask: torch.Tensor | None, n: int, s: int, causal: bool, device: torch.device) -> torch.Tensor:
    """Number of attendable keys per row, broadcastable to the rows ``(..., n)``."""
    if causal:
        tri = torch.arange(s, device=device)[None, :] <= torch.arange(n, device=device)[:, None]
        allowed = tri if mask is None else mask & tri
        return allowed.sum(-1).to(torch.float32)
    if mask is None:
        return torch.full((n,), s, dtype=torch.float32, device=device)  # (float(s) would fix a dynamic s under export)
    return mask.expand(*mask.shape[:-1], s).sum(-1).to(torch.float32)  # a key dim of 1 broadcasts


def _check_sdpa_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> int:
    """Validate SDPA-style shapes; return the number of query heads per key/value head."""
    for name, x in (("query", q), ("key", k), ("value", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_nested:
            raise ValueError(
                f"{name} is a nested (jagged) tensor, which softstep_attention does not take: pad the batch and "
                "mask the padding with attn_mask (MultiheadSoftStepAttention takes nested batches itself)"
            )
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape (..., seq, features), got {tuple(x.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query (..., L, E) and key (..., S, E) must share E, got query {tuple(q.shape)} and key {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"key (..., S, E) and value (..., S, Ev) must share S, got key {tuple(k.shape)} and value {tuple(v.shape)}"
        )
    # grouped heads pair each key head with its value head (one value head broadcasts); without
    # GQA the heads are a batch dim like any other, and broadcast as SDPA's do
    if enable_gqa and k.dim() >= 3 and v.dim() >= 3 and v.shape[-3] not in (1, k.shape[-3]):
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must have the same number of heads (or value 1)")
    if q.dim() < 3 or k.dim() < 3:
        return 1
    hq, hk = q.shape[-3], k.shape[-3]
    if enable_gqa:
        if hq % hk != 0:
            raise ValueError(
                f"enable_gqa=True needs the query heads ({hq}) to be a multiple of the key/value heads ({hk}); "
                f"got query {tuple(q.shape)} and key {tuple(k.shape)}"
            )
        return hq // hk
    if hq != hk and 1 not in (hq, hk):
        raise ValueError(
            f"query has {hq} heads and key/value have {hk}: pass enable_gqa=True for grouped-query attention "
            f"(query {tuple(q.shape)}, key {tuple(k.shape)})"
        )
    return 1


# ---------------------------------------------------------------------------------------
# Functional core
# ---------------------------------------------------------------------------------------


def softstep_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | Any | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    step: str = "sigmoidal",
    a: float | torch.Tensor | None = None,
    b: float | torch.Tensor | None = None,
    t: float | torch.Tensor | None = None,
    return_stats: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """SoftStep attention with the signature of :func:`torch.nn.functional.scaled_dot_product_attention`.

    Scores are ``scale · q·k`` (``scale=None`` → ``E ** -0.5``, as SDPA); each row is range
    normalised over its valid keys, warped by the step and softmax-weighted by the backend
    (:func:`simwarp.warp_attend`). ``step="none"`` is exactly SDPA's softmax attention.

    Args:
        query: ``(B, ..., Hq, L, E)``.
        key: ``(B, ..., H, S, E)``.
        value: ``(B, ..., H, S, Ev)``.
        attn_mask: broadcastable to ``(B, Hq, L, S)``: bool (True = take part, as SDPA), an
            additive float mask whose entries are ``0`` or ``-inf`` / ``<= -1e4`` (masked), or an
            xformers attention bias (``LowerTriangularMask``, ``BlockDiagonalMask``, …; any
            object with ``materialize(shape, dtype, device)``), or PyTorch's
            ``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``. Finite
            non-zero biases (ALiBi) raise :class:`ValueError`.
        dropout_p: dropout probability on the attention weights (applied whenever > 0, as in
            SDPA; modules pass it only in training).
        is_causal: causal mask, top-left aligned (query ``i`` sees keys ``j <= i``), as SDPA.
            May be combined with ``attn_mask``.
        scale: score scale; ``None`` = ``1 / sqrt(E)``. Any finite real, as SDPA: ``0`` gives
            uniform weights over the valid keys, a negative scale negates the scores.
        enable_gqa: grouped-query attention: ``Hq`` a multiple of ``H``; query head ``h`` uses
            key/value head ``h // (Hq / H)``. Computed by broadcasting, keys are not copied.
        step: a registered step (``"sigmoidal"``, ``"log"``, ``"poly"``, ``"none"``, …).
        a, b, t: step parameters broadcastable to the rows ``(B, Hq, L)``: floats, per head
            ``(Hq, 1)``, per query ``(B, Hq, L)``; ``None`` = the step's defaults.
        return_stats: also return :class:`AttentionStats` (shapes ``(B, Hq, L)``).
        impl, chunk_size: backend implementation (see :func:`simwarp.warp_attend`).

    Returns:
        ``(B, ..., Hq, L, Ev)`` in the query's dtype (float16/bfloat16 compute in float32);
        with ``return_stats`` also :class:`AttentionStats`. Rows with no valid key are 0.
    """
    out, stats, _ = _attend(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        dict(step=step, a=a, b=b, t=t), return_stats, False, impl, chunk_size,
    )
    return (out, stats) if return_stats else out


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Any,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    step_kwargs: dict,
    want_stats: bool,
    want_weights: bool,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, AttentionStats | None, torch.Tensor | None]:
    """The shared core: ``(out, stats or None, weights or None)``; the weights are those that
    met the values (after dropout, as ``nn.MultiheadAttention`` and transformers' eager
    attention return them)."""
    is_causal, enable_gqa = as_flag("is_causal", is_causal), as_flag("enable_gqa", enable_gqa)
    groups = _check_sdpa_shapes(query, key, value, enable_gqa)
    query, key, value = autocast_like_sdpa(query, key, value)
    dropout_p = check_dropout_p(dropout_p)
    n, s = query.shape[-2], key.shape[-2]
    attn_mask, is_causal = _from_causal_bias(attn_mask, is_causal, n, s, query.device)
    mask = _as_bool_mask(attn_mask, query, s)
    q, k, v = query, key, value
    if scale is not None:
        scale = as_real("scale", scale, "a finite float or None")
        if not is_finite_real(scale):
            raise ValueError(f"scale must be a finite float or None, got {scale!r}")
        if scale <= 0:  # as SDPA: 0 gives uniform weights, a negative scale negates the scores
            q, scale = query * scale, 1.0
    a, b, t = (step_kwargs.get(name) for name in ("a", "b", "t"))
    # checked with the caller's names (the backend's checks say q, k, v, mask and (n, m)), and
    # under GQA in the caller's layout, before the grouped one (..., H, G, L) they never see
    lead = 2 if groups == 1 else 3  # (GQA: the head counts differ, _check_sdpa_shapes compared them)
    try:
        batch = broadcast_shape(query.shape[:-lead], key.shape[:-lead], value.shape[:-lead])
    except RuntimeError:
        raise ValueError(
            f"the leading dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} do not broadcast"
        ) from None
    if groups > 1:
        rows = (*batch, query.shape[-3], n)
        # (all but the heads dim here; _split_heads names a heads dim that fits neither 1 nor Hq)
        for name, p in zip("abt", (a, b, t)):
            if isinstance(p, torch.Tensor) and not broadcasts_to(_any_heads(p.shape, 1), rows):
                raise ValueError(
                    f"{name} of shape {tuple(p.shape)} does not broadcast to the rows (..., Hq, L) = "
                    f"{rows}; per query head pass shape (Hq, 1)"
                )
        if mask is not None and not broadcasts_to(_any_heads(mask.shape, 2), (*rows, s)):
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (..., Hq, L, S) = {(*rows, s)}")
        hk = key.shape[-3]
        q = rearrange(q, "... (h g) l e -> ... h g l e", h=hk)
        k, v = key.unsqueeze(-3), value.unsqueeze(-3)
        if mask is not None:
            mask = _split_heads(mask.reshape((1,) * max(0, query.dim() - mask.dim()) + mask.shape), hk, groups, 2, "attn_mask")
        a, b, t = (
            _split_heads(p.reshape((1,) * max(0, query.dim() - 1 - p.dim()) + p.shape), hk, groups, 1, name)
            if isinstance(p, torch.Tensor) and p.dim() >= 2
            else p
            for name, p in zip("abt", (a, b, t))
        )
    elif mask is not None and not broadcasts_to(mask.shape, (*batch, n, s)):
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (..., L, S) = {(*batch, n, s)}")
    common = dict(
        metric="dot", scale=scale, step=step_kwargs.get("step", "sigmoidal"), a=a, b=b, t=t, mask=mask,
        causal=bool(is_causal),
    )
    weights = None
    if want_weights:
        # The caller asked for the weights (need_weights / output_attentions): the backend
        # materialises them (warp_weights, dense (..., L, S)); dropout (training only) is then
        # applied to that matrix before it meets the values. Memory grows as L · S here.
        w, stats = warp_weights(q, k, return_stats=True, **common)
        if dropout_p > 0.0:
            w = F.dropout(w, p=float(dropout_p), training=True)
        weights = w.to(query.dtype)  # as the attention they replace returns them
        out = (w @ v.to(w.dtype)).to(query.dtype)
    else:
        # Statistics only on request: the fused kernels then skip the per-score kept count.
        res = warp_attend(
            q, k, v, impl=impl, chunk_size=chunk_size, return_stats=want_stats, dropout_p=float(dropout_p), **common
        )
        out, stats = res if want_stats else (res, None)
    if groups > 1:
        out = rearrange(out, "... h g l e -> ... (h g) l e")
        if weights is not None:
            weights = rearrange(weights, "... h g l s -> ... (h g) l s")
    if not want_stats:
        return out, None, weights
    valid = _valid_counts(mask, n, s, bool(is_causal), query.device)
    valid = valid.to(stats.kept.dtype).expand(stats.kept.shape)
    fields = [stats.lse, stats.kept, valid, stats.lo, stats.hi, stats.empty]
    if groups > 1:
        fields = [rearrange(f, "... h g l -> ... (h g) l") for f in fields]
    return out, AttentionStats(*fields), weights


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class SoftStepAttention(nn.Module):
    """Learned step parameters + :func:`softstep_attention` (SDPA layout ``(B, H, L, E)``).

    Args:
        num_heads: number of query heads ``H``.
        head_dim: query/key head size ``E`` (required for ``mode="instance"``, whose small
            network maps each query vector to its own ``(a, b, t)``).
        mode: ``"per_head"`` (``H × 3`` learned values), ``"instance"`` or ``"global"``.
        step: registered step name; ``"none"`` = plain softmax attention.
        init: initial ``(a, b, t)``.
        hidden: hidden width of the instance network (``None`` = one Linear).

    Attributes:
        track_stats: when True, every forward stores :class:`AttentionStats` in ``last_stats``
            (see :class:`simwarp.monitoring.AttentionMonitor`).
        last_stats: the statistics of the last forward with ``track_stats`` (detached).

    :meth:`register_stats_hook` adds a callback that receives those statistics after every
    call with ``track_stats`` (the monitor's way to see each call, whichever path calls
    :meth:`attend`). A forward recomputed in backward by activation checkpointing records
    nothing (the call was recorded when it first ran).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int | None = None,
        mode: str = "per_head",
        step: str = "sigmoidal",
        init: Sequence[float] | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if not is_int(num_heads, 1):
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if (head_dim is not None or mode == "instance") and not is_int(head_dim, 1):
            allowed = "a positive int (mode='instance' needs the query size E)" if mode == "instance" else "a positive int or None"
            raise ValueError(f"head_dim must be {allowed}, got {head_dim!r}")
        num_heads, head_dim = int(num_heads), int(head_dim) if isinstance(head_dim, numbers.Integral) else head_dim
        self.num_heads, self.head_dim, self.mode = num_heads, head_dim, mode
        self.step = SoftStep(
            mode=mode, in_features=head_dim if mode == "instance" else None,
            num_heads=num_heads if mode == "per_head" else None, hidden=hidden, step=step, init=init,
        )
        self.track_stats = False
        self.last_stats: AttentionStats | None = None
        self._stats_hooks: OrderedDict[int, Any] = OrderedDict()  # (RemovableHandle keeps a weak reference)

    def __getstate__(self) -> dict:
        # hooks belong to whoever registered them (a monitor's block): not to copies or pickles
        return {**self.__dict__, "_stats_hooks": OrderedDict()}

    def register_stats_hook(self, hook) -> RemovableHandle:
        """``hook(module, stats)`` runs after every call that records :class:`AttentionStats`
        (``track_stats``); returns a handle whose ``remove()`` unregisters it."""
        hooks = self.__dict__.setdefault("_stats_hooks", OrderedDict())  # (modules pickled before it existed)
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | Any | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_stats: bool = False,
        need_weights: bool = False,
        **backend: Any,
    ) -> torch.Tensor | tuple[torch.Tensor | AttentionStats, ...]:
        """Same arguments as :func:`softstep_attention` (``query (B, H, L, E)``), without the
        step parameters, which come from this module.

        Returns ``out``; ``(out, stats)`` with ``return_stats``; ``(out, weights)`` with
        ``need_weights`` (the ``(B, H, L, S)`` weights, as :meth:`attend`); ``(out, stats,
        weights)`` with both. The wrappers (:class:`MultiheadSoftStepAttention`, the
        transformers integration) call the module this way, so its hooks see every call."""
        out, stats, weights = self.attend(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            return_stats=return_stats, need_weights=need_weights, **backend,
        )
        extra = (*((stats,) if return_stats else ()), *((weights,) if need_weights else ()))
        return (out, *extra) if extra else out

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | Any | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        *,
        return_stats: bool = False,
        need_weights: bool = False,
        **backend: Any,
    ) -> tuple[torch.Tensor, AttentionStats | None, torch.Tensor | None]:
        """Like :meth:`forward`, returning ``(out, stats or None, weights or None)``; with
        ``need_weights`` the weights ``(B, H, L, S)`` are materialised (after dropout: those
        that met the values, as ``nn.MultiheadAttention`` returns them)."""
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
        return_stats, need_weights = as_flag("return_stats", return_stats), as_flag("need_weights", need_weights)
        per_head = self.mode == "per_head"  # (its step parameters need the heads dim)
        if (query.dim() >= 3 or per_head) and (query.dim() < 3 or query.shape[-3] != self.num_heads):
            heads = f"{query.shape[-3]} heads" if query.dim() >= 3 else "no heads dim"
            raise ValueError(
                f"query has {heads} but this SoftStepAttention has num_heads={self.num_heads} "
                f"(query {tuple(query.shape)}, expected (B, {self.num_heads}, L, E))"
            )
        if self.mode == "instance" and query.shape[-1] != self.head_dim:  # (the step network reads the query)
            raise ValueError(
                f"query has {query.shape[-1]} features per head but this SoftStepAttention(mode='instance') has "
                f"head_dim={self.head_dim} (query {tuple(query.shape)}, expected (B, {self.num_heads}, L, {self.head_dim}))"
            )
        kw = self.step.kwargs(query if self.mode == "instance" else None)
        want = return_stats or self.track_stats
        out, stats, weights = _attend(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, kw, want, need_weights, **backend
        )
        if self.track_stats and stats is not None and not recomputing_in_backward():
            self.last_stats = AttentionStats(*(f.detach() for f in stats))
            for hook in list(getattr(self, "_stats_hooks", {}).values()):  # (absent in modules pickled before)
                hook(self, self.last_stats)
        return out, (stats if return_stats else None), weights

    def reset_parameters(self) -> None:
        """The step back to ``init`` (:meth:`simwarp.SoftStep.reset_parameters`)."""
        self.step.reset_parameters()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, mode={self.mode!r}, step={self.step.step!r}"


def _disable_fused_fast_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. ``nn.TransformerEncoderLayer`` skips its fused inference
    fast path (which reads ``in_proj_weight`` directly and computes softmax attention without
    calling ``self_attn.forward``) whenever a submodule has hooks; this keeps SoftStep in use."""
    return None


class MissingCausalMaskError(ValueError, RuntimeError):
    """``is_causal=True`` without ``attn_mask`` in :class:`MultiheadSoftStepAttention`: a
    ``ValueError`` like every bad argument here, and a ``RuntimeError`` as
    ``nn.MultiheadAttention`` raises it, so code written for either module catches it."""


class MultiheadSoftStepAttention(nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` with SoftStep attention.

    Same constructor, parameters (``in_proj_weight``/``q_proj_weight``…, ``out_proj``,
    ``bias_k``/``bias_v``) and ``forward`` as ``nn.MultiheadAttention``; the extra keyword
    arguments configure the learned step (a :class:`SoftStepAttention` submodule named
    ``softstep``). Masks keep MultiheadAttention's convention: in bool ``attn_mask`` and
    ``key_padding_mask``, True means *not allowed*; float masks are additive (``0`` or
    ``-inf``/``<= -1e4``).

    Shapes: ``query (L, N, E)`` (``(N, L, E)`` with ``batch_first``, or unbatched ``(L, E)``),
    ``key (S, N, kdim)``, ``value (S, N, vdim)``, ``key_padding_mask (N, S)``,
    ``attn_mask (L, S)`` or ``(N·num_heads, L, S)``. Returns ``(attn_output, attn_weights)``;
    with ``need_weights`` the weights are ``(N, L, S)`` (averaged over heads) or
    ``(N, num_heads, L, S)`` with ``average_attn_weights=False`` (without the ``N`` dim for
    unbatched input), otherwise ``None``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        mode: str = "per_head",
        step: str = "sigmoidal",
        init: Sequence[float] | None = None,
        hidden: int | None = None,
    ) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not is_int(value, 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}")
        dropout = check_dropout_p(dropout, name="dropout")  # (nn.MultiheadAttention checks it only when applied)
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
            device=device, dtype=dtype,
        )
        options = {"mode": mode, "step": step, "init": None if init is None else tuple(init), "hidden": hidden}
        self.set_step(options, device=device, dtype=dtype)  # factory kwargs apply to every parameter
        self.register_forward_pre_hook(_disable_fused_fast_path)

    def _reset_parameters(self) -> None:
        super()._reset_parameters()
        if "softstep" in self._modules:  # (MultiheadAttention's constructor calls this before it exists)
            self.softstep.reset_parameters()

    def set_step(self, options: dict, device: Any = None, dtype: Any = None) -> None:
        """A fresh ``softstep`` submodule with ``options`` (``mode``, ``step``, ``init``,
        ``hidden``), recorded in ``softstep_options`` (``swap_attention`` compares a later call
        with them)."""
        softstep = SoftStepAttention(self.num_heads, self.head_dim, **options)
        if device is not None or dtype is not None:
            softstep.to(device=device, dtype=dtype)
        self.softstep, self.softstep_options = softstep, dict(options)  # recorded once it was built

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention, **softstep_kwargs: Any) -> MultiheadSoftStepAttention:
        """A SoftStep version of ``mha`` that shares its parameters and its ``out_proj`` module
        (the same objects: tied weights stay tied, frozen ones frozen, and an optimizer built
        before keeps training them); the step parameters get ``mha``'s device and dtype.

        ``softstep_kwargs``: ``mode``, ``step``, ``init``, ``hidden`` (see the class).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        _check_softstep_options(softstep_kwargs)
        _check_takeable(mha)
        ref = mha.out_proj.weight
        # Built on the meta device: its own projections are replaced by mha's below, so they
        # allocate nothing and draw nothing from the random generator (a softmax run and a
        # SoftStep run from one seed see the same random numbers afterwards).
        new = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, device="meta", dtype=ref.dtype, **softstep_kwargs,
        )
        # The Parameter objects themselves (load_state_dict(assign=True) would also reset their
        # requires_grad to the fresh module's), and out_proj as a module: shared stays shared.
        layout = {name: p is None for name, p in new._parameters.items()}
        if layout != {name: p is None for name, p in mha._parameters.items()}:
            raise ValueError(f"could not take the parameters of {type(mha).__name__}: {sorted(mha._parameters)}")
        for name, param in mha._parameters.items():
            if param is not None:
                setattr(new, name, param)
        new.out_proj = mha.out_proj
        new.set_step(new.softstep_options, device=ref.device, dtype=ref.dtype)  # the step's own parameters, real
        new.train(mha.training)
        return new

    def _forward_nested(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """Nested (ragged) batches, as ``nn.TransformerEncoder`` passes them in inference when it
        was built with ``enable_nested_tensor`` from a layer swapped beforehand: padded, attended
        with the padding masked, and returned nested like the input."""
        if not (query.is_nested and key.is_nested and value.is_nested and self.batch_first):
            raise ValueError("nested tensors are supported for batch_first modules with nested query, key and value")
        q_lengths = [x.shape[0] for x in query.unbind()]
        k_lengths = torch.tensor([x.shape[0] for x in key.unbind()], device=key.device)
        query, key, value = (x.to_padded_tensor(0.0) for x in (query, key, value))
        padding = torch.arange(key.shape[1], device=key.device)[None, :] >= k_lengths[:, None]
        out, _ = self.forward(
            query, key, value, key_padding_mask=padding, need_weights=False, attn_mask=attn_mask, is_causal=is_causal
        )
        return torch.nested.as_nested_tensor([row[:n] for row, n in zip(out, q_lengths, strict=True)])  # keeps autograd

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(e)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        for name, x in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if x is not None and not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
        need_weights = as_flag("need_weights", need_weights)
        average_attn_weights = as_flag("average_attn_weights", average_attn_weights)
        is_causal = False if is_causal is None else as_flag("is_causal", is_causal)  # (torch's layers may pass None)
        weight = self.in_proj_weight if self.in_proj_weight is not None else self.q_proj_weight
        if not autocast_enabled(query.device.type):
            for name, x in (("query", query), ("key", key), ("value", value)):
                if x.dtype != weight.dtype:
                    raise TypeError(f"{name} has dtype {x.dtype} but this module's parameters are {weight.dtype}")
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, attn_mask, is_causal), None
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key, value must all be 3-D (batched) or 2-D (unbatched), got query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        # now (L, N, E), (S, N, kdim), (S, N, vdim)
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim={self.embed_dim}, got query {tuple(query.shape)}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"key/value last dims must be kdim={self.kdim}, vdim={self.vdim}; got key {tuple(key.shape)}, "
                f"value {tuple(value.shape)}"
            )
        if key.shape[:2] != value.shape[:2] or key.shape[1] != bsz:
            raise ValueError(
                f"key {tuple(key.shape)} and value {tuple(value.shape)} must share (S, N) with N={bsz} from the query"
            )
        if is_causal and attn_mask is None:
            raise MissingCausalMaskError(
                "is_causal=True is a hint that attn_mask is the causal mask: pass attn_mask too (as nn.MultiheadAttention)"
            )

        q, k, v = self._project(query, key, value)
        h, hd = self.num_heads, self.head_dim
        allowed = None  # bool (N, H or 1, L, S'), True = may attend
        src_len = key.shape[0]
        if attn_mask is not None:
            am = ~attn_mask if attn_mask.dtype == torch.bool else additive_mask_to_bool(attn_mask, "attn_mask")
            if am.dim() == 2:
                if am.shape != (tgt_len, src_len):
                    raise ValueError(f"2-D attn_mask must be (L, S) = {(tgt_len, src_len)}, got {tuple(am.shape)}")
                am = am[None, None]
            elif am.dim() == 3:
                if am.shape != (bsz * h, tgt_len, src_len):
                    raise ValueError(
                        f"3-D attn_mask must be (N*num_heads, L, S) = {(bsz * h, tgt_len, src_len)}, got {tuple(am.shape)}"
                    )
                am = am.view(bsz, h, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(am.shape)}")
            allowed = am
        if key_padding_mask is not None:
            kp = ~key_padding_mask if key_padding_mask.dtype == torch.bool else additive_mask_to_bool(
                key_padding_mask, "key_padding_mask"
            )
            if kp.shape != (bsz, src_len):
                raise ValueError(f"key_padding_mask must be (N, S) = {(bsz, src_len)}, got {tuple(kp.shape)}")
            kp = kp[:, None, None, :]
            allowed = kp if allowed is None else allowed & kp
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, embed_dim)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, embed_dim)])
            if allowed is not None:
                allowed = F.pad(allowed, (0, 1), value=True)
        q = rearrange(q, "l n (h d) -> n h l d", h=h)
        k = rearrange(k, "s n (h d) -> n h s d", h=h)
        v = rearrange(v, "s n (h d) -> n h s d", h=h)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((bsz, h, 1, hd))], dim=2)
            v = torch.cat([v, v.new_zeros((bsz, h, 1, hd))], dim=2)
            if allowed is not None:
                allowed = F.pad(allowed, (0, 1), value=True)
        causal = bool(is_causal) and key_padding_mask is None and self.bias_k is None and not self.add_zero_attn
        if causal:
            allowed = None  # the hint: attn_mask is the causal mask
        dropout_p = self.dropout if self.training else 0.0
        result = self.softstep(q, k, v, attn_mask=allowed, dropout_p=dropout_p, is_causal=causal, need_weights=need_weights)
        out, weights = result if need_weights else (result, None)
        out = self.out_proj(rearrange(out, "n h l d -> l n (h d)"))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


def swap_attention(model: nn.Module, *, overwrite: bool = False, **softstep_kwargs: Any) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by a :class:`MultiheadSoftStepAttention`
    that keeps its parameters (the same objects, :meth:`MultiheadSoftStepAttention.from_multihead`;
    also inside ``nn.TransformerEncoderLayer`` / ``DecoderLayer``).

    ``softstep_kwargs`` (``mode``, ``step``, ``init``, ``hidden``) configure every new module.
    ``nn.TransformerEncoder`` modules get ``use_nested_tensor = False`` (their nested-tensor
    inference path would bypass the attention modules; an encoder built later from a swapped
    layer keeps it, and the SoftStep modules accept its nested batches). A module shared by
    several parents, or held twice by one, is replaced by one shared SoftStep module. Frozen
    parameters stay frozen. Subclasses of ``nn.MultiheadAttention`` that override ``forward``
    are left alone, with a warning (their forward would be lost), and so is a model without any
    (a warning too: nothing to swap). Modules swapped earlier keep their step unless
    ``overwrite=True`` (fresh step parameters with the new options); asking for other options
    without it raises. Hooks registered on a replaced module (forward, backward, state-dict) run
    on its replacement, and their handles still remove them. Returns the model (a new module
    when ``model`` itself is an ``nn.MultiheadAttention``); the swap is in place otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    overwrite = as_flag("overwrite", overwrite)
    _check_softstep_options(softstep_kwargs)
    if _swappable(model):
        new = MultiheadSoftStepAttention.from_multihead(model, **softstep_kwargs)
        _take_hooks(model, new)
        return new
    # Everything that can fail, before the model changes: the option values, the modules to take
    # over, and (without overwrite) options that differ from those of modules swapped before.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (options that another mode ignores: modules swapped before may have it)
        SoftStepAttention(1, 1, **softstep_kwargs)
    modules = list(model.modules())
    swaps = []
    for module in modules:
        for name, child in list(module._modules.items()):  # (named_children() skips a second name for a module)
            if child is not None and _swappable(child):
                _check_takeable(child, name)
                swaps.append((module, name, child))
    swapped_before = [m for m in modules if isinstance(m, MultiheadSoftStepAttention)]
    if not any(isinstance(m, nn.MultiheadAttention) for m in modules):  # (subclasses left alone warned above)
        warnings.warn(
            f"swap_attention found no nn.MultiheadAttention in {type(model).__name__}: nothing was swapped "
            "(for transformers models, see simwarp.integrations.transformers.attach_softstep)",
            stacklevel=2,
        )
    restepped = swapped_before if softstep_kwargs else []
    for module in restepped:  # without overwrite: a check
        _restep(module, softstep_kwargs, overwrite)
    replaced: dict[int, MultiheadSoftStepAttention] = {}
    for module, name, child in swaps:
        if id(child) not in replaced:
            replaced[id(child)] = MultiheadSoftStepAttention.from_multihead(child, **softstep_kwargs)
            _take_hooks(child, replaced[id(child)])
        setattr(module, name, replaced[id(child)])
    for module in modules:
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return model


def _take_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new``, which replaces ``old`` in the model, runs the hooks registered on ``old``
    (forward, backward, state-dict): its hook dicts become ``old``'s, with ``new``'s own entries
    added after them, so the handles the user holds still remove them (``old``, which the model
    no longer holds, shares them from then on)."""
    for name, hooks in vars(old).items():
        if "hook" in name and isinstance(hooks, dict):
            own = new.__dict__.get(name)
            if isinstance(own, dict):
                hooks.update(own)
            new.__dict__[name] = hooks
            for hook in hooks.values():  # load_state_dict pre-hooks hold their module (weakly): rebind it
                bound = getattr(hook, "module", None)
                if getattr(hook, "with_module", False) and callable(bound) and bound() is old:
                    hook.module = weakref.ref(new)
    if old._is_full_backward_hook is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


def _check_takeable(mha: nn.MultiheadAttention, name: str = "mha") -> None:
    """``from_multihead`` takes the parameter objects themselves: a parametrization (the
    parameter computed from others) cannot be taken over."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(mha):
        raise ValueError(
            f"{name} ({type(mha).__name__}) has parametrized parameters {sorted(mha.parametrizations)}, which a "
            "MultiheadSoftStepAttention cannot take over: swap first, then register the parametrization "
            "(nothing was swapped)"
        )


_SOFTSTEP_OPTIONS = ("mode", "step", "init", "hidden")


def _check_softstep_options(options: dict) -> None:
    unknown = sorted(set(options) - set(_SOFTSTEP_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected step options {unknown}: swap_attention and from_multihead take {list(_SOFTSTEP_OPTIONS)} "
            "(the new modules get the device and dtype of the modules they replace)"
        )


def _swappable(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` (not yet swapped) whose forward is the stock one."""
    if not isinstance(module, nn.MultiheadAttention) or isinstance(module, MultiheadSoftStepAttention):
        return False
    if type(module).forward is not nn.MultiheadAttention.forward:
        warnings.warn(
            f"swap_attention leaves {type(module).__name__} alone: it overrides nn.MultiheadAttention.forward, "
            "which a MultiheadSoftStepAttention would drop", UserWarning, stacklevel=3,
        )
        return False
    return True


def _restep(module: MultiheadSoftStepAttention, softstep_kwargs: dict, overwrite: bool) -> None:
    """Give an already swapped module the requested step options (``overwrite``) or check it has them."""
    current = getattr(module, "softstep_options", None)  # None: pickled before it was recorded
    wanted = {**(current or {}), **softstep_kwargs}
    if wanted.get("init") is not None:
        wanted["init"] = tuple(wanted["init"])
    if wanted == current:
        return
    if current is None and not overwrite:
        warnings.warn(
            "swap_attention: a MultiheadSoftStepAttention saved by an older simwarp does not record its step "
            f"options, so {softstep_kwargs} cannot be checked against them; it keeps its step (pass "
            "overwrite=True to replace it)", UserWarning, stacklevel=3,
        )
        return
    if not overwrite:
        raise ValueError(
            f"swap_attention: the model already has SoftStep attention with {current}, not "
            f"{wanted}; pass overwrite=True for fresh step parameters with the new options"
        )
    ref = module.out_proj.weight
    module.set_step(wanted, device=ref.device, dtype=ref.dtype)
