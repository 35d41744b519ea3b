"""simwarp on ``torch.distributed``: neighbours across ranks and sharded neighbour banks.

Two building blocks, both on plain ``torch.distributed`` collectives (``gloo`` on CPU, ``nccl``
on GPUs; tensors stay on the inputs' device):

* **In-batch neighbours across ranks** (training): :func:`gathered_warp_attend` attends each
  rank's *local* queries over the *global* batch (all ranks' rows concatenated in rank order),
  leave-one-out by global index. The gather is differentiable and *exact*: its backward sums
  the gradients of every rank's output with respect to the gathered rows (an all-reduce) and
  hands each rank the slice of its own rows, so the gradient of the local embeddings equals the
  single-process gradient of the *sum* of all ranks' losses (``torch.distributed.nn``'s
  ``all_gather`` semantics; PML's ``DistributedLossWrapper(efficient=True)`` drops the other
  ranks' terms). Ranks may hold different batch sizes.
* **Sharded banks** (inference): :func:`sharded_warp_attend` runs the backend's two streaming
  passes with each rank holding one shard of the bank: pass 1 (:func:`simwarp.warp_range` on the
  shard) all-reduces each row's min/max similarity; pass 2 runs :func:`simwarp.warp_attend` on
  the shard with the *global* range (``row_range``), then merges the shards' outputs through
  their log-normalisers (an all-reduce MAX and one SUM). The result equals the
  single-process prediction over the concatenated bank up to float rounding; no rank ever
  holds more than its shard and ``O(rows · chunk)`` scores. :func:`sharded_explain` merges the
  per-shard top-k weights.

All row math is the backend's (``warp_range``, ``warp_attend``/``warp_weights`` with
``row_range``), so every metric with streaming support and every registered step behaves as in
:func:`simwarp.warp_attend`.

Every function that communicates is a *collective*: all ranks of the group must call it, in
the same order, with the same non-tensor arguments (``gather_rows``, ``global_size``,
``global_moments``, ``raise_together``, the ``*_warp_attend`` functions, ``sharded_explain``).
``resolve_group``, ``merge_moments``, ``leave_one_out_mask`` and ``check_global_batch`` are local.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist

from simwarp._autograd import as_flag, is_int, unaliased
from simwarp.backend import WarpStats, warp_attend, warp_range, warp_weights
from simwarp.backend.chunked import block_ranges, default_chunk_size
from simwarp.backend.common import (
    check_chunk_size,
    check_inputs,
    exact_dtype,
    make_spec,
    resolve_params,
    work_dtype,
)
from simwarp.similarity import STREAMING_METRICS

__all__ = [
    "Gathered",
    "resolve_group",
    "gather_rows",
    "global_size",
    "global_moments",
    "raise_together",
    "CallKind",
    "AGREEMENT_INTS",
    "leave_one_out_mask",
    "gathered_warp_attend",
    "gathered_warp_attend_with_sizes",
    "sharded_warp_attend",
    "sharded_explain",
]

GroupArg = Any  # bool | torch.distributed.ProcessGroup | None


class Gathered(NamedTuple):
    """Rows of all ranks concatenated in rank order.

    Attributes:
        rows: ``(N, ...)`` with ``N = sum(sizes)``; differentiable with respect to the local
            input when it required grad.
        offset: index of this rank's first row in ``rows``.
        sizes: number of rows of every rank.
    """

    rows: torch.Tensor
    offset: int
    sizes: list[int]


# ---------------------------------------------------------------------------------------
# Process groups and raw collectives
# ---------------------------------------------------------------------------------------


def resolve_group(gather: GroupArg) -> tuple[bool, Any]:
    """Interpret a front end's ``gather=`` argument.

    Args:
        gather: ``False``/``None`` (off), ``True`` (the default process group) or a
            ``torch.distributed.ProcessGroup``.

    Returns:
        ``(enabled, group)``; ``group`` is ``None`` for the default group.

    Raises:
        TypeError: for any other value.
        RuntimeError: when enabled but ``torch.distributed`` is not initialised.
    """
    if gather is None:
        return False, None
    if dist.is_available() and isinstance(gather, dist.ProcessGroup):
        group = gather
    else:
        try:
            enabled = as_flag("gather", gather)
        except TypeError:
            raise TypeError(
                f"gather must be a bool or a torch.distributed.ProcessGroup, got {type(gather).__name__}"
            ) from None
        if not enabled:
            return False, None
        group = None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gather is enabled but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)"
        )
    return True, group


def _require_initialised() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")


def _all_gather_ints(values: list[int], group, device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (the same number on each rank), in rank order."""
    t = torch.tensor(values, dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [tuple(int(v) for v in o) for o in out]


T = TypeVar("T")


class CallKind(enum.IntEnum):
    """What a front end's call does: the first of the integers :func:`raise_together` agrees on
    (``same``). Ranks that make different kinds of call would run different collectives."""

    HEAD_TRAIN = 1
    HEAD_PREDICT = 2
    HEAD_EXPLAIN = 3
    HEAD_SET_BANK = 4
    LOSS = 5


#: Length of :func:`raise_together`'s exchange, the same on every rank whatever the call (an
#: all-gather of unequal lengths aborts the process under gloo instead of raising).
AGREEMENT_INTS = 16


def _describe_kind(values: tuple[int, ...]) -> str:
    """A rank's ``same`` integers for a message, the :class:`CallKind` by its name."""
    try:
        kind = CallKind(values[0]).name
    except (IndexError, ValueError):
        return repr(values)
    return repr((kind, *values[1:])) if len(values) > 1 else kind


def raise_together(
    check: Callable[[], T], group, device: torch.device, *, same: Sequence[int] = (), share: Sequence[int] = ()
) -> tuple[T, list[tuple[int, ...]]]:
    """Run ``check`` (a call's local input checks: no collectives) and agree on its outcome
    over the ranks before any collective of the call: where it raises on some ranks, every
    rank raises (those ranks their own error, the others a ``ValueError`` naming them) instead
    of the others waiting in the call's next collective until the timeout.

    ``same``: integers that must be equal on every rank: what kind of call this is (a
    :class:`CallKind` first, by convention) and the settings its collectives depend on; ranks
    that differ would run different collectives, so every rank raises a ``ValueError`` naming
    them. ``share``: integers every rank learns (e.g. its bank shard's size), returned in rank
    order. One all-gather of :data:`AGREEMENT_INTS` integers on every rank, whatever the call,
    so that ranks in different calls meet in it and raise; ``same`` and ``share`` together
    hold at most ``AGREEMENT_INTS - 3``.

    Returns ``(check(), every rank's share)``."""
    same, share = [int(x) for x in same], [int(x) for x in share]
    if 3 + len(same) + len(share) > AGREEMENT_INTS:
        raise ValueError(f"raise_together takes at most {AGREEMENT_INTS - 3} integers in same and share together, "
                         f"got {len(same)} + {len(share)}")
    error, result = None, None
    try:
        result = check()
    except Exception as err:  # re-raised below, once every rank knows
        error = err
    mine = [int(error is not None), len(same), len(share), *same, *share]
    rows = _all_gather_ints(mine + [0] * (AGREEMENT_INTS - len(mine)), group, device)
    failed = [rank for rank, row in enumerate(rows) if row[0]]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"this call's inputs failed their checks on rank(s) {failed} (see the error raised there)")
    kinds = [row[1:3] + row[3 : 3 + row[1]] for row in rows]  # (len(same), len(share), *same)
    if any(kind != kinds[0] for kind in kinds):
        per_rank = [_describe_kind(kind[2:]) for kind in kinds]
        if len({kind[2:3] for kind in kinds}) > 1:
            raise ValueError(
                f"the ranks made different calls (per rank: {per_rank}); every rank must call the same front end in "
                "the same mode (train/eval, with or without labels), or their collectives would not match"
            )
        raise ValueError(
            f"the ranks called with different settings (per rank: {per_rank}); every rank's module must be "
            "configured alike (in_features, out_features or num_classes, metric, step, mode, temperature, scale) "
            "and called with the same non-tensor arguments, or their collectives would not match"
        )
    return result, [row[3 + len(same) : 3 + len(same) + len(share)] for row in rows]


