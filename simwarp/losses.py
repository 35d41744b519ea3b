"""Metric-learning losses with SoftStep, compatible with pytorch-metric-learning (PML).

Every loss here subclasses PML's :class:`~pytorch_metric_learning.losses.BaseMetricLossFunction`,
so it takes PML distances, reducers, embedding regularisers, ``indices_tuple`` from PML
miners and ``ref_emb`` / ``ref_labels``, and works inside ``DistributedLossWrapper`` and PML
trainers. All similarities, softmaxes and normalisers come from the simwarp backend
(:func:`simwarp.warp_attend`, :func:`simwarp.warp_weights`, :mod:`simwarp.similarity`):
streaming (``O(rows · chunk)`` memory) for large batches, dense for small ones.

===================================== =================================================================
loss                                   per-element loss
===================================== =================================================================
:class:`SoftStepNeighborRegressionLoss` ``mean_e (Σ_j w_ij y_j - y_i)²``  (leave-one-out, continuous labels)
:class:`SoftStepNCALoss`                ``-log Σ_{j: y_j = y_i} w_ij``     (class labels)
:class:`SoftStepContrastiveLoss`        ``-log e^{s_ip/τ} / (e^{s_ip/τ} + Σ_n m_in e^{s_in/τ})`` per positive pair
===================================== =================================================================

``w_ij`` are the SoftStep weights of :func:`simwarp.warp_attend` over the candidate
neighbours ``j`` of anchor ``i`` (all reference embeddings except ``i`` itself when
``ref_emb`` is not given); ``m_in`` is the step's mask. The row range that SoftStep
normalises over is always taken over *all* candidate neighbours of the anchor, positives and
negatives alike. With ``step="none"`` the losses equal PML's ``NCALoss`` and ``NTXentLoss``.

Each loss owns a :class:`simwarp.SoftStep` (``mode="global"`` or ``"instance"``): pass the
loss's parameters to the optimiser together with the model's
(``torch.optim.Adam([*model.parameters(), *loss.parameters()])``).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning import reducers
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn

from simwarp._autograd import as_flag, autocast_enabled, require, zeros_linked_to
from simwarp.backend import DENSE_AUTO_LIMIT, warp_attend, warp_weights
from simwarp.backend.common import (
    MIN_TEMPERATURE,
    as_real,
    check_backend_options,
    check_float32_scale,
    exact_dtype,
    resolve_params,
    work_dtype,
)
from simwarp.backend.dense import row_logsumexp
from simwarp.distributed import CallKind, gather_rows, raise_together, resolve_group
from simwarp.similarity import paired_similarity, unit_rows
from simwarp.steps import SoftStep

__all__ = [
    "SoftStepNeighborRegressionLoss",
    "SoftStepNCALoss",
    "SoftStepContrastiveLoss",
    "backend_metric",
]

#: With more classes than this, anchors are sorted by class and processed in blocks spanning
#: at most this many classes each (see :func:`_class_masses`); it bounds the width of the
#: one-hot value matrix, i.e. the extra ``rows · keys · classes`` work of the backend call.
MAX_CLASS_COLUMNS = 128

#: On CPU, ``impl="auto"`` materialises the anchor × neighbour weights up to this many pairs
#: (batch 4096) and streams beyond. Higher than the backend's general limit: the losses' dense
#: path reads class masses straight from the weights (one Gram product for a batch with
#: itself), where streaming sums one-hot value columns per key block. At batch 4096 (one
#: thread) the dense NCA loss takes 0.5x the streamed time with 350 MiB, where PML's
#: ``NCALoss`` takes 1.1x the dense time with 650 MiB (benchmarks/RESULTS.md). Other devices
#: materialise up to the backend's limit (``DENSE_AUTO_LIMIT``), also on CUDA, where the
#: backend's own ``"auto"`` would take the fused kernels at any size: a batch's class masses
#: come from one small weight matrix. Above it the NCA and contrastive losses leave ``"auto"``
#: to the backend (the fused kernels where they support the call). The regression loss is a
#: plain ``warp_attend`` of the targets and applies this limit on CPU only.
LOSS_DENSE_LIMIT = 1 << 24


def _materialises(impl: str, n: int, m: int, device: torch.device) -> bool:
    """Whether a loss over ``n`` anchors and ``m`` neighbours on ``device`` takes the dense path."""
    limit = LOSS_DENSE_LIMIT if device.type == "cpu" else DENSE_AUTO_LIMIT
    return impl == "dense" or (impl == "auto" and n * m <= limit)


# ---------------------------------------------------------------------------------------
# PML distance -> backend metric
# ---------------------------------------------------------------------------------------


def backend_metric(distance) -> tuple[str, bool]:
    """Map a PML distance object to ``(metric, prenormalise)`` for the backend.

    ``prenormalise`` says whether the embeddings are normalised to unit rows first (PML's
    ``normalize_embeddings``; the losses use :func:`simwarp.similarity.unit_rows`, which gives a
    zero row gradient 0); the backend's ``"cosine"`` normalises itself.

    ========================================= ================
    PML distance                               backend metric
    ========================================= ================
    ``LpDistance(p=2, power=1)``               ``"l2"``
    ``LpDistance(p=2, power=2)``               ``"sqeuclidean"``
    ``CosineSimilarity()``                     ``"cosine"``
    ``DotProductSimilarity(power=1)``          ``"dot"`` (scale 1)
    ========================================= ================

    Raises:
        TypeError: for any other distance class (subclasses included: they may redefine
            the matrix).
        ValueError: for an ``LpDistance`` with ``p != 2`` or a power the backend cannot express.
    """
    kind = type(distance)
    if kind is LpDistance:
        if distance.p != 2:
            raise ValueError(f"LpDistance(p={distance.p!r}) is not supported: the backend's distances are L2 (p=2)")
        if distance.power == 1:
            return "l2", bool(distance.normalize_embeddings)
        if distance.power == 2:
            return "sqeuclidean", bool(distance.normalize_embeddings)
        raise ValueError(f"LpDistance(power={distance.power!r}) is not supported; use power=1 (l2) or power=2 (sqeuclidean)")
    if kind is CosineSimilarity:
        if distance.power != 1:
            raise ValueError(f"CosineSimilarity(power={distance.power!r}) is not supported; use power=1")
        return "cosine", False
    if kind is DotProductSimilarity:
        if distance.power != 1:
            raise ValueError(f"DotProductSimilarity(power={distance.power!r}) is not supported; use power=1")
        return "dot", bool(distance.normalize_embeddings)
    raise TypeError(
        "distance must be one of pytorch_metric_learning.distances.LpDistance (p=2, power 1 or 2), "
        f"CosineSimilarity or DotProductSimilarity; got {kind.__name__}"
    )


# ---------------------------------------------------------------------------------------
# Shared helpers (label bookkeeping only; all similarity math goes through the backend)
# ---------------------------------------------------------------------------------------


def _check_embeddings(embeddings, ref_emb) -> None:
    for name, x in (("embeddings", embeddings), ("ref_emb", ref_emb)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(
                f"{name} must have shape (batch_size, embedding_size) with embedding_size >= 1, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if embeddings.shape[1] != ref_emb.shape[1]:
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)} and ref_emb {tuple(ref_emb.shape)} must share embedding_size"
        )
    if embeddings.dtype != ref_emb.dtype:
        raise TypeError(f"embeddings ({embeddings.dtype}) and ref_emb ({ref_emb.dtype}) must share a dtype")


def _holds(reducer, kind: type) -> bool:
    """Whether ``reducer`` is a ``kind`` or wraps one (``MultipleReducers``, ``PerAnchorReducer``'s inner one)."""
    if isinstance(reducer, kind):
        return True
    held = getattr(reducer, "reducers", None)
    inner = [*(held.values() if hasattr(held, "values") else held or ()), getattr(reducer, "reducer", None)]
    return any(isinstance(r, torch.nn.Module) and _holds(r, kind) for r in inner)


def _mixed_under_autocast(embeddings, ref_emb):
    """Under autocast, a reference set in another floating dtype than the embeddings (a float32
    memory bank beside bf16 model outputs, which PML's distances mix there) and the embeddings
    both in the wider of the two dtypes; anything else as given (and checked later)."""
    tensors = (embeddings, ref_emb)
    if not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in tensors) or embeddings.dtype == ref_emb.dtype:
        return embeddings, ref_emb
    if not autocast_enabled(embeddings.device.type):
        return embeddings, ref_emb
    dtype = torch.promote_types(embeddings.dtype, ref_emb.dtype)
    return embeddings.to(dtype), ref_emb.to(dtype)


