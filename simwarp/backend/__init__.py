"""The simwarp backend: one entry point, :func:`warp_attend`, over several implementations.

=========== =================================================================================
``impl``     implementation
=========== =================================================================================
``dense``    materialises ``(..., n, m)``; any metric and step; the test oracle
``chunked``  two-pass streaming over key blocks, ``O(rows · chunk)`` memory, CPU and CUDA
``triton``   fused GPU kernels (when available)
``auto``     the fastest correct path for the inputs
=========== =================================================================================
"""

from __future__ import annotations

import math
import warnings

import torch

from simwarp._autograd import (
    as_flag,
    exporting,
    outside_autocast,
    without_functorch,
    zeros_linked_to,
)
from simwarp.backend.chunked import chunked_warp_attend, chunked_warp_range
from simwarp.backend.common import (
    IMPLS,
    WarpStats,
    broadcasts_to,
    check_chunk_size,
    check_dropout_p,
    check_impl,
    check_inputs,
    make_spec,
    resolve_params,
    work_dtype,
)
from simwarp.backend.dense import dense_warp_attend, dense_weights
from simwarp.similarity import STREAMING_METRICS

__all__ = ["warp_attend", "warp_weights", "warp_range", "WarpStats", "IMPLS", "DENSE_AUTO_LIMIT"]

#: ``impl="auto"`` materialises (dense) when ``rows · keys`` is at most this many entries: below
#: about 1-2M entries the dense path is faster on CPU (fwd+bwd), and its memory is still small.
DENSE_AUTO_LIMIT = 1 << 20


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on ``device`` (``None`` if they can): they need CUDA, or
    CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, for tests), and a triton they
    support. Never imports triton for other devices."""
    import os

    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"they need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"
    try:
        from simwarp.backend import triton as fused
    except ImportError as err:
        return f"the 'triton' package cannot be imported ({err})"
    return fused.version_problem()


def _triton_available(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` (:func:`_triton_unavailable`)."""
    return _triton_unavailable(device) is None


#: Whether ``impl="auto"`` sends ``dropout_p > 0`` to the fused kernels. Their dropout is
#: checked against float64 in Triton's interpreter and compiles for sm_90; its first GPU check
#: (H100, 2026-11-28) passed two of three cases and failed the causal one through the flat-row
#: range since fixed (docs/kernels.md). Until ``benchmarks/bench_attention_gpu.py`` has passed
#: it on a GPU, ``"auto"`` keeps the chunked path for dropout and ``impl="triton"`` opts in.
FUSED_DROPOUT_BY_DEFAULT = False


def _choose_impl(
    impl: str, metric: str, entries: int, device: torch.device, *, spec=None, tensors: tuple | None = None
) -> str:
    """Pick the implementation. ``spec`` (WarpSpec) and ``tensors`` (``(q, k, v)``) let
    ``impl="auto"`` choose the fused kernels on CUDA when they support the call (step, dtype,
    head dims); without them ``"auto"`` never picks triton."""
    check_impl(impl)
    if impl == "triton" and (reason := _triton_unavailable(device)) is not None:
        raise ValueError(f"impl='triton' cannot run: {reason}; use impl='chunked' or 'auto'")
    if metric not in STREAMING_METRICS:
        if impl in ("chunked", "triton"):
            raise ValueError(f"metric={metric!r} is only available with impl='dense' (got impl={impl!r})")
        return "dense"
    if impl == "triton" and spec is not None and tensors is not None:
        from simwarp.backend.triton import unsupported_reason

        reason = unsupported_reason(*tensors, spec)
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run this call: {reason}; use impl='chunked' or 'auto'")
    if impl == "auto":
        if device.type == "cuda" and spec is not None and tensors is not None and _triton_available(device):
            from simwarp.backend.triton import supports

            if supports(*tensors, spec) and not _imprecise_fused_backward(spec, *tensors[:2]):
                return "triton"
        # an exported program runs at every size: the dense path is the one without size-dependent loops
        return "dense" if exporting() or entries <= DENSE_AUTO_LIMIT else "chunked"
    return impl