def check_global_batch(sizes: list[int]) -> None:
    """Leave-one-out over a batch spread over ranks (``sizes``: rows per rank) needs 2 rows in all."""
    if sum(sizes) < 2:
        raise ValueError(
            f"leave-one-out over the global batch needs at least 2 rows across ranks (each row is predicted "
            f"from the others), got {sizes} rows per rank; use drop_last=True"
        )


def _all_gather_sizes(n: int, group, device: torch.device) -> list[int]:
    return [size for (size,) in _all_gather_ints([n], group, device)]


_LAYOUT_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
)


def _all_gather_layout(x: torch.Tensor, group, name: str) -> list[int]:
    """Every rank's row count of ``x``, gathered together with its dtype and row shape, which
    must agree on every rank: each rank sees every layout, so all of them raise the same
    error (a mismatch would otherwise corrupt the gathered rows or abort the collective)."""
    code = _LAYOUT_DTYPES.index(x.dtype) if x.dtype in _LAYOUT_DTYPES else len(_LAYOUT_DTYPES)
    layouts = _all_gather_ints([x.shape[0], code, x.dim(), math.prod(x.shape[1:])], group, x.device)
    if len({lay[1:] for lay in layouts}) > 1:
        def describe(lay):
            dtype = _LAYOUT_DTYPES[lay[1]] if lay[1] < len(_LAYOUT_DTYPES) else "another dtype"
            return f"{dtype}, {lay[2]}-D with {lay[3]} values per row"

        per_rank = "; ".join(f"rank {r}: {describe(lay)}" for r, lay in enumerate(layouts))
        raise ValueError(f"{name} must have the same dtype and row shape on every rank, got {per_rank}")
    return [lay[0] for lay in layouts]