def _output_dtype(embeddings: torch.Tensor, computed: torch.dtype) -> torch.dtype:
    """The dtype of the per-element losses: the embeddings', as pytorch-metric-learning's; under
    autocast the one they were computed in (float32 for half inputs), as autocast runs losses
    (and as PML's NCALoss comes out there). The regression loss keeps float32 for half inputs
    always: its squared errors overflow float16."""
    return computed if autocast_enabled(embeddings.device.type) else embeddings.dtype


@contextlib.contextmanager
def _naming_unknown_keywords(loss: nn.Module):
    """A keyword neither the loss nor pytorch-metric-learning's base classes take (a typo) is
    named with the loss's class, not with the PML base class that refuses it."""
    try:
        yield
    except TypeError as error:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unknown is None:
            raise
        raise TypeError(
            f"{type(loss).__name__} got an unexpected keyword argument {unknown.group(1)!r} (it takes its own "
            "arguments and pytorch-metric-learning's distance, reducer, embedding_regularizer, ...)"
        ) from None


def _check_class_labels(labels, n: int, name: str) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the embeddings, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}")


def _class_labels(labels, n: int, name: str):
    """``labels`` checked as :func:`_check_class_labels` does, except that floating-point labels
    holding whole numbers (which pytorch-metric-learning accepts) become int64 class labels."""
    if isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.dim() == 1 and labels.shape[0] == n:
        require(
            torch.isfinite(labels) & (labels == labels.round()),
            f"{name} must hold class labels: floating-point labels must be whole numbers",
        )
        labels = labels.long()
    _check_class_labels(labels, n, name)
    return labels


def _index_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class labels as int64 (bool and narrow integer labels sort and search like any other)."""
    return labels if labels.dtype == torch.int64 else labels.long()


def _check_indices_tuple(indices_tuple, n: int, m: int):
    """``indices_tuple`` checked; returned with empty entries of any dtype as int64 (PML reads
    ``torch.tensor([])`` as no pairs)."""
    if indices_tuple is None:
        return None
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be (anchors, positives, negatives) or (a1, p, a2, n) index tensors")
    bounds = (n, m, m) if len(indices_tuple) == 3 else (n, m, n, m)
    for x, bound in zip(indices_tuple, bounds):
        if not isinstance(x, torch.Tensor) or x.dim() != 1:
            got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"indices_tuple entries must be 1-D index tensors, got {got}")
        if x.numel() and x.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"indices_tuple entries must be integer index tensors, got dtype {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= bound):
            raise ValueError(f"indices_tuple holds an index outside [0, {bound}) for a batch of {n} x {m} pairs")
    if len(indices_tuple) == 4 and (len(indices_tuple[0]) != len(indices_tuple[1]) or len(indices_tuple[2]) != len(indices_tuple[3])):
        raise ValueError("indices_tuple (a1, p, a2, n): a1/p and a2/n must have equal lengths")
    if len(indices_tuple) == 3 and not (len(indices_tuple[0]) == len(indices_tuple[1]) == len(indices_tuple[2])):
        raise ValueError("indices_tuple (anchors, positives, negatives) must have equal lengths")
    return tuple(x if x.numel() else x.long() for x in indices_tuple)


def _leave_one_out(exclude_self: bool, offset: int) -> dict:
    """Backend kwargs excluding anchor ``i``'s own row, reference ``offset + i``."""
    return {"exclude_self": True, "self_offset": offset} if exclude_self else {}


def _positive_pairs(labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool, offset: int = 0):
    """All ``(a, p)`` with ``labels[a] == ref_labels[p]`` (``a != p`` if ``exclude_self``), in
    PML's order (row-major, as ``torch.where`` on the match matrix), without materialising it."""
    labels, ref_labels = _index_labels(labels), _index_labels(ref_labels)
    ref_sorted, order = torch.sort(ref_labels, stable=True)
    start = torch.searchsorted(ref_sorted, labels, right=False)
    count = torch.searchsorted(ref_sorted, labels, right=True) - start
    pairs = int(count.sum())  # one read of the pairs' number, not one per repeat_interleave
    a = torch.repeat_interleave(torch.arange(labels.numel(), device=labels.device), count, output_size=pairs)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count, output_size=pairs)
    p = order[torch.repeat_interleave(start, count, output_size=pairs) + torch.arange(pairs, device=labels.device) - first]
    if exclude_self:
        keep = a + offset != p
        a, p = a[keep], p[keep]
    return a, p, count


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log x`` with ``-inf`` (and a zero gradient, never NaN) where ``x <= 0``."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))), float("-inf"))