def _imprecise_fused_backward(spec, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the fused backward could overflow: it rounds its per-score gradient
    coefficients to the input dtype for the tensor-core products (as FlashAttention does), and
    for ``l2`` they carry ``1/distance``, which passes float16's 65504 for near neighbours
    (``inf`` gradients; the PyTorch paths compute in float32)."""
    return (
        spec.metric == "l2"
        and q.dtype == torch.float16
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad)
    )


@without_functorch
@outside_autocast
def warp_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    metric: str = "dot",
    scale: float | None = None,
    step: str = "sigmoidal",
    a: float | torch.Tensor | None = None,
    b: float | torch.Tensor | None = None,
    t: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    exclude_self: bool = False,
    self_offset: int = 0,
    temperature: float = 1.0,
    detach_range: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
    return_stats: bool = False,
    dropout_p: float = 0.0,
    row_range: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, WarpStats]:
    """SoftStep-weighted average of ``v`` over the keys ``k`` for every query in ``q``.

    For each query row ``i`` over its valid keys ``j``::

        s_ij = scale · sim(q_i, k_j)
        u_ij = (s_ij - min_j s_ij) / (max_j s_ij - min_j s_ij)      (1 on a flat row)
        w_ij = softmax_j(s_ij / temperature + log m(u_ij; a_i, b_i, t_i))
        out_i = Σ_j w_ij v_j

    Args:
        q: queries ``(..., n, d)``.
        k: keys ``(..., m, d)``.
        v: values ``(..., m, e)`` (labels for neighbour heads). Leading dims of ``q``, ``k``,
            ``v`` broadcast. ``q, k, v`` share dtype and device; float16/bfloat16 compute in
            float32 and return the input dtype.
        metric: ``"dot"``, ``"cosine"``, ``"l2"``, ``"sqeuclidean"`` or ``"l1"`` (dense only).
        scale: similarity multiplier; ``None`` = ``d ** -0.5`` for ``dot``, else 1.
        step: a registered step name (:mod:`simwarp.steps`): ``"sigmoidal"``, ``"log"``,
            ``"poly"``, ``"none"`` (plain softmax) or a user step.
        a, b, t: step parameters, floats or tensors broadcastable to the rows ``(..., n)``
            (scalar, per head ``(H, 1)``, per query ``(..., n)``); ``None`` = the defaults of
            :mod:`simwarp.steps`. Need ``0 < a < b <= 1`` and ``0 < t < 1`` (checked for CPU
            tensors and floats; :class:`simwarp.SoftStep` guarantees it by construction).
        mask: bool, broadcastable to ``(..., n, m)``; True = the key may be used.
        causal: key ``j`` is visible to query ``i`` iff ``j <= i`` (top-left aligned, as SDPA).
        exclude_self: leave-one-out: query ``i`` may not use key ``i + self_offset`` (its own
            row); needs ``n + self_offset <= m``.
        self_offset: with ``exclude_self``, where the queries' own rows start among the keys
            (default 0, the diagonal). For queries that are a slice of the keys (one rank's or
            one block's rows of a larger batch), without materialising a mask.
        temperature: softmax temperature ``τ``, at least float32's smallest normal number
            (:data:`~simwarp.backend.common.MIN_TEMPERATURE`).
        detach_range: treat each row's min/max as constants in backward.
        impl: ``"auto"``, ``"dense"``, ``"chunked"`` or ``"triton"``.
        chunk_size: key-block width of the chunked path (default: about 256K scores per block).
        return_stats: also return :class:`WarpStats`.
        dropout_p: inverted dropout on the weights (``w_ij`` zeroed with probability
            ``dropout_p`` in ``[0, 1]``, survivors scaled by ``1 / (1 - dropout_p)``), as in
            SDPA (1: a zero output). Always applied when > 0: pass 0 at evaluation.
            Reproducible under ``torch.manual_seed`` (per implementation: the fused kernels
            draw their own masks, with ``dropout_p`` rounded to a multiple of 2^-16; see
            docs/kernels.md).
        row_range: ``(lo, hi)`` broadcastable to the rows ``(..., n)``: normalise with this
            fixed range instead of each row's own (treated as constants in backward). For
            combining calls over parts of one key set (a bank sharded across devices: see
            :func:`warp_range` and :mod:`simwarp.distributed`); a row may then keep no key of
            this call (zero output, ``lse = -inf``). A row whose ``lo`` and ``hi`` are both NaN
            (a NaN among its scores, as :func:`warp_range` reports it) gives a NaN row. Under
            ``impl="auto"`` the call streams over key blocks (chunked; not under
            ``torch.export``), as :func:`warp_range` does: with the same ``chunk_size`` both
            score the same similarity bits.

    Returns:
        ``(..., n, e)`` output, and with ``return_stats`` a :class:`WarpStats`. A row with no
        valid key outputs zeros and is flagged in ``stats.empty``; a row whose valid
        similarities are all equal gets uniform weights.

    Raises:
        TypeError / ValueError: on bad types, shapes, devices or parameter values.
        RuntimeError: ``impl="triton"`` with a range gradient under
            ``torch.use_deterministic_algorithms(True)`` (its backward adds atomically).
    """
    batch = check_inputs(q, k, v, mask, exclude_self, self_offset)
    spec = make_spec(metric, scale, step, temperature, causal, exclude_self, detach_range, self_offset, q.dtype)
    return_stats = as_flag("return_stats", return_stats)
    check_impl(impl)  # (also where no keys or rows leave nothing to compute)
    check_chunk_size(chunk_size)
    dropout_p = check_dropout_p(dropout_p)
    drop_all = dropout_p == 1.0  # every weight dropped: zero output and zero gradients through it
    if drop_all:
        dropout_p = 0.0
    n, m = q.shape[-2], k.shape[-2]
    dtype = work_dtype(q.dtype)
    a, b, t = resolve_params(a, b, t, batch=batch, n=n, dtype=dtype, device=q.device)
    row_range = _check_row_range(row_range, batch, n, dtype, q.device)
    if n == 0 or m == 0 or math.prod(batch) == 0:
        out = zeros_linked_to(q.new_zeros((*batch, n, v.shape[-1])), q, k, v, a, b, t)
        return (out, _empty_stats(batch, n, m, dtype, q.device)) if return_stats else out
    chosen = _choose_impl(impl, metric, math.prod(batch) * n * m, q.device, spec=spec, tensors=(q, k, v))
    if chosen == "triton" and row_range is not None:  # not in the fused kernels
        if impl == "triton":
            raise ValueError("impl='triton' does not support row_range; use impl='auto' or 'chunked'")
        chosen = "chunked"
    if chosen == "dense" and impl == "auto" and row_range is not None and spec.metric in STREAMING_METRICS and not exporting():
        # the key blocks of warp_range, where such a range comes from: the same similarity bits
        # (the dense path's one GEMM may round them otherwise, and a key at the row minimum
        # would then miss the log step's exact 0)
        chosen = "chunked"
    if chosen == "triton" and impl == "auto" and dropout_p > 0 and not FUSED_DROPOUT_BY_DEFAULT:
        chosen = "chunked"
    if chosen == "triton" and _fused_backward_uses_atomics(spec, k) and torch.are_deterministic_algorithms_enabled():
        chosen = _deterministic_instead_of_fused(impl)
    if chosen == "dense":
        out, stats = dense_warp_attend(q, k, v, a, b, t, mask, spec, dropout_p, row_range, with_stats=return_stats)
    elif chosen == "chunked":
        out, *rest = chunked_warp_attend(q, k, v, a, b, t, mask, spec, chunk_size, dropout_p, row_range)
        stats = WarpStats(*rest)
    else:
        from simwarp.backend.triton import triton_warp_attend

        try:
            out, stats = triton_warp_attend(q, k, v, a, b, t, mask, spec, count_kept=return_stats, dropout_p=dropout_p)
        except Exception as err:  # a kernel that fails to compile or launch on this GPU/toolchain
            if impl == "triton":
                raise
            warnings.warn(
                f"simwarp: the fused Triton kernels failed ({type(err).__name__}: {err}); "
                "impl='auto' falls back to the chunked backend. Pass impl='triton' to see the error.",
                RuntimeWarning,
                stacklevel=2,
            )
            out, *rest = chunked_warp_attend(q, k, v, a, b, t, mask, spec, chunk_size, dropout_p, row_range)
            stats = WarpStats(*rest)
    if drop_all:
        out = out * 0.0
    return (out, _no_count_on_nan_rows(stats)) if return_stats else out


def _fused_backward_uses_atomics(spec, k: torch.Tensor) -> bool:
    """Whether the fused backward adds range gradients into ``dk`` with atomics (rows share
    their extreme keys), so that ``dk`` may differ in its last bits from run to run."""
    return torch.is_grad_enabled() and k.requires_grad and spec.step.warps and not spec.detach_range


def _deterministic_instead_of_fused(impl: str) -> str:
    """Under ``torch.use_deterministic_algorithms(True)``: ``impl="auto"`` takes the chunked
    path (deterministic on every device); an explicit ``impl="triton"`` raises, or warns in
    ``warn_only`` mode, as PyTorch's own non-deterministic operations do."""
    if impl == "auto":
        return "chunked"
    message = ("simwarp's fused Triton backward adds the range gradient into the keys' gradient with atomic adds, "
               "which is not deterministic; use impl='auto' or 'chunked' under torch.use_deterministic_algorithms(True), "
               "or detach_range=True")
    if not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(message)
    warnings.warn(message, UserWarning, stacklevel=3)
    return "triton"


def _no_count_on_nan_rows(stats: WarpStats) -> WarpStats:
    """``kept`` NaN on a NaN row (a NaN or inf among its valid scores), where each path would count its own way."""
    return stats._replace(kept=stats.kept.masked_fill(stats.lse.isnan(), math.nan))


def _check_row_range(row_range, batch, n: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    if row_range is None:
        return None
    if not isinstance(row_range, (tuple, list)) or len(row_range) != 2:
        raise TypeError(f"row_range must be a (lo, hi) pair or None, got {type(row_range).__name__}")
    out = []
    for name, x in zip(("row_range[0] (lo)", "row_range[1] (hi)"), row_range):
        try:  # tensors, floats and real array-likes (NumPy arrays, lists)
            given = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            given = None
        if given is None or given.is_complex() or given.dtype == torch.bool:
            what = type(x).__name__ if given is None or not isinstance(x, torch.Tensor) else f"a tensor of dtype {x.dtype}"
            raise TypeError(f"{name} must hold real numbers (a tensor, a float or an array), got {what}")
        x = torch.as_tensor(x, dtype=dtype, device=x.device if isinstance(x, torch.Tensor) else "cpu").detach()
        if not broadcasts_to(x.shape, (*batch, n)):
            raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to the rows {(*batch, n)}")
        out.append(x)
    lo, hi = out
    # floats and CPU tensors: checked (accelerator tensors are not synchronised for a check)
    if lo.device.type == hi.device.type == "cpu" and not torch.compiler.is_compiling():
        poisoned = lo.isnan() & hi.isnan()  # a NaN among the row's scores (warp_range's report): a NaN row
        bad = ~((torch.isfinite(lo) & torch.isfinite(hi) & (lo <= hi)) | poisoned)
        if bool(bad.any()):
            raise ValueError(
                "row_range must hold finite lo <= hi (or NaN for both) for every row; mark rows without any "
                f"valid key by lo = hi = 0 (see docs/backend.md), got {int(bad.sum())} row(s) otherwise"
            )
    return lo.to(device), hi.to(device)


def _value_probe(k):
    """A stand-in ``v (..., m, 1)`` for :func:`check_inputs` where there are no values (a bad
    ``k`` passes through, for it to name)."""
    return k[..., :1].new_empty((*k.shape[:-1], 1)) if isinstance(k, torch.Tensor) and k.dim() >= 2 else k


@torch.no_grad()
@without_functorch
@outside_autocast
def warp_range(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    metric: str = "dot",
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    exclude_self: bool = False,
    self_offset: int = 0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1 alone: each row's similarity range over its valid keys, streaming (no gradients).

    ``q (..., n, d)``, ``k (..., m, d)`` and the options ``metric``, ``scale``, ``mask``,
    ``causal``, ``exclude_self``, ``self_offset``, ``chunk_size`` as in :func:`warp_attend`
    (a streaming metric: ``"l1"`` raises ``ValueError``).

    Returns ``(lo, hi, empty)``, each ``(..., n)``; rows with no valid key have ``lo = hi = 0``
    and ``empty = True``. Reduce the ranges of several key sets (min of ``lo``, max of ``hi``
    over the non-empty parts) and pass them back as ``warp_attend(..., row_range=(lo, hi))``
    with the same parts and ``chunk_size`` (a key block of another width may round a
    similarity differently: on rows of near-duplicate keys that moves them out of the band).
    """
    probe = _value_probe(k)
    batch = check_inputs(q, k, probe, mask, exclude_self, self_offset)
    spec = make_spec(metric, scale, "none", 1.0, causal, exclude_self, True, self_offset, q.dtype)
    check_chunk_size(chunk_size)
    if spec.metric not in STREAMING_METRICS:
        raise ValueError(f"warp_range streams over keys: metric must be one of {STREAMING_METRICS}, got {metric!r}")
    n, m, dtype = q.shape[-2], k.shape[-2], work_dtype(q.dtype)
    if n == 0 or m == 0 or math.prod(batch) == 0:
        stats = _empty_stats(batch, n, m, dtype, q.device)
        return stats.lo, stats.hi, stats.empty
    lo, hi, empty = chunked_warp_range(q, k, mask, spec, chunk_size)
    return lo.expand(*batch, n), hi.expand(*batch, n), empty.expand(*batch, n)


def _empty_stats(batch, n: int, m: int, dtype, device) -> WarpStats:
    zeros = torch.zeros((*batch, n), dtype=dtype, device=device)
    return WarpStats(
        lse=torch.full_like(zeros, -math.inf), kept=zeros, lo=zeros, hi=zeros,
        empty=torch.full((*batch, n), m == 0, dtype=torch.bool, device=device),
    )


@without_functorch
@outside_autocast
def warp_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    metric: str = "dot",
    scale: float | None = None,
    step: str = "sigmoidal",
    a: float | torch.Tensor | None = None,
    b: float | torch.Tensor | None = None,
    t: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    exclude_self: bool = False,
    self_offset: int = 0,
    temperature: float = 1.0,
    detach_range: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
    return_stats: bool = False,
    row_range: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
    columns: torch.Tensor | None = None,
    log: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WarpStats]:
    """The dense ``(..., n, m)`` weight matrix of :func:`warp_attend`, for analysis.

    Same arguments as :func:`warp_attend` without ``v`` and ``dropout_p`` (``impl`` and
    ``chunk_size`` are checked and ignored: the matrix is materialised, its similarities from one
    product over all keys, so with a ``row_range`` from :func:`warp_range` they may round
    differently from its key blocks: docs/backend.md). Rows sum to 1 over valid keys; rows without a valid
    key are all zero. With ``return_stats`` also returns :class:`WarpStats`. The weights are in
    the compute dtype: float32 for float16/bfloat16 inputs (small weights stay resolved).

    ``columns``: int64 key indices ``(..., n, c)`` (leading dims broadcastable to the batch):
    return only the weights at those keys, ``w.gather(-1, columns)`` of shape ``(..., n, c)``.
    The gradient then never forms a dense ``(..., n, m)`` gradient of the weights, which makes
    "weight mass on a few chosen neighbours" objectives (NCA) cheaper than gathering from ``w``.

    ``log``: return the log-weights ``log w_ij = ℓ_ij − lse_i`` instead (``-inf`` where the
    weight is exactly 0: dropped by the step, masked, or every key of a row without a valid
    one), computed from the logits as ``torch.log_softmax`` is, so a weight far below the row's
    largest stays resolved where ``w`` underflows to 0 (at about ``87 · temperature`` below it
    in float32).
    """
    check_impl(impl)  # accepted for warp_attend's signature, checked as there, then unused
    check_chunk_size(chunk_size)
    log = as_flag("log", log)
    probe = _value_probe(k)
    batch = check_inputs(q, k, probe, mask, exclude_self, self_offset)
    spec = make_spec(metric, scale, step, temperature, causal, exclude_self, detach_range, self_offset, q.dtype)
    return_stats = as_flag("return_stats", return_stats)
    n, m, dtype = q.shape[-2], k.shape[-2], work_dtype(q.dtype)
    a, b, t = resolve_params(a, b, t, batch=batch, n=n, dtype=dtype, device=q.device)
    row_range = _check_row_range(row_range, batch, n, dtype, q.device)
    _check_columns(columns, batch, n, m, q.device)
    if n == 0 or m == 0 or math.prod(batch) == 0:
        width = m if columns is None else columns.shape[-1]
        w = zeros_linked_to(q.new_full((*batch, n, width), -math.inf if log else 0.0, dtype=dtype), q, k, a, b, t)
        return (w, _empty_stats(batch, n, m, dtype, q.device)) if return_stats else w
    w, stats = dense_weights(q, k, a, b, t, mask, spec, row_range, with_stats=return_stats, columns=columns, log=log)
    return (w, _no_count_on_nan_rows(stats)) if return_stats else w


def _check_columns(columns, batch, n: int, m: int, device: torch.device) -> None:
    if columns is None:
        return
    if not isinstance(columns, torch.Tensor) or columns.dtype != torch.int64:
        raise TypeError(f"columns must be an int64 tensor of key indices or None, got {_describe(columns)}")
    if columns.device != device:
        raise ValueError(f"columns must be on q's device {device}, got {columns.device}")
    if columns.dim() < 2 or columns.shape[-2] != n or not broadcasts_to(columns.shape[:-2], batch):
        raise ValueError(f"columns of shape {tuple(columns.shape)} must be (..., n, c) with n = {n} and leading dims "
                         f"broadcastable to {tuple(batch)}")
    if columns.device.type == "cpu" and columns.numel():
        low, high = (int(x) for x in torch.aminmax(columns))
        if low < 0 or high >= m:
            raise ValueError(f"columns must index the m = {m} keys, got values in [{low}, {high}]")


def _describe(x) -> str:
    return f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