def _all_gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's ``x`` (first dim ``sizes[r]``) through a padded all_gather."""
    is_bool = x.dtype == torch.bool
    if is_bool:  # not every backend gathers bool
        x = x.to(torch.uint8)
    width = max(sizes)
    if x.shape[0] < width:
        x = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
    x = x.contiguous()
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x, group=group)
    out = torch.cat([buf[:s] for buf, s in zip(bufs, sizes)])
    return out.bool() if is_bool else out


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and returns the own slice."""

    @staticmethod
    def forward(ctx, x, sizes, offset, group):
        ctx.sizes, ctx.offset, ctx.group, ctx.n = sizes, offset, group, x.shape[0]
        return unaliased(_all_gather_padded(x.detach(), sizes, group))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.offset : ctx.offset + ctx.n], None, None, None


def gather_rows(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> Gathered:
    """All ranks' ``x (n_r, ...)`` concatenated in rank order, differentiable.

    Ranks may have different ``n_r`` (the sizes are gathered first unless given). When ``x``
    requires grad, the backward pass is a collective (every rank must run backward through
    the result): it all-reduces the gradient of the gathered rows and returns this rank's
    slice, so the local gradient includes every rank's use of these rows.

    Args:
        x: ``(n, ...)`` local rows (any dtype; only floating tensors carry gradients).
        group: process group (``None`` = default).
        sizes: every rank's ``n`` if already known (checked). The dtype and row shape are
            gathered with the sizes either way, so a mismatch across ranks raises the same
            ``ValueError`` on every rank instead of corrupting the rows or aborting the
            collective (e.g. labels of another dtype, values of another width on one rank).

    Returns:
        :class:`Gathered` ``(rows (N, ...), offset, sizes)``.
    """
    _require_initialised()
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor with at least one dim (rows first), got {getattr(x, 'shape', type(x))}")
    gathered = _all_gather_layout(x, group, "the gathered rows")
    if sizes is not None and list(sizes) != gathered:
        raise ValueError(f"sizes {sizes} do not match the ranks' row counts {gathered}")
    sizes = gathered
    rank = dist.get_rank(group)
    offset = sum(sizes[:rank])
    if x.requires_grad and torch.is_grad_enabled():
        rows = _GatherRows.apply(x, sizes, offset, group)
    else:
        rows = _all_gather_padded(x.detach(), sizes, group)
    return Gathered(rows, offset, sizes)


def global_size(n: int, group=None, device: torch.device | str = "cpu") -> int:
    """Sum of ``n`` over the ranks (e.g. the global batch or bank size). ``device`` must suit
    the backend (CUDA for ``nccl``)."""
    _require_initialised()
    return sum(_all_gather_sizes(int(n), group, torch.device(device)))


@torch.no_grad()
def global_moments(y: torch.Tensor, group=None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Exact count, mean and sum of squared deviations (``M2``) of the rows of all ranks' ``y``.

    Per-rank moments are all-gathered and merged in rank order with Chan et al.'s parallel
    formula, so every rank gets bit-identical results without gathering ``y``.

    Args:
        y: ``(n, e)`` local rows (a rank may hold none).
        group: process group (``None`` = default).

    Returns:
        ``(count, mean, m2)``: the global row count (an int), ``mean (e,)`` and ``m2 (e,)`` in float64
        (float32 on MPS, :func:`~simwarp.backend.common.exact_dtype`).
    """
    _require_initialised()
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError(f"y must have shape (n, e), got {getattr(y, 'shape', type(y))}")
    yd = y.to(exact_dtype(y.device))
    nb = yd.shape[0]
    mean = yd.mean(0) if nb else yd.new_zeros(yd.shape[1])
    m2 = ((yd - mean) ** 2).sum(0)
    mine = torch.cat([yd.new_tensor([float(nb)]), mean, m2])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    e = yd.shape[1]
    count, mu, acc = 0, yd.new_zeros(e), yd.new_zeros(e)
    for p in parts:
        nb = int(p[0])
        if nb:
            count, mu, acc = merge_moments(count, mu, acc, nb, p[1 : 1 + e], p[1 + e :])
    return count, mu, acc