def _resolved_mass(mass: torch.Tensor, keys: int) -> torch.Tensor:
    """``mass`` with values of at most ``keys · tiny`` set to 0 (and no gradient there), in the
    compute dtype (float32 for half-precision masses).

    The backend raises softmax numerators below the dtype's normal range to its smallest
    normal number ``tiny`` (and normalisers are at least 1), so a mass of ``keys · tiny`` or
    less is below what the dtype resolves: its ``log`` would be a made-up value near
    ``-87`` (float32) and its gradient ``1 / mass`` overflows to inf (then NaN)."""
    if mass.dtype in (torch.float16, torch.bfloat16):  # the backend computed it in float32
        mass = mass.float()
    floor = keys * torch.finfo(mass.dtype).tiny
    return torch.where(mass <= floor, torch.zeros_like(mass), mass)  # NaN (a NaN embedding) stays


def _row_params(params: tuple, rows: torch.Tensor | None):
    if rows is None:
        return params
    return tuple(p[rows] if p.dim() > 0 else p for p in params)


def _class_indices(labels: torch.Tensor, ref_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Labels and reference labels as indices ``0 .. n_classes - 1`` of their union."""
    same = ref_labels is labels
    labels = _index_labels(labels)
    ref_labels = labels if same else _index_labels(ref_labels)
    if same:  # the usual batch-against-itself call: half the work
        classes, inv = torch.unique(labels, return_inverse=True)
        return inv, inv, classes.numel()
    classes, inv = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
    return inv[: labels.numel()], inv[labels.numel() :], classes.numel()


def _own_class_columns(q_cls: torch.Tensor, r_cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(columns (n, c), valid (n, c) bool)``: the references of each anchor's own class, padded
    to the largest class (``valid`` marks the real entries), or ``None`` where classes are large
    (more than ``m / 8`` references: a class-match matrix is then cheaper)."""
    m = r_cls.numel()
    sorted_cls, order = torch.sort(r_cls, stable=True)
    start = torch.searchsorted(sorted_cls, q_cls)
    count = torch.searchsorted(sorted_cls, q_cls, right=True) - start
    width = int(count.max()) if count.numel() else 0
    if width * 8 > m:
        return None
    slot = torch.arange(width, device=q_cls.device)
    return order[(start[:, None] + slot).clamp_max_(max(m - 1, 0))], slot < count[:, None]


def _class_mass(w: torch.Tensor, q_cls: torch.Tensor, r_cls: torch.Tensor, *, own: bool) -> torch.Tensor:
    """``(n,)``: each anchor's weight on the references of its own class (``own``),
    ``Σ_{j: r_j = q_i} w_ij``, or of all other classes, for weights ``w (n, m)``. Each is summed
    directly: the other's complement ``w.sum(1) - ...`` cancels to 0 where one side holds
    nearly all the weight (two views of one image: the negatives' mass is what matters)."""
    # 1 where the classes differ, else 0 (classes are small integers, exact in floating
    # point), built with float arithmetic: bool comparisons and float-by-bool products are
    # slow on CPU
    select = (q_cls.to(w.dtype)[:, None] - r_cls.to(w.dtype)[None, :]).abs_().clamp_max_(1.0)
    if own:
        select.neg_().add_(1.0)
    return (w * select).sum(1)


def _class_masses(
    x: torch.Tensor,
    r: torch.Tensor,
    q_cls: torch.Tensor,
    r_cls: torch.Tensor,
    n_cls: int,
    *,
    exclude_self: bool,
    params: tuple,
    step: str,
    warp: dict,
    self_offset: int = 0,
    with_lse: bool = True,
):
    """SoftStep mass of each anchor on its own class and on all other classes, and ``lse``.

    On the small-problem path only what is asked for is computed: ``own`` without
    ``with_lse`` (``other`` and ``lse`` are then ``None``), else ``other`` and ``lse`` (``own``
    is ``None``).

    With ``impl="dense"``, and with ``"auto"`` up to :data:`LOSS_DENSE_LIMIT` pairs ``n · m``
    on CPU (the backend's limit elsewhere), the weight matrix comes from
    :func:`simwarp.warp_weights` and is summed per class (fastest; memory grows as
    ``n · m``). Otherwise one
    backend call with ``v = one_hot(ref classes)`` when there are at most
    :data:`MAX_CLASS_COLUMNS` classes; beyond that anchors are sorted by class and processed in
    blocks of at most that many classes, each with ``v`` restricted to the block's classes
    plus one "other" column, so that ``v`` stays narrow. Every call sees all reference keys,
    so the row range is always over all candidate neighbours.

    Returns ``own (n,)``, ``other (n,)``, ``lse (n,)`` (log-normaliser, ``-inf`` on empty rows).
    """
    n, m = x.shape[0], r.shape[0]
    a, b, t = params
    if _materialises(warp["impl"], n, m, x.device):
        kwargs = dict(step=step, a=a, b=b, t=t, **_leave_one_out(exclude_self, self_offset), **warp)
        own_columns = None if with_lse else _own_class_columns(q_cls, r_cls)
        if own_columns is not None:  # only the own-class mass is wanted: read the weights there
            columns, valid = own_columns
            own = (warp_weights(x, r, columns=columns, **kwargs) * valid.to(x.dtype)).sum(1)
            return own, None, None
        if not with_lse:  # the own class is large: sum under a class-match matrix
            return _class_mass(warp_weights(x, r, **kwargs), q_cls, r_cls, own=True), None, None
        w, stats = warp_weights(x, r, return_stats=True, **kwargs)
        return None, _class_mass(w, q_cls, r_cls, own=False), stats.lse
    if n_cls <= MAX_CLASS_COLUMNS:
        v = F.one_hot(r_cls, n_cls).to(x.dtype)
        out, stats = warp_attend(
            x, r, v, step=step, a=a, b=b, t=t, return_stats=True, **_leave_one_out(exclude_self, self_offset), **warp
        )
        own_col = F.one_hot(q_cls, n_cls).bool()
        own = out.gather(1, q_cls[:, None]).squeeze(1)
        other = out.masked_fill(own_col, 0.0).sum(1)
        return own, other, stats.lse
    order = torch.argsort(q_cls, stable=True)
    sorted_cls = q_cls[order]
    present = torch.unique(sorted_cls)  # the anchors' classes, sorted
    per_block = max(int(MAX_CLASS_COLUMNS), 1)
    if exclude_self:
        # The anchors are references self_offset .. self_offset + n - 1: put those in the
        # anchors' class order, so that each block of anchors meets its own references on one
        # diagonal (the backend's self_offset) instead of through a mask.
        perm = torch.arange(m, device=order.device)
        perm[self_offset : self_offset + n] = order + self_offset
        r, r_cls = r[perm], r_cls[perm]
    own_parts, other_parts, lse_parts = [], [], []
    for g in range(0, present.numel(), per_block):
        cls_b = present[g : g + per_block]
        lo_row = int(torch.searchsorted(sorted_cls, cls_b[0], right=False))
        hi_row = int(torch.searchsorted(sorted_cls, cls_b[-1], right=True))
        rows = order[lo_row:hi_row]
        pos = torch.searchsorted(cls_b, r_cls).clamp_max(cls_b.numel() - 1)
        col = torch.where(cls_b[pos] == r_cls, pos, cls_b.numel())  # "other" column for foreign classes
        v = F.one_hot(col, cls_b.numel() + 1).to(x.dtype)
        ab, bb, tb = _row_params((a, b, t), rows)
        out, stats = warp_attend(
            x[rows], r, v, step=step, a=ab, b=bb, t=tb, return_stats=True,
            **_leave_one_out(exclude_self, self_offset + lo_row), **warp,
        )
        own_idx = torch.searchsorted(cls_b, q_cls[rows])
        own_parts.append(out.gather(1, own_idx[:, None]).squeeze(1))
        other_parts.append(out.scatter(1, own_idx[:, None], 0.0).sum(1))
        lse_parts.append(stats.lse)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(n, device=order.device)
    own = torch.cat(own_parts)[inv]
    other = torch.cat(other_parts)[inv]
    lse = torch.cat(lse_parts)[inv]
    return own, other, lse


class _SoftStepLossMixin:
    """Holds the :class:`SoftStep` and the backend options shared by the three losses."""

    _scale_name: str

    def _init_softstep(
        self,
        scale_value: float,
        softstep: SoftStep | None,
        step: str,
        mode: str,
        embedding_size: int | None,
        hidden: int | None,
        init: Sequence[float] | None,
        detach_range: bool,
        impl: str,
        chunk_size: int | None,
        gather,
    ) -> None:
        """The constructor body shared by the losses: the similarity multiplier (``softmax_scale``
        or ``temperature``, as the class's ``_scale_name`` says; recorded like PML's own), the
        SoftStep, backend options, gather."""
        scale_name = self._scale_name
        if isinstance(scale_value, torch.Tensor) and scale_value.requires_grad:
            raise TypeError(
                f"{scale_name} must be a positive finite float; a tensor that requires grad (a learnable "
                f"{scale_name}) is not supported: the backend takes it as a constant"
            )
        value = as_real(scale_name, scale_value, "a positive finite float")
        if not 0 < value < math.inf:
            raise ValueError(f"{scale_name} must be a positive finite float, got {scale_value!r}")
        if scale_name == "softmax_scale":  # the similarities' factor, checked as the backend's scale
            check_float32_scale("softmax_scale", value)
        if scale_name == "temperature" and value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be at least {MIN_TEMPERATURE:.3g}, got {scale_value!r}")
        setattr(self, scale_name, value)
        self.add_to_recordable_attributes(list_of_names=[scale_name], is_stat=False)
        resolve_group(gather)  # validates; True needs an initialised process group
        self.gather = gather
        if softstep is not None:
            if not isinstance(softstep, SoftStep):
                raise TypeError(f"softstep must be a simwarp.SoftStep or None, got {type(softstep).__name__}")
            if softstep.mode == "per_head":
                raise ValueError("softstep mode 'per_head' is not meaningful for a loss; use 'global' or 'instance'")
        else:
            if mode not in ("global", "instance"):
                raise ValueError(f"mode must be 'global' or 'instance', got {mode!r}")
            if mode == "global" and (embedding_size is not None or hidden is not None):
                warnings.warn(
                    "embedding_size and hidden shape the per-anchor network of mode='instance'; with "
                    "mode='global' (one learned step) they are ignored",
                    UserWarning,
                    stacklevel=3,
                )
            instance = mode == "instance"
            if instance and embedding_size is None:
                raise ValueError("mode='instance' needs embedding_size (the embeddings' width, for the per-anchor network)")
            softstep = SoftStep(
                mode=mode, in_features=embedding_size if instance else None, hidden=hidden if instance else None,
                step=step, init=init,
            )
        self.softstep = softstep
        self.detach_range = as_flag("detach_range", detach_range)
        check_backend_options("dot", impl, chunk_size)  # (the metric follows the distance)
        self.impl = impl
        self.chunk_size = chunk_size
        backend_metric(self.distance)  # fails early on an unsupported distance

    @property
    def metric(self) -> str:
        """The backend metric of the current ``self.distance`` (read per call, as PML does)."""
        return backend_metric(self.distance)[0]

    @property
    def prenormalise(self) -> bool:
        """Whether embeddings are normalised to unit rows first (PML's ``normalize_embeddings``)."""
        return backend_metric(self.distance)[1]

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """PML's ``forward``; shapes are checked first so that errors name them."""

        def check():
            _check_embeddings(embeddings, embeddings if ref_emb is None else ref_emb)
            if ref_emb is None and ref_labels is not None:
                raise ValueError("ref_labels were given without ref_emb; pass both (PML would ignore ref_labels silently)")
            self._check_gather_arguments(labels, indices_tuple, ref_emb)
            checked = _class_labels(labels, embeddings.shape[0], "labels")
            if ref_emb is None:
                return checked, None
            checked_ref = _class_labels(ref_labels, ref_emb.shape[0], "ref_labels")
            # the same object stays the same object: the losses read `ref_labels is labels` as
            # "the reference set is the batch" (PML's own test), which a conversion would break
            return checked, (checked if ref_labels is labels else checked_ref)

        embeddings, ref_emb = _mixed_under_autocast(embeddings, ref_emb)
        labels, ref_labels = self._checked(embeddings, check)
        self._gather_link = None  # never one left by a call that raised
        return self._linked(super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels))

    #: With ``gather``: an empty slice of the gathered rows, summed (exactly 0), which
    #: :meth:`_linked` adds to the reduced loss (set by :meth:`_across_ranks`, read once).
    _gather_link: torch.Tensor | None = None

    def _linked(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` connected to the rows gathered in this call and, in a distributed run, to the
        loss's own parameters (the step's). A reducer that drops every loss of a rank
        (``ThresholdReducer``) returns a zero of the local embeddings alone: that rank would skip
        the gather's backward collective, which the other ranks wait in, and, under
        ``DistributedDataParallel`` (with or without ``gather``), leave the step's parameters
        without a gradient, which DDP's all-reduce waits for. (In one process a dropped step
        keeps its ``None`` gradient, which optimisers skip.)"""
        link, self._gather_link = self._gather_link, None
        params = [p for p in self.parameters() if p.requires_grad]
        distributed = bool(params) and torch.is_grad_enabled() and dist.is_available() and dist.is_initialized()
        if distributed:
            link = zeros_linked_to(params[0].new_zeros(()) if link is None else link, *params)
        if link is None:
            return loss
        if isinstance(loss, dict):  # DoNothingReducer: PML's loss dict, unreduced
            for part in loss.values():
                if isinstance(part, dict) and isinstance(part.get("losses"), torch.Tensor):
                    part["losses"] = part["losses"] + link.to(part["losses"].dtype)
            return loss
        return loss + link.to(loss.dtype)

    def _check_gather_arguments(self, labels, indices_tuple, ref_emb) -> None:
        """What ``gather=True`` refuses, checked with the other inputs (agreed over ranks)."""
        if not resolve_group(getattr(self, "gather", False))[0]:
            return
        if ref_emb is not None:
            raise ValueError("gather=True uses the gathered batch as reference set; do not pass ref_emb")
        if indices_tuple is not None:
            raise ValueError("gather=True does not support an indices_tuple (miner indices are per-rank)")
        if labels is None:
            raise ValueError("gather=True needs labels (the gathered batch's classes or targets)")

    def _checked(self, embeddings, check: Callable[[], Any]) -> Any:
        """``check()``, the call's local input checks. With ``gather`` they are agreed over the
        ranks before the first collective, together with the instance step's parameters (NaN
        embeddings give NaN ones, which the backend refuses after the gathers): an input that
        fails on one rank raises on every rank, none waits."""
        enabled, group = resolve_group(getattr(self, "gather", False))
        if not enabled:
            return check()

        def all_checks():
            out = check()
            if self.softstep.mode == "instance":
                with torch.no_grad():
                    a, b, t = self._prepare(embeddings, embeddings)[3]
                    resolve_params(a, b, t, batch=torch.Size(), n=embeddings.shape[0],
                                   dtype=work_dtype(embeddings.dtype), device=embeddings.device)
            return out

        # (not a tensor: its checks are about to fail; a step="none" loss has no parameters, its step a buffer)
        device = embeddings.device if isinstance(embeddings, torch.Tensor) else next(iter(self.softstep.state_dict().values())).device
        return raise_together(all_checks, group, device, same=(CallKind.LOSS,))[0]

    def _prepare(self, embeddings: torch.Tensor, ref_emb: torch.Tensor):
        """Embeddings as the backend sees them (after PML's normalisation if it applies),
        whether the reference set is the batch itself, and the step parameters per anchor."""
        same = ref_emb is embeddings
        metric, prenormalise = backend_metric(self.distance)
        # PML's normalisation (p = 2, backend_metric) by the backend's: the same unit rows, but
        # a zero row gets gradient 0 where F.normalize's is 1/eps (1e12, inf in float16)
        x = unit_rows(embeddings) if prenormalise else embeddings
        r = x if same else (unit_rows(ref_emb) if prenormalise else ref_emb)
        if getattr(self.distance, "collect_stats", False):  # the norms PML's distances record
            self.distance.reset_stats()
            maybe = self.distance.maybe_normalize
            self.distance.set_default_stats(embeddings, ref_emb, maybe(embeddings), maybe(ref_emb))
        cond = None
        if self.softstep.mode == "instance":  # the embeddings the similarity sees: cosine's unit rows too
            cond = unit_rows(embeddings) if metric == "cosine" else x
        if cond is not None and cond.shape[-1] != self.softstep.in_features:
            raise ValueError(
                f"SoftStep(mode='instance', in_features={self.softstep.in_features}) got embeddings of "
                f"size {cond.shape[-1]}"
            )
        return x, r, same, tuple(self.softstep(cond))

    def _across_ranks(self, x, r, ref_labels, labels_dtype: torch.dtype = torch.int64):
        """With ``gather`` on: the reference set becomes all ranks' (normalised) embeddings and
        labels, gathered with gradients; the labels in ``labels_dtype`` (class indices: int64,
        targets: the embeddings'), so that ranks holding them in other dtypes agree. Returns
        ``(r, ref_labels, offset)``, ``offset`` being the global index of this rank's first
        anchor (0 without gather)."""
        enabled, group = resolve_group(getattr(self, "gather", False))
        if not enabled:
            return r, ref_labels, 0
        g = gather_rows(x, group)  # (ref_emb and indices_tuple were refused with the inputs)
        self._gather_link = zeros_linked_to(g.rows.new_zeros(()), g.rows)
        return g.rows, gather_rows(ref_labels.to(labels_dtype), group, sizes=g.sizes).rows, g.offset

    def _zero_losses(self, *graph: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
        """PML's zero loss, kept connected to ``graph`` (e.g. the gathered batch) and to the
        loss's own parameters, so that every rank still runs the gather's backward collective
        and DDP sees every parameter used: a rank returning a detached zero while others
        back-propagate would hang them. In ``dtype``, the losses' (default: as the losses of the
        embeddings ``graph[0]`` come, :func:`_output_dtype`)."""
        dtype = _output_dtype(graph[0], work_dtype(graph[0].dtype)) if dtype is None else dtype
        zero = zeros_linked_to(graph[0].new_zeros((), dtype=dtype), *graph, *self.parameters())  # 0 with inf inputs too
        return {"loss": {"losses": zero, "indices": None, "reduction_type": "already_reduced"}}

    def reset_parameters(self) -> None:
        """The step back to its ``init`` (:meth:`simwarp.SoftStep.reset_parameters`)."""
        self.softstep.reset_parameters()

    def extra_repr(self) -> str:
        name = self._scale_name
        return f"{name}={getattr(self, name)}, detach_range={self.detach_range}, impl={self.impl!r}, gather={self.gather!r}"

    def _warp_options(self, scale: float, temperature: float) -> dict:
        return {
            "metric": self.metric,
            "scale": scale,
            "temperature": temperature,
            "detach_range": self.detach_range,
            "impl": self.impl,
            "chunk_size": self.chunk_size,
        }


# ---------------------------------------------------------------------------------------
# NCA
# ---------------------------------------------------------------------------------------


class SoftStepNCALoss(_SoftStepLossMixin, BaseMetricLossFunction):
    """NCA with SoftStep: ``loss_i = -log Σ_{j: y_j = y_i} w_ij`` over the SoftStep weights
    ``w_i· = warp(softmax_scale · sim(x_i, ·))`` of anchor ``i``'s candidate neighbours.

    With ``step="none"`` this is exactly PML's :class:`~pytorch_metric_learning.losses.NCALoss`
    (same distance, ``softmax_scale``, reducer and miner weighting). Anchors whose same-class
    mass is zero (no positive in the reference set, or all positives dropped by the step) are
    left out of the per-element losses, as PML does.

    Args:
        softmax_scale: multiplier of the similarities (PML's ``softmax_scale``), > 0.
        step: registered step name (``"sigmoidal"``, ``"log"``, ``"poly"``, ``"none"``, ...).
        mode: ``"global"`` (3 learned scalars) or ``"instance"`` (a Linear/MLP maps each
            anchor's embedding to its own ``(a, b, t)``; needs ``embedding_size``).
        embedding_size: embedding width, for ``mode="instance"``.
        hidden: hidden width of the instance MLP (``None`` = Linear).
        init: initial ``(a, b, t)``.
        softstep: a ready :class:`simwarp.SoftStep` (overrides ``step``/``mode``/``init``).
        detach_range: treat each row's min/max similarity as constants in backward.
        impl, chunk_size: backend implementation: ``"auto"`` streams batches above 2^24
            anchor-neighbour pairs on CPU (batch 4096; 2^20 elsewhere; memory
            ``O(n · chunk)``); ``"dense"`` materialises the weight matrix at any size
            (faster, memory ``O(n · m)``), ``"chunked"`` streams at any size.
        gather: ``False`` (default), ``True`` (default process group) or a
            ``torch.distributed.ProcessGroup``: every rank's anchors use *all* ranks' batch
            embeddings and labels as neighbours, leave-one-out by global index, with exact
            gradients (see :mod:`simwarp.distributed`); no ``ref_emb`` / ``indices_tuple``.
            Use a sum reducer to make the sum over ranks equal the single-process loss.
        **kwargs: PML's ``distance`` (default ``LpDistance(power=2)``, normalised embeddings),
            ``reducer``, ``embedding_regularizer``, ``embedding_reg_weight``, ``collect_stats``.

    Shapes: ``embeddings (n, d)``, ``labels (n,)`` int, optional ``ref_emb (m, d)``,
    ``ref_labels (m,)``; returns the reduced scalar loss.
    """

    _scale_name = "softmax_scale"  # the similarity multiplier's name (printed by extra_repr)

    def __init__(
        self,
        softmax_scale: float = 1.0,
        *,
        step: str = "sigmoidal",
        mode: str = "global",
        embedding_size: int | None = None,
        hidden: int | None = None,
        init: Sequence[float] | None = None,
        softstep: SoftStep | None = None,
        detach_range: bool = False,
        impl: str = "auto",
        chunk_size: int | None = None,
        gather=False,
        **kwargs,
    ) -> None:
        with _naming_unknown_keywords(self):
            super().__init__(**kwargs)
        self._init_softstep(
            softmax_scale, softstep, step, mode, embedding_size, hidden, init, detach_range, impl, chunk_size, gather
        )

    def get_default_distance(self):
        return LpDistance(power=2)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        _check_embeddings(embeddings, ref_emb)
        c_f.labels_required(labels)
        n, m = embeddings.shape[0], ref_emb.shape[0]
        _check_class_labels(labels, n, "labels")
        if ref_labels is None:
            raise ValueError("ref_labels are required when ref_emb is given")
        _check_class_labels(ref_labels, m, "ref_labels")
        indices_tuple = _check_indices_tuple(indices_tuple, n, m)
        x, r, same, params = self._prepare(embeddings, ref_emb)
        r, ref_labels, offset = self._across_ranks(x, r, ref_labels)
        if r.shape[0] <= 1 or n == 0:
            return self._zero_losses(x, r)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype, using_ref=not same)
        q_cls, r_cls, n_cls = _class_indices(labels, ref_labels.to(labels.device))
        own, _, _ = _class_masses(
            x, r, q_cls, r_cls, n_cls, exclude_self=same, params=params,
            step=self.softstep.step, warp=self._warp_options(self.softmax_scale, 1.0), self_offset=offset,
            with_lse=False,
        )
        own = _resolved_mass(own, r.shape[0])
        non_zero = ~(own <= 0)  # NaN masses included: a NaN loss, as PML's, not a silent 0
        if not bool(non_zero.any()):
            return self._zero_losses(x, r)  # PML's NCALoss returns NaN here (mean of nothing)
        loss = (-torch.log(own[non_zero]) * miner_weights[non_zero]).to(_output_dtype(embeddings, own.dtype))
        return {
            "loss": {
                "losses": loss,
                "indices": c_f.torch_arange_from_size(embeddings)[non_zero],
                "reduction_type": "element",
            }
        }


# ---------------------------------------------------------------------------------------
# Contrastive (NT-Xent / InfoNCE)
# ---------------------------------------------------------------------------------------


class SoftStepContrastiveLoss(_SoftStepLossMixin, BaseMetricLossFunction):
    """NT-Xent / InfoNCE with SoftStep-warped negatives, one loss per positive pair ``(i, p)``::

        loss_ip = -log( e^{s_ip/τ} / (e^{s_ip/τ} + Σ_{n ∈ N(i)} m_in e^{s_in/τ}) )

    ``m_in`` is the SoftStep mask of negative ``n`` over anchor ``i``'s row, whose range is
    taken over the whole row (every reference but ``i`` itself: positives and negatives); the
    positive itself is not warped. The step thus drops easy negatives (learned hard-negative
    selection).

    Positives and negatives come from ``labels`` (all pairs, as PML) or from ``indices_tuple``
    (pairs or triplets from a PML miner; duplicated pairs count with multiplicity, as PML). A
    miner only selects which pairs enter the loss: the range stays the whole row's, so a miner
    that returns one positive and one negative per anchor (``BatchHardMiner``,
    ``BatchEasyHardMiner``) still places the negative on the step's slope rather than at its
    0 or 1 end.
    With ``step="none"`` this is exactly PML's :class:`~pytorch_metric_learning.losses.NTXentLoss`.
    Anchors with no negative give zero loss; batches with at most one pair of each kind give
    a zero loss (both as PML).

    Memory: with labels only, ``impl="auto"`` materialises the weights up to
    ``LOSS_DENSE_LIMIT`` anchor-neighbour pairs (2^24 on CPU, 2^20 elsewhere) and streams above
    that (``O(n · chunk)`` plus the positive pairs). With an ``indices_tuple`` the per-anchor
    candidate sets are arbitrary, so the weights are materialised (``O(n · m)``, as the miner
    itself does).

    Args:
        temperature: softmax temperature ``τ`` (PML's default 0.07).
        step, mode, embedding_size, hidden, init, softstep, detach_range, impl, chunk_size, gather:
            as :class:`SoftStepNCALoss`.
        **kwargs: PML's ``distance`` (default ``CosineSimilarity()``), ``reducer``,
            ``embedding_regularizer``, ...

    Shapes: ``embeddings (n, d)``, ``labels (n,)`` int (or ``None`` with ``indices_tuple``),
    ``ref_emb (m, d)``, ``ref_labels (m,)``; returns the reduced scalar loss.
    """

    _scale_name = "temperature"  # the similarity multiplier's name (printed by extra_repr)

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        step: str = "sigmoidal",
        mode: str = "global",
        embedding_size: int | None = None,
        hidden: int | None = None,
        init: Sequence[float] | None = None,
        softstep: SoftStep | None = None,
        detach_range: bool = False,
        impl: str = "auto",
        chunk_size: int | None = None,
        gather=False,
        **kwargs,
    ) -> None:
        with _naming_unknown_keywords(self):
            super().__init__(**kwargs)
        self._init_softstep(
            temperature, softstep, step, mode, embedding_size, hidden, init, detach_range, impl, chunk_size, gather
        )

    def get_default_distance(self):
        return CosineSimilarity()

    def _check_gather_arguments(self, labels, indices_tuple, ref_emb) -> None:
        super()._check_gather_arguments(labels, indices_tuple, ref_emb)
        if resolve_group(getattr(self, "gather", False))[0] and _holds(self.reducer, reducers.PerAnchorReducer):
            raise ValueError(
                "gather=True with PerAnchorReducer: the positive pairs index the gathered batch, which "
                "PerAnchorReducer sizes by the local one; reduce with another reducer or without gather"
            )

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        _check_embeddings(embeddings, ref_emb)
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        n, m = embeddings.shape[0], ref_emb.shape[0]
        _check_class_labels(labels, n, "labels")
        _check_class_labels(ref_labels, m, "ref_labels")
        indices_tuple = _check_indices_tuple(indices_tuple, n, m)
        if indices_tuple is None and ref_labels is None:
            raise ValueError("ref_labels are required when ref_emb is given without an indices_tuple")
        x, r, same, params = self._prepare(embeddings, ref_emb)
        warp = self._warp_options(1.0, self.temperature)
        step = self.softstep.step
        r, ref_labels, offset = self._across_ranks(x, r, ref_labels)
        m = r.shape[0]
        # the batch against itself: the same embeddings, or (PML's NT-Xent rule) the same labels
        exclude_self = same or (labels is not None and ref_labels is labels)
        if indices_tuple is None:
            ref_labels = ref_labels.to(labels.device)
            a1, p, count = _positive_pairs(labels, ref_labels, exclude_self, offset)
            num_neg = int((m - count).sum())
            # PML's rule for a batch with at most one pair of each kind, on the global batch: the
            # gathered labels are every rank's, so its counts need no collective
            pairs, negatives = len(a1), num_neg
            if resolve_group(getattr(self, "gather", False))[0]:
                sizes = torch.unique(ref_labels, return_counts=True)[1]
                pairs, negatives = int((sizes * (sizes - 1)).sum()), int((sizes * (m - sizes)).sum())
            if (pairs <= 1 and negatives <= 1) or len(a1) == 0 or num_neg == 0:
                return self._zero_losses(x, r)
            q_cls, r_cls, n_cls = _class_indices(labels, ref_labels)
            _, other, lse = _class_masses(  # (the row's range without the anchor's own row too)
                x, r, q_cls, r_cls, n_cls, exclude_self=exclude_self, params=params, step=step, warp=warp,
                self_offset=offset,
            )
            neg_lse = lse + _safe_log(_resolved_mass(other, m))  # log Σ_n m_in e^{s_in/τ} per anchor; -inf without negatives
        else:
            a1, p, a2, neg = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
            if all(len(i) <= 1 for i in (a1, p, a2, neg)) or len(a1) == 0 or len(a2) == 0:
                return self._zero_losses(x, r)
            neg_count = torch.zeros((n, m), dtype=x.dtype, device=x.device)
            neg_count.index_put_((a2, neg), torch.ones_like(a2, dtype=x.dtype), accumulate=True)
            a, b, t = params
            # Log-weights over the whole row (its range and normaliser), in log space: mined
            # negatives far below the row's best key must not underflow to a zero mass.
            # lse + log Σ_n count_in w_in = log Σ_n count_in m_in e^{s_in/τ}.
            log_w, stats = warp_weights(
                x, r, step=step, a=a, b=b, t=t, exclude_self=exclude_self, return_stats=True, log=True, **warp
            )
            counted = torch.where(neg_count > 0, log_w + torch.log(neg_count.to(log_w.dtype)), -math.inf)
            neg_lse = stats.lse + row_logsumexp(counted)
        wide = work_dtype(x.dtype)
        pos = paired_similarity(x[a1], r[p], self.metric, 1.0).to(wide) / self.temperature
        losses = F.softplus(neg_lse[a1].to(wide) - pos).to(_output_dtype(embeddings, wide))
        return {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}


# ---------------------------------------------------------------------------------------
# Neighbour regression
# ---------------------------------------------------------------------------------------


class SoftStepNeighborRegressionLoss(_SoftStepLossMixin, BaseMetricLossFunction):
    """The paper's regression objective as a loss: leave-one-out SoftStep neighbour
    prediction ``ŷ_i = Σ_{j≠i} w_ij y_j`` and ``loss_i = mean_e (ŷ_i - y_i)²``.

    ``labels`` are continuous targets ``(n,)`` or ``(n, e)`` (standardise them; one-hot
    class labels turn this into a classification objective). With ``ref_emb`` the neighbours
    are the reference embeddings and their ``ref_labels (m,)`` / ``(m, e)`` (no leave-one-out).
    An ``indices_tuple`` from a miner weights the anchors as PML's ``NCALoss`` does. Anchors
    without any neighbour (a batch of one) give no loss. NaN or inf targets raise a
    ``ValueError`` (as the neighbour heads do), not a NaN loss; so do targets spread so wide
    that a squared error would overflow. The squared errors are computed and returned in
    float32 for float16/bfloat16 embeddings (an error of 256 already overflows float16).

    Args:
        softmax_scale: multiplier of the similarities, > 0.
        step, mode, embedding_size, hidden, init, softstep, detach_range, impl, chunk_size, gather:
            as :class:`SoftStepNCALoss`.
        **kwargs: PML's ``distance`` (default ``LpDistance(power=2)``, normalised embeddings),
            ``reducer``, ``embedding_regularizer``, ...
    """

    _scale_name = "softmax_scale"  # the similarity multiplier's name (printed by extra_repr)

    def __init__(
        self,
        softmax_scale: float = 1.0,
        *,
        step: str = "sigmoidal",
        mode: str = "global",
        embedding_size: int | None = None,
        hidden: int | None = None,
        init: Sequence[float] | None = None,
        softstep: SoftStep | None = None,
        detach_range: bool = False,
        impl: str = "auto",
        chunk_size: int | None = None,
        gather=False,
        **kwargs,
    ) -> None:
        with _naming_unknown_keywords(self):
            super().__init__(**kwargs)
        self._init_softstep(
            softmax_scale, softstep, step, mode, embedding_size, hidden, init, detach_range, impl, chunk_size, gather
        )

    def get_default_distance(self):
        return LpDistance(power=2)

    @staticmethod
    def _targets(y, n: int, name: str) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of continuous targets, got {type(y).__name__}")
        if y.is_complex():
            raise TypeError(f"{name} must hold real targets, got dtype {y.dtype}")
        if y.dim() not in (1, 2) or y.shape[0] != n or (y.dim() == 2 and y.shape[1] == 0):
            raise ValueError(
                f"{name} must have shape ({n},) or ({n}, e) with e >= 1 to match the embeddings, got {tuple(y.shape)}"
            )
        require(torch.isfinite(y), f"{name} contains NaN or inf targets; drop or impute them first")
        return y[:, None] if y.dim() == 1 else y

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """As PML's ``BaseMetricLossFunction.forward``, but ``labels`` may be ``(n, e)``."""
        self.reset_stats()
        embeddings, ref_emb = _mixed_under_autocast(embeddings, ref_emb)

        def check():
            if labels is None:
                raise ValueError("labels (continuous targets) are required for SoftStepNeighborRegressionLoss")
            if (ref_emb is None) != (ref_labels is None):
                raise ValueError("ref_emb and ref_labels must be given together")
            self._check_gather_arguments(labels, indices_tuple, ref_emb)

        if isinstance(embeddings, torch.Tensor):  # as PML's forward: the targets follow the embeddings
            labels, ref_labels = (
                y.to(embeddings.device) if isinstance(y, torch.Tensor) else y for y in (labels, ref_labels)
            )
        if resolve_group(getattr(self, "gather", False))[0]:  # agreed over ranks before any collective
            # (with gather there is no ref_emb: the batch is its own reference set)
            self._checked(embeddings, lambda: (check(), self._checked_targets(embeddings, labels, indices_tuple, embeddings, labels)))
        else:
            check()
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        self._gather_link = None  # never one left by a call that raised
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        return self._linked(self.reducer(loss_dict, embeddings, labels))

    def _checked_targets(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """The inputs checked; returns the targets ``y (n, e)`` and ``y_ref (m, e)``."""
        _check_embeddings(embeddings, ref_emb)
        n, m = embeddings.shape[0], ref_emb.shape[0]
        self_targets = ref_labels is labels and m == n  # the batch against itself: each check once
        y = self._targets(labels, n, "labels")
        y_ref = y if self_targets else self._targets(ref_labels, m, "ref_labels")
        if y.shape[1] != y_ref.shape[1]:
            raise ValueError(f"labels {tuple(labels.shape)} and ref_labels {tuple(ref_labels.shape)} differ in width")
        indices_tuple = _check_indices_tuple(indices_tuple, n, m)
        for name, targets in (("labels", y),) + (() if self_targets else (("ref_labels", y_ref),)):
            require(
                torch.isfinite(targets.to(embeddings.dtype)),
                f"{name} overflow {embeddings.dtype}, the embeddings' dtype the neighbours' targets are averaged in; "
                "standardise them",
            )
        if y.numel() and y_ref.numel():  # a prediction lies in its column's range: its error is at most the spread
            both = (y if self_targets else torch.cat([y, y_ref.to(y.device)])).to(exact_dtype(y.device))
            wide = work_dtype(embeddings.dtype)
            spread = (both.amax(0) - both.amin(0)).max()
            require(
                torch.isfinite((spread**2).to(wide)),
                f"the targets (labels, ref_labels) spread so wide that their squared errors overflow {wide}, "
                "which the loss computes in; standardise them",
                lambda: f" (spread {spread.item():.3g})",
            )
        return y, y_ref

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        y, y_ref = self._checked_targets(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        n = embeddings.shape[0]
        x, r, same, (a, b, t) = self._prepare(embeddings, ref_emb)
        r, y_ref, offset = self._across_ranks(x, r, y_ref, labels_dtype=x.dtype)
        wide = work_dtype(x.dtype)  # float32 for half inputs: squared errors overflow float16 early
        if same and r.shape[0] <= 1:
            return self._zero_losses(x, r, dtype=wide)
        v = y_ref.to(device=x.device, dtype=x.dtype)
        warp = self._warp_options(self.softmax_scale, 1.0)
        if x.device.type == "cpu" and _materialises(warp["impl"], n, r.shape[0], x.device):
            warp["impl"] = "dense"  # (elsewhere "auto" stays: on CUDA it may take the fused kernels)
        pred, stats = warp_attend(
            x, r, v, step=self.softstep.step, a=a, b=b, t=t, return_stats=True, **_leave_one_out(same, offset), **warp
        )
        keep = ~stats.empty
        if not bool(keep.any()):
            return self._zero_losses(x, r, dtype=wide)
        weights = lmu.convert_to_weights(indices_tuple, y, dtype=wide, using_ref=not same)
        err = (pred.to(wide) - y.to(wide)).pow(2).mean(1)
        return {
            "loss": {
                "losses": err[keep] * weights[keep],
                "indices": c_f.torch_arange_from_size(embeddings)[keep],
                "reduction_type": "element",
            }
        }