def merge_moments(count_a, mean_a: torch.Tensor, m2_a: torch.Tensor, count_b, mean_b: torch.Tensor, m2_b: torch.Tensor):
    """Chan et al.'s parallel merge of two row sets' count, mean and ``M2`` (sum of squared
    deviations): ``(count, mean, m2)`` of their union. Counts are ints or tensors (no host
    read-back); a side without rows must hold finite moments (zeros), not an empty mean's NaN."""
    count = count_a + count_b
    safe = count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1)
    delta = mean_b - mean_a
    return count, mean_a + delta * (count_b / safe), m2_a + m2_b + delta**2 * (count_a * count_b / safe)


def leave_one_out_mask(n: int, offset: int, total: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(n, total)`` bool, True everywhere except at ``(i, offset + i)``: local query ``i``
    may not attend to its own row of the global batch."""
    for name, value in (("n", n), ("offset", offset), ("total", total)):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        if not is_int(value, 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if offset + n > total:
        raise ValueError(f"local rows [{offset}, {offset + n}) do not fit in a global batch of {total}")
    mask = torch.ones((n, total), dtype=torch.bool, device=device)
    idx = torch.arange(n, device=device)
    mask[idx, idx + offset] = False
    return mask


# ---------------------------------------------------------------------------------------
# In-batch neighbours across ranks (training)
# ---------------------------------------------------------------------------------------


def gathered_warp_attend(
    q: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    exclude_self: bool = True,
    metric: str = "dot",
    scale: float | None = None,
    step: str = "sigmoidal",
    a: float | torch.Tensor | None = None,
    b: float | torch.Tensor | None = None,
    t: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    detach_range: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
    dropout_p: float = 0.0,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WarpStats]:
    """:func:`simwarp.warp_attend` of the local rows over the global batch (all ranks' rows).

    Keys are all ranks' ``q`` and values all ranks' ``v`` (concatenated in rank order, both
    gathered with gradients, see :func:`gather_rows`); queries are the local ``q``. With
    ``exclude_self`` (leave-one-out) local query ``i`` skips global key ``offset + i``.
    The local output equals rows ``offset : offset + n`` of the single-process
    ``warp_attend(Q, Q, V, exclude_self=True)`` on the concatenated batch, and the gradients
    of the local ``q``, ``v`` (and ``a, b, t``) equal the single-process gradients of the sum of
    all ranks' losses.

    Args:
        q: local rows ``(n, d)`` (queries and this rank's keys); ranks may differ in ``n``, and
            a rank may hold 1 or 0 rows; with ``exclude_self`` the global batch needs at least 2
            (a ``ValueError`` on every rank otherwise).
        v: local values ``(n, e)`` (labels, one-hot classes, ...).
        group: process group (``None`` = default).
        exclude_self: leave-one-out by global index.
        metric, scale, step, a, b, t, temperature, detach_range, impl, chunk_size, dropout_p:
            as :func:`simwarp.warp_attend` (``a, b, t`` per local row: ``(n,)``).
        return_stats: also return the local rows' :class:`~simwarp.WarpStats`.

    Returns:
        ``(n, e)`` (and stats). Collective, also in backward.
    """
    return gathered_warp_attend_with_sizes(
        q, v, group=group, exclude_self=exclude_self, metric=metric, scale=scale, step=step, a=a, b=b, t=t,
        temperature=temperature, detach_range=detach_range, impl=impl, chunk_size=chunk_size, dropout_p=dropout_p,
        return_stats=return_stats,
    )[0]


def gathered_warp_attend_with_sizes(q: torch.Tensor, v: torch.Tensor, *, group=None, exclude_self: bool = True, **kwargs):
    """:func:`gathered_warp_attend` and every rank's row count (``list[int]``, rank order), which
    the gather learns anyway: callers that need the global batch size pay no extra collective."""
    _require_initialised()

    def check() -> None:
        for name, x in (("q", q), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2:
                raise ValueError(f"{name} must have shape (n, features), got {getattr(x, 'shape', type(x))}")
        if q.shape[0] != v.shape[0]:
            raise ValueError(f"q (n, d) and v (n, e) must have the same rows, got {tuple(q.shape)} and {tuple(v.shape)}")
        warp_attend(q, q[:0], v[:0], **kwargs)  # the backend's checks of the options (no keys: nothing computed)

    # agreed over the ranks before the gathers: a rank whose inputs fail must not leave the others waiting
    device = next((x.device for x in (q, v) if isinstance(x, torch.Tensor)), torch.device("cpu"))
    raise_together(check, group, device)
    return gather_and_attend(q, v, group, exclude_self, **kwargs)


def gather_and_attend(q: torch.Tensor, v: torch.Tensor, group, exclude_self: bool, **kwargs):
    """:func:`gathered_warp_attend_with_sizes` for a caller that has agreed on these inputs over
    the ranks already (:func:`raise_together`: the heads), without an agreement of its own."""
    keys = gather_rows(q, group)
    if exclude_self:  # every rank sees the same sizes: all raise, none waits
        check_global_batch(keys.sizes)
    values = gather_rows(v, group, sizes=keys.sizes)
    result = warp_attend(
        q, keys.rows, values.rows, exclude_self=bool(exclude_self), self_offset=keys.offset if exclude_self else 0,
        **kwargs,
    )
    return result, list(keys.sizes)


# ---------------------------------------------------------------------------------------
# Sharded banks (inference)
# ---------------------------------------------------------------------------------------

_QUERY_MODES = ("replicated", "local")


def _check_bank_inputs(q, k, v, metric: str, queries: str) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must have shape (rows, features), got {getattr(x, 'shape', type(x))}")
    check_inputs(q, k, v, None, False)
    if metric not in STREAMING_METRICS:
        raise ValueError(f"metric={metric!r} cannot stream over a sharded bank; use one of {STREAMING_METRICS}")
    if queries not in _QUERY_MODES:
        raise ValueError(f"queries must be one of {_QUERY_MODES}, got {queries!r}")


class _Prepared(NamedTuple):
    q: torch.Tensor  # (n, d) work dtype: all queries this rank scores (gathered if local)
    a: torch.Tensor
    b: torch.Tensor
    t: torch.Tensor
    rows: slice  # this rank's rows of the result
    spec: Any
    chunk: int


def _agree_on_bank_inputs(q, k, v, metric: str, queries: str, group) -> None:
    """:func:`_check_bank_inputs` on every rank, then one small all-gather of each rank's
    verdict and layout, so that a bad input or a layout that differs across ranks (another
    ``d``, value width or dtype; another number of replicated queries) raises the same
    ``ValueError`` on every rank instead of one rank raising while the others wait in the
    collectives (or abort inside them)."""
    try:
        _check_bank_inputs(q, k, v, metric, queries)
        problem = None
    except (TypeError, ValueError) as err:
        problem = err
    tensors = [x for x in (q, k, v) if isinstance(x, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")

    def code(x) -> int:
        return _LAYOUT_DTYPES.index(x.dtype) if x.dtype in _LAYOUT_DTYPES else len(_LAYOUT_DTYPES)

    names = ("q rows (replicated queries)", "q features", "q dtype", "k features", "k dtype", "v width", "v dtype")
    mine = [-1] * len(names)
    if problem is None:
        replicated_rows = q.shape[0] if queries == "replicated" else -1
        mine = [replicated_rows, q.shape[1], code(q), k.shape[1], code(k), v.shape[1], code(v)]
    layouts = _all_gather_ints([int(problem is None), *mine], group, device)
    failed = [r for r, lay in enumerate(layouts) if lay[0] == 0]
    if failed:
        here = f": {problem}" if problem is not None else ""
        raise ValueError(f"invalid sharded-bank inputs on rank(s) {failed}{here}") from problem
    differ = [name for i, name in enumerate(names) if len({lay[1 + i] for lay in layouts}) > 1]
    if differ:
        per_rank = "; ".join(f"rank {r}: {dict(zip(names, lay[1:]))}" for r, lay in enumerate(layouts))
        raise ValueError(f"the sharded-bank inputs must agree across ranks in {', '.join(differ)}; {per_rank}")


def _prepare(q, k, v, a, b, t, *, group, queries, metric, scale, step, temperature, chunk_size) -> _Prepared:
    _require_initialised()
    _agree_on_bank_inputs(q, k, v, metric, queries, group)
    spec = make_spec(metric, scale, step, temperature, False, False, False, dtype=q.dtype)
    check_chunk_size(chunk_size)
    dtype = work_dtype(q.dtype)
    n = q.shape[0]
    a, b, t = resolve_params(a, b, t, batch=torch.Size(), n=n, dtype=dtype, device=q.device)
    qw = q.detach().to(dtype)
    rows = slice(0, n)
    if queries == "local":
        g = gather_rows(qw, group)
        qw = g.rows
        rows = slice(g.offset, g.offset + n)
        # tensors with dims are per-row step parameters and travel with their queries;
        # floats and 0-dim tensors are shared (every rank must use the same kind)
        a, b, t = (
            gather_rows(p.detach().expand(n, 1).contiguous(), group, sizes=g.sizes).rows if p.dim() > 0 else p.detach()
            for p in (a, b, t)
        )
    else:
        a, b, t = a.detach(), b.detach(), t.detach()
    chunk = default_chunk_size(qw.shape[0], max(k.shape[0], 1)) if chunk_size is None else chunk_size
    return _Prepared(qw, a, b, t, rows, spec, chunk)


def _backend_kwargs(p: _Prepared) -> dict:
    """The backend arguments of a prepared call (per-row parameters back to ``(n,)``)."""
    a, b, t = (x.squeeze(-1) if x.dim() > 0 else x for x in (p.a, p.b, p.t))
    return dict(metric=p.spec.metric, scale=p.spec.scale, step=p.spec.step.name, a=a, b=b, t=t,
                temperature=p.spec.temperature, chunk_size=p.chunk)


def _global_range(p: _Prepared, kw: torch.Tensor, group):
    """Pass 1: every row's min/max similarity over all shards (the backend's :func:`warp_range`
    on the shard, then one all-reduce MIN of ``[lo, -hi]``); ``lo, hi (n,)``, ``empty (n,)``."""
    n = p.q.shape[0]
    lo, hi, empty = warp_range(p.q, kw, metric=p.spec.metric, scale=p.spec.scale, chunk_size=p.chunk)
    # A NaN extreme (a NaN among the row's scores) travels as a flag of its own: MIN/MAX
    # reductions keep or drop a NaN depending on where it sits.
    poisoned = lo.isnan() | hi.isnan()
    skip = empty | poisoned
    packed = torch.cat([lo.masked_fill(skip, math.inf), (-hi).masked_fill(skip, math.inf), -poisoned.to(lo.dtype)])
    dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=group)  # an empty shard contributes +inf
    lo, hi, poisoned = packed[:n], -packed[n : 2 * n], packed[2 * n :] < 0
    empty = torch.isinf(lo) & ~poisoned
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    return lo.masked_fill(poisoned, math.nan), hi.masked_fill(poisoned, math.nan), empty


def _merge_over_ranks(lse: torch.Tensor, parts: list[torch.Tensor], group):
    """Combine per-shard results normalised by their own log-normaliser ``lse (n,)``: returns
    the global ``lse`` and ``Σ_r exp(lse_r - lse) · part_r`` for every ``part (n, c)``."""
    gmax = lse.clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    shift = gmax.masked_fill(torch.isinf(gmax), 0.0)
    factor = torch.exp(lse - shift)  # 0 where this shard kept nothing for the row
    packed = torch.cat([factor.unsqueeze(-1), *(x * factor.unsqueeze(-1) for x in parts)], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    denom = packed[:, 0]
    kept_none = denom == 0  # a NaN row (a NaN among its scores) stays NaN, as in one process
    safe = torch.where(kept_none, torch.ones_like(denom), denom)
    merged, widths, col = [], [x.shape[1] for x in parts], 1
    for width in widths:
        merged.append(torch.where(kept_none.unsqueeze(-1), 0.0, packed[:, col : col + width] / safe.unsqueeze(-1)))
        col += width
    return torch.where(kept_none, -math.inf, shift + torch.log(safe)), merged


def _global_softmax(p: _Prepared, kw: torch.Tensor, vw: torch.Tensor | None, lo, hi, group):
    """Pass 2: the backend on this shard with the global range (``row_range``), merged over
    ranks through the shards' log-normalisers. Returns ``out (n, e)`` (or None without
    values), ``lse (n,)``, ``kept (n,)``."""
    values = kw.new_zeros((kw.shape[0], 0)) if vw is None else vw
    out, stats = warp_attend(p.q, kw, values, row_range=(lo, hi), return_stats=True, **_backend_kwargs(p))
    lse, (out,) = _merge_over_ranks(stats.lse, [out], group)
    kept = stats.kept.clone()
    dist.all_reduce(kept, op=dist.ReduceOp.SUM, group=group)
    return (out if vw is not None else None), lse, kept


def sharded_warp_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    queries: str = "replicated",
    metric: str = "dot",
    scale: float | None = None,
    step: str = "sigmoidal",
    a: float | torch.Tensor | None = None,
    b: float | torch.Tensor | None = None,
    t: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WarpStats]:
    """:func:`simwarp.warp_attend` over a bank sharded across ranks (inference, no gradients).

    The bank is the concatenation of every rank's ``k``/``v`` shard in rank order (shards may
    differ in size, or be empty). The result equals ``warp_attend(q, K, V)`` on the
    concatenated bank up to float rounding (the backend's two passes, with collective
    reductions: an all-reduce MIN of ``[lo, -hi]``, an all-reduce MAX of the shards'
    log-normalisers and all-reduce SUMs of the rescaled shard outputs and kept counts). Memory per rank: the
    shard plus ``O(rows · chunk)`` scores.

    Args:
        q: queries ``(n, d)``. With ``queries="replicated"`` every rank passes the same ``q``
            and gets the full result; with ``"local"`` every rank passes its own queries (sizes
            may differ; they are gathered, without gradients) and gets its own rows.
        k: this rank's bank shard ``(m_r, d)``; v: its values ``(m_r, e)``.
        group: process group (``None`` = default).
        metric: a streaming metric (``dot``, ``cosine``, ``l2``, ``sqeuclidean``).
        scale, step, a, b, t, temperature: as :func:`simwarp.warp_attend`; ``a, b, t`` per
            query (``(n,)``) or shared (floats / 0-dim tensors). With ``queries="local"`` a
            tensor with dims is taken as per-query and gathered with the queries.
        chunk_size: bank rows per block (default: about 256K scores per block).
        return_stats: also return :class:`~simwarp.WarpStats` of the rows (over the whole bank).

    Returns:
        ``(n, e)`` in ``q``'s dtype (and stats). Always detached: use
        :func:`gathered_warp_attend` or a local bank for training.
    """
    p = _prepare(q, k, v, a, b, t, group=group, queries=queries, metric=metric, scale=scale, step=step,
                 temperature=temperature, chunk_size=chunk_size)
    kw, vw = k.detach().to(p.q.dtype), v.detach().to(p.q.dtype)
    lo, hi, empty = _global_range(p, kw, group)
    out, lse, kept = _global_softmax(p, kw, vw, lo, hi, group)
    r = p.rows
    out = out[r].to(q.dtype)
    if not return_stats:
        return out
    stats = WarpStats(lse=lse[r], kept=kept[r], lo=lo[r], hi=hi[r], empty=empty[r])
    return out, stats


@torch.no_grad()
def sharded_explain(
    q: torch.Tensor,
    k: torch.Tensor,
    top: int = 5,
    *,
    group=None,
    queries: str = "replicated",
    metric: str = "dot",
    scale: float | None = None,
    step: str = "sigmoidal",
    a: float | torch.Tensor | None = None,
    b: float | torch.Tensor | None = None,
    t: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest SoftStep weights of every query over a sharded bank.

    Runs the two passes of :func:`sharded_warp_attend` (global range and normaliser), then a
    third over the shard that keeps a running per-shard top-``top`` of the exact weights;
    the per-shard candidates are all-gathered and merged.

    Args:
        q, k, group, queries, metric, scale, step, a, b, t, temperature, chunk_size: as
            :func:`sharded_warp_attend` (``k`` is this rank's shard ``(m_r, d)``).
        top: entries per query (clipped to the global bank size).

    Returns:
        ``indices (n, top)`` into the concatenated bank (rank order, long) and ``weights
        (n, top)`` (largest first; entries the step dropped have weight 0) in the compute
        dtype, as :func:`simwarp.warp_weights` returns them (float32 for half-precision ``q``).
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    probe = k.new_zeros((k.shape[0], 0)) if isinstance(k, torch.Tensor) and k.dim() == 2 else k
    p = _prepare(q, k, probe, a, b, t, group=group, queries=queries, metric=metric, scale=scale, step=step,
                 temperature=temperature, chunk_size=chunk_size)
    # In float64: each block's weights are rescaled by exp(lse_block - lse), two normalisers of
    # size |s|/τ computed apart; in float32 their rounding (|s|/τ · 2^-24) reaches the weights as
    # a factor exp(error), e^8 at |s|/τ ~ 1e7. (MPS has no float64.)
    exact = exact_dtype(p.q.device)
    p = p._replace(q=p.q.to(exact))
    kw = k.detach().to(exact)
    shard_sizes = _all_gather_layout(kw, group, "the bank shards (k)")
    total = sum(shard_sizes)
    if total == 0:
        raise ValueError("the sharded bank is empty on every rank")
    top = min(top, total)
    offset = sum(shard_sizes[: dist.get_rank(group)])
    lo, hi, _ = _global_range(p, kw, group)
    _, lse, _ = _global_softmax(p, kw, None, lo, hi, group)
    n = p.q.shape[0]
    best_w = torch.full((n, top), -1.0, dtype=p.q.dtype, device=p.q.device)  # -1: padding, below any weight
    best_i = torch.full((n, top), -1, dtype=torch.long, device=p.q.device)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    for start, stop in block_ranges(kw.shape[0], p.chunk):
        w, block = warp_weights(p.q, kw[start:stop], row_range=(lo, hi), return_stats=True, **_backend_kwargs(p))
        w = w * torch.exp(block.lse - finite_lse).unsqueeze(-1)  # block-normalised -> global weights
        idx = torch.arange(start + offset, stop + offset, device=w.device).expand(n, -1)
        cand_w, cand_i = torch.cat([best_w, w], dim=1), torch.cat([best_i, idx], dim=1)
        sel = torch.topk(cand_w, top, dim=1)
        best_w, best_i = sel.values, cand_i.gather(1, sel.indices)
    all_w = gather_rows(best_w.T.contiguous(), group).rows  # (world * top, n): one slot per rank
    all_i = gather_rows(best_i.T.contiguous(), group).rows
    sel = torch.topk(all_w.T, top, dim=1)
    r = p.rows
    return all_i.T.gather(1, sel.indices)[r], sel.values[r].to(work_dtype(q.dtype))  # (as warp_weights)
