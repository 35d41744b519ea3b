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

``l2`` and ``sqeuclidean`` come from norms and one product, ``|q|² + |k|² - 2 q·k``, whose
rounding grows with the norms: on features far from the origin (raw years, prices) float32
would lose the distances to cancellation. They are computed on ``q - c`` and ``k - c`` instead,
``c`` a point among the queries (:func:`distance_centre`; distances do not change).
"""

from __future__ import annotations

import numbers

import torch

from simwarp._autograd import exporting, first_order, is_finite_real, outside_autocast, unaliased

METRICS: tuple[str, ...] = ("dot", "cosine", "l2", "sqeuclidean", "l1")
STREAMING_METRICS: tuple[str, ...] = ("dot", "cosine", "l2", "sqeuclidean")

#: The metrics computed from norms and a product (:func:`distance_centre` applies).
DISTANCE_METRICS: tuple[str, ...] = ("l2", "sqeuclidean")


def check_metric(metric: str) -> None:
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def default_scale(metric: str, dim: int) -> float:
    """The scale used when ``scale=None``: ``dim ** -0.5`` for ``dot``, else 1."""
    return dim**-0.5 if metric == "dot" else 1.0


class _SafeSqrt(torch.autograd.Function):
    # y = sqrt(max(x, 0)); ∂x = g / (2 y), taken as 0 where y = 0. The reciprocal is formed as
    # y / (y² + tiny), which is 1/y to within float rounding for every y that can come out of a
    # squared distance, and exactly 0 at y = 0, without a data-dependent select.
    @staticmethod
    def forward(ctx, x):
        y = x.clamp_min(0.0).sqrt_()
        ctx.save_for_backward(y)
        return unaliased(y)

    @staticmethod
    @first_order
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _safe_reciprocal(y).mul_(g).mul_(0.5)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))`` whose gradient is 0 (not inf or NaN) where ``x <= 0``."""
    return _SafeSqrt.apply(x)


#: At most this many rows (evenly strided) make :func:`distance_centre`: a point inside the
#: data's cloud, at the cost of a few thousand rows however large the set.
_CENTRE_ROWS = 1024


def queries_centre(q: torch.Tensor, metric: str) -> torch.Tensor | None:
    """:func:`distance_centre` of the queries ``q`` for ``l2`` / ``sqeuclidean`` (what
    :class:`PreparedKeys` takes to score them with the bits of :func:`pairwise_similarity`),
    ``None`` for the other metrics."""
    return distance_centre(q) if metric in DISTANCE_METRICS else None


def distance_centre(x: torch.Tensor) -> torch.Tensor:
    """``(..., 1, d)``: the coordinate-wise median of the finite rows of ``x`` ``(..., n, d)``
    (of ``_CENTRE_ROWS`` of them, evenly strided, in a larger set; 0 where there are none),
    without gradient.

    Distances are computed between ``q - c`` and ``k - c``, with ``c`` this point of the
    queries: the same distances, with the rounding of ``|q - c|² + |k - c|² - 2 (q - c)·(k - c)``
    set by the distances and the queries' spread instead of the data's distance from the
    origin. The queries, because every pass over the keys (their blocks, the shards of a bank)
    scores them against the same ``c`` and so the same bits; the median, because an outlier
    (or a far-away masked row) does not move it; and a NaN or inf row stays out of it, so that
    it reaches only its own scores."""
    x = x.detach()
    if not exporting() and x.shape[-2] > _CENTRE_ROWS:  # (export: a size test would cap the dynamic range)
        x = x[..., :: -(-x.shape[-2] // _CENTRE_ROWS), :]
    finite = torch.isfinite(x).all(-1, keepdim=True)
    median = torch.where(finite, x, torch.nan).nanmedian(-2, keepdim=True).values
    return median.nan_to_num(nan=0.0)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x / ‖x‖`` along the last dim, the ``cosine`` metric's normalisation. Rows with norm at
    most ``1e-12`` (a zero, padding or dead-ReLU embedding: no direction) become 0 with gradient
    0, as ``l2``'s safe square root does at distance 0; ``F.normalize`` would give them a
    gradient of ``1 / eps`` (``1e12``, inf once cast to float16). Differentiable twice."""
    if x.dtype in (torch.float16, torch.bfloat16):  # 1e-12 is 0 there: a zero row's gradient would be 0/0
        return unit_rows(x.float()).to(x.dtype)
    # 1e-12 written here, not as a module-level float: torch.compile(dynamic=True) lifts those
    # as symbolic inputs, which fails inside an autograd.Function called twice in one graph
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.where(norm <= 1e-12, 0.0, x / norm.clamp_min(1e-12))  # NaN rows stay NaN


def unit_rows_backward(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``∂/∂x`` of ``Σ g · unit_rows(x)`` (the same rows of norm at most ``1e-12`` get 0):
    ``(g - x̂ (x̂ · g)) / ‖x‖`` row by row, for the streaming backward passes."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    inv = torch.where(norm <= 1e-12, 0.0, 1.0 / norm.clamp_min(1e-12))
    unit = x * inv
    return (g - unit * (unit * g).sum(-1, keepdim=True)).mul_(inv)


def _plus_transpose(g: torch.Tensor) -> torch.Tensor:
    """``g + gᵀ`` of a square matrix (``copy_`` has a fast path for a transposed source; the
    elementwise ``g + g.T`` is 4x slower)."""
    return torch.empty_like(g).copy_(g.T).add_(g)


def _owned(out: torch.Tensor) -> torch.Tensor:
    """A custom Function's output as a tensor of its own: matmul returns a view for a broadcast
    query row against batched keys, and autograd forbids in-place writes to a view made inside
    a custom Function, which callers make to the scores (leave-one-out's diagonal)."""
    return out.clone() if out._base is not None else out


def _matmul_t(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q kᵀ`` without autograd, the same bits whether or not ``q``, ``k`` require gradients:
    ``torch.matmul`` folds batch dims into one GEMM or not depending on its operands'
    ``requires_grad`` flags (not on the grad mode), and the two GEMMs round differently, so a
    training call would score other similarities than ``warp_range`` under ``no_grad``."""
    return torch.matmul(q.detach(), k.detach().transpose(-1, -2))


class _Gram(torch.autograd.Function):
    # q kᵀ, or q qᵀ when k is None (all pairs of one batch: passed once, as torch.compile cannot
    # trace a tensor given twice); backward ∂q = g k, ∂k = gᵀ q, or ∂q = (g + gᵀ) q for q qᵀ.
    # The backward is made of differentiable operations, so double backward works as through
    # a plain matmul.
    @staticmethod
    def forward(ctx, q, k):
        ctx.save_for_backward(q, k)
        return unaliased(_owned(_matmul_t(q, q if k is None else k)))

    @staticmethod
    def backward(ctx, g):
        q, k = ctx.saved_tensors
        if k is None:
            if q.dim() == 2:
                return _plus_transpose(g) @ q, None
            return (g + g.transpose(-1, -2)) @ q, None
        return _gram_grads(g, q, k, *ctx.needs_input_grad)


def _gram_grads(g, q, k, need_q: bool = True, need_k: bool = True):
    """``(∂q, ∂k)`` of ``Σ g ⊙ q kᵀ``: ``g k`` and ``gᵀ q`` (``None`` where not needed), reduced
    to ``q``'s and ``k``'s shapes (differentiable: :class:`_Gram`'s double backward)."""
    gq = torch.matmul(g, k).sum_to_size(q.shape) if need_q else None
    gk = torch.matmul(g.transpose(-1, -2), q).sum_to_size(k.shape) if need_k else None
    return gq, gk


def _gram(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q kᵀ`` through :class:`_Gram` (``q`` given once when ``k is q``)."""
    return _Gram.apply(q, None if k is q else k)


class _ScaledSquaredDistance(torch.autograd.Function):
    # c · d²_ij with d²_ij = |q_i|² + |k_j|² - 2 q_i·k_j on rows centred at a point of the queries
    # (distance_centre), clamped to c·d² ∈ c·[0, ∞) against rounding. The backward is that of
    # the smooth expression (the clamp only ever acts on numerically-zero distances, where the
    # true gradient is 0 too), on the centred rows (the centre is a constant, and the distance
    # does not depend on it): with G = c g, ∂q = 2 (q Σ_j G - G k),  ∂k = 2 (k Σ_i G - Gᵀ q);
    # when q is k, their sum 2 (q Σ_j (G + Gᵀ) - (G + Gᵀ) q). As in _Gram, k is None when the
    # pairs are q's own.
    @staticmethod
    def forward(ctx, q, k, c: float, centre):
        ctx.shapes = q.shape, None if k is None else k.shape  # (a centre with more batch dims broadcasts q)
        if centre is None:
            centre = distance_centre(q)
        q, k = q - centre, None if k is None else k - centre
        ctx.save_for_backward(q, k)
        ctx.c = c
        k = q if k is None else k
        qq, kk = squared_norms(q).unsqueeze(-1).mul_(c), squared_norms(k).mul_(c)
        out = _norms_plus_gram(q, k, kk, alpha=-2.0 * c, beta=1.0).add_(qq)
        return unaliased(_owned(out.clamp_min_(0.0) if c > 0 else out.clamp_max_(0.0)))

    @staticmethod
    @first_order
    def backward(ctx, g):
        q, k = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        if k is None:
            g = _plus_transpose(g) if g.dim() == 2 else g + g.transpose(-1, -2)
            return (q * g.sum(-1, keepdim=True) - g @ q).mul_(2.0 * ctx.c).sum_to_size(q_shape), None, None, None
        need_q, need_k = ctx.needs_input_grad[:2]
        gq, gk = _squared_distance_grads(g, q, k, 2.0 * ctx.c, need_q, need_k)
        return None if gq is None else gq.sum_to_size(q_shape), None if gk is None else gk.sum_to_size(k_shape), None, None


def _squared_distance_grads(g, q, k, factor: float, need_q: bool = True, need_k: bool = True):
    """``(∂q, ∂k)`` of ``Σ_ij g_ij · factor/2 · ‖q_i - k_j‖²``: ``factor (q Σ_j g - g k)`` and
    ``factor (k Σ_i g - gᵀ q)`` (``None`` where not needed), reduced to ``q``'s and ``k``'s
    shapes. The factor is applied to the small (rows × d) results."""
    gq = gk = None
    if need_q:
        gq = (q * g.sum(-1, keepdim=True) - torch.matmul(g, k)).mul_(factor).sum_to_size(q.shape)
    if need_k:
        gk = (k * g.sum(-2).unsqueeze(-1) - torch.matmul(g.transpose(-1, -2), q)).mul_(factor).sum_to_size(k.shape)
    return gq, gk


#: Entries per slice in :func:`squared_norms` (1 MiB temporaries in float32).
_NORM_SLICE_ELEMENTS = 1 << 18


def squared_norms(x: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """``|x_i - centre|²`` over the last dim, ``(..., m, d) -> (..., m)`` (``centre``:
    ``(..., 1, d)`` or ``None`` for 0), in slices of rows: no temporary the size of ``x`` (a
    neighbour bank can be large). Row by row the same bits as ``(x - centre).pow(2).sum(-1)``."""

    def norms(rows: torch.Tensor) -> torch.Tensor:
        return (rows if centre is None else rows - centre).pow(2).sum(-1)

    if x.dim() < 2 or exporting():  # export: a size test would cap the program's dynamic range
        return norms(x)
    rows = max(1, _NORM_SLICE_ELEMENTS // max(1, x[..., :1, :].numel()))
    if x.shape[-2] <= rows:
        return norms(x)
    out = x.new_empty((x.shape if centre is None else torch.broadcast_shapes(x.shape, centre.shape))[:-1])
    for start in range(0, x.shape[-2], rows):  # into one buffer: results kept between the
        # freed temporaries would fragment the heap (glibc then grows it by every temporary)
        out[..., start : start + rows] = norms(x[..., start : start + rows, :])
    return out


def _norms_plus_gram(q: torch.Tensor, k: torch.Tensor, norms: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``beta · norms_j + alpha · q_i·k_j`` ``(..., n, m)`` for key norms ``(..., m)`` and
    ``beta = ±1``: one GEMM with the norms as its C operand for matrices. The squared distance
    and :class:`PreparedKeys` share it, so that their scores agree to the bit for contiguous
    inputs (the streaming backward recomputes the forward's similarities)."""
    if q.dim() == 2 and k.dim() == 2:
        return torch.addmm(norms, q, k.T, beta=beta, alpha=alpha)
    out = _matmul_t(q, k).mul_(alpha)
    return out.add_(norms.unsqueeze(-2)) if beta == 1.0 else out.sub_(norms.unsqueeze(-2))


def _squared_distance(q: torch.Tensor, k: torch.Tensor, c: float = 1.0, centre: torch.Tensor | None = None) -> torch.Tensor:
    """``(..., n, m)`` squared Euclidean distances between the rows of ``q`` and ``k``, times ``c``,
    computed on the rows minus ``centre`` (default :func:`distance_centre` of ``q``)."""
    return _ScaledSquaredDistance.apply(q, None if k is q else k, c, None if centre is None else centre.detach())


def _check_pair(q, k, scale, k_layout: str) -> None:
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape (..., rows, d) with d >= 1, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (..., n, d) and k {k_layout} must share d, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    rows = 1 if k_layout == "(..., n, d)" else 2  # paired rows broadcast too; pairwise rows need not
    pairs = zip(reversed(q.shape[:-rows]), reversed(k.shape[:-rows]))
    # (eager only: traced sizes may be data-dependent, where the ops' own checks become assertions)
    if not torch.compiler.is_compiling() and not all(a == b or 1 in (a, b) for a, b in pairs):
        raise ValueError(f"leading dims of q {tuple(q.shape)} and k {tuple(k.shape)} do not broadcast")
    if scale is None or isinstance(scale, torch.Tensor):  # a tensor scale may be learned
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a finite number, a tensor or None, got {type(scale).__name__}")
    if not is_finite_real(scale):
        raise ValueError(f"scale must be a finite number, a tensor or None, got {scale!r}")


@outside_autocast
def pairwise_similarity(
    q: torch.Tensor, k: torch.Tensor, metric: str = "dot", scale: float | None = None, *,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """All-pairs similarity (larger = more similar: distances come negated).

    Args:
        q: queries ``(..., n, d)``.
        k: keys ``(..., m, d)``; leading dims broadcast with ``q``'s.
        metric: ``"dot"`` (``q·k``), ``"cosine"``, ``"l2"`` (``-‖q - k‖``), ``"sqeuclidean"``
            (``-‖q - k‖²``) or ``"l1"`` (``-Σ|q - k|``).
        scale: multiplier (any real, or a tensor broadcasting against ``(..., n, m)``: a
            learnable one works here); ``None`` = ``d ** -0.5`` for ``"dot"``, else 1.
        centre: ``l2`` and ``sqeuclidean``: the point ``(..., 1, d)`` the distances are
            computed from (default :func:`distance_centre` of ``q``; no gradient flows into it).
            The distances do not depend on it, their rounding does: pass the centre of all
            queries to score blocks of them with the bits of one call. Ignored by the other
            metrics.

    Returns:
        ``(..., n, m)`` similarities.

    Raises:
        TypeError: for ``q``/``k`` that are not floating-point tensors of one dtype, or a
            ``scale`` that is not a number, a tensor or ``None``.
        ValueError: for an unknown ``metric``, shapes that do not fit (naming them), tensors on
            two devices, or a non-finite ``scale``.
    """
    check_metric(metric)
    _check_pair(q, k, scale, "(..., m, d)")
    if centre is not None and not (
        isinstance(centre, torch.Tensor) and centre.dtype == q.dtype and centre.device == q.device
        and centre.dim() >= 2 and centre.shape[-2:] == (1, q.shape[-1])
    ):
        raise ValueError(
            f"centre must be a {q.dtype} tensor of shape (..., 1, {q.shape[-1]}) on {q.device} (as q) or None, "
            f"got {centre.dtype} {tuple(centre.shape)} on {centre.device}" if isinstance(centre, torch.Tensor)
            else f"centre must be a tensor or None, got {type(centre).__name__}"
        )
    c = default_scale(metric, q.shape[-1]) if scale is None else scale
    if metric == "dot":
        s = _gram(q, k)
    elif metric == "cosine":
        qn = unit_rows(q)
        s = _gram(qn, qn if k is q else unit_rows(k))
    elif metric == "sqeuclidean":
        if not isinstance(c, torch.Tensor):  # (the factor of the autograd function is a constant)
            return _squared_distance(q, k, -c, centre)
        s = -_squared_distance(q, k, 1.0, centre)
    elif metric == "l2":
        s = -safe_sqrt(_squared_distance(q, k, 1.0, centre))  # (c given: a float default would be lifted, as above)
    else:  # l1: materialises (..., n, m, d); dense path only
        s = -(q.unsqueeze(-2) - k.unsqueeze(-3)).abs().sum(-1)
    return s * c if isinstance(c, torch.Tensor) or c != 1.0 else s


def _safe_reciprocal(y: torch.Tensor) -> torch.Tensor:
    """``1 / y`` for distances ``y >= 0``, and 0 at ``y = 0`` (:class:`_SafeSqrt`'s form)."""
    return (y * y).add_(torch.finfo(y.dtype).tiny).reciprocal_().mul_(y)


def pairwise_similarity_backward(
    g: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    s: torch.Tensor,
    metric: str,
    scale: float | None = None,
    need_q: bool = True,
    need_k: bool = True,
    centre: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂q, ∂k)`` of ``Σ g ⊙ pairwise_similarity(q, k, metric, scale)``, written out, without
    autograd: the streaming backward passes call it once per key block, and
    ``torch.compile`` traces it (it cannot trace ``torch.autograd.grad``). The same gradients
    as autograd through :func:`pairwise_similarity` (``l2``: 0 at distance 0).

    Args:
        g: ``(..., n, m)`` gradient of the similarities.
        q, k: ``(..., n, d)`` and ``(..., m, d)``, as passed to :func:`pairwise_similarity`.
        s: ``(..., n, m)`` their similarities (``l2`` reads its distances from them).
        metric: one of :data:`STREAMING_METRICS`; ``scale``: as in :func:`pairwise_similarity`.
        need_q, need_k: which gradients to compute (the other comes back ``None``).
        centre: ``l2``/``sqeuclidean``: the point the rows are centred at (default
            :func:`distance_centre` of ``q``); pass the forward's to save computing it again.

    Returns:
        ``∂q`` shaped like ``q`` and ``∂k`` like ``k`` (broadcast dims summed).
    """
    c = default_scale(metric, q.shape[-1]) if scale is None else scale
    if metric in ("dot", "cosine"):
        g = g * c if c != 1.0 else g
        qs, ks = (unit_rows(q), unit_rows(k)) if metric == "cosine" else (q, k)
        gq, gk = _gram_grads(g, qs, ks, need_q, need_k)
        if metric == "cosine":
            gq = None if gq is None else unit_rows_backward(q, gq)
            gk = None if gk is None else unit_rows_backward(k, gk)
        return gq, gk
    if metric not in DISTANCE_METRICS:
        raise ValueError(f"metric must be one of {STREAMING_METRICS}, got {metric!r}")
    if centre is None:  # (any point near the data: the gradients do not depend on it)
        centre = distance_centre(q)
    if metric == "l2":  # s = -c y, y = ‖q - k‖: ∂s/∂(y²) = -c / (2 y)
        g, c = g * _safe_reciprocal(s / -c), c / 2.0
    gq, gk = _squared_distance_grads(g, q - centre, k - centre, -2.0 * c, need_q, need_k)
    return None if gq is None else gq.sum_to_size(q.shape), None if gk is None else gk.sum_to_size(k.shape)


def paired_similarity_backward(
    g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, metric: str, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂q, ∂k)`` of ``Σ g ⊙ paired_similarity(q, k, metric, scale)`` without autograd (see
    :func:`pairwise_similarity_backward`). ``g``: ``(..., n)``; ``q``, ``k``: ``(..., n, d)``
    of one shape; returns two ``(..., n, d)`` tensors."""
    c = default_scale(metric, q.shape[-1]) if scale is None else scale
    g = (g * c if c != 1.0 else g).unsqueeze(-1)
    if metric == "dot":
        return g * k, g * q
    if metric == "cosine":
        return unit_rows_backward(q, g * unit_rows(k)), unit_rows_backward(k, g * unit_rows(q))
    if metric in ("sqeuclidean", "l2"):
        diff = q - k
        if metric == "sqeuclidean":
            gq = diff.mul_(-2.0 * g)
        else:  # ∂‖q - k‖/∂q = (q - k) / ‖q - k‖, 0 at distance 0
            gq = diff.mul_(_safe_reciprocal(torch.linalg.vector_norm(diff, dim=-1, keepdim=True)).mul_(-g))
        return gq, -gq
    raise ValueError(f"metric must be one of {STREAMING_METRICS}, got {metric!r}")


class PreparedKeys:
    """The per-key half of :func:`pairwise_similarity`, done once for many query or key blocks.

    :meth:`scores` gives, for queries ``q`` and keys ``k[..., start:stop, :]``, a score ``r``
    that holds all the per-key work in one GEMM (``dot``: ``q·k``; ``cosine``: ``q·k̂`` on unit
    keys; ``l2`` and ``sqeuclidean``: ``2 q·k - |k|²`` on ``q - centre`` and ``k - centre``, up
    to a positive factor, with the key norms computed here), so that each row's similarities
    are a non-decreasing function of its scores (:meth:`BlockSimilarity.similarity_`). Row maxima, minima and top-k can therefore be
    taken on ``r``. ``l1`` has no such split: its scores are its similarities. For use without
    autograd (detached inputs, ``torch.no_grad`` or inside an autograd function's forward).

    Args:
        keys: ``(..., m, d)``.
        metric: one of :data:`METRICS`.
        scale: the similarity's positive multiplier (``None``: :func:`default_scale`); only
            ``sqeuclidean`` folds it into the scores.
        centre: ``l2`` and ``sqeuclidean``: the point ``(..., 1, d)`` queries and keys are
            scored from (:func:`distance_centre`; default: that of the keys). Pass that of the
            queries to score them with the bits of :func:`pairwise_similarity`.
    """

    def __init__(
        self, keys: torch.Tensor, metric: str = "dot", scale: float | None = None, *, unit_keys_once: bool = True,
        centre: torch.Tensor | None = None,
    ) -> None:
        check_metric(metric)
        self.metric = metric
        self.scale = default_scale(metric, keys.shape[-1]) if scale is None else scale
        if isinstance(self.scale, torch.Tensor) or not self.scale > 0:
            raise ValueError(f"scale must be a positive float or None, got {scale!r}")
        # cosine: a unit copy of all keys, or (unit_keys_once=False) each block normalised as
        # it is scored: O(block) memory, the bits of pairwise_similarity on that block.
        self.unit_blocks = metric == "cosine" and not unit_keys_once
        self.keys = unit_rows(keys) if metric == "cosine" and unit_keys_once else keys
        self.norms, self.alpha, self.beta, self.centre = None, 1.0, 1.0, None
        if metric in DISTANCE_METRICS:  # queries and keys centred (distance_centre), block by block
            self.centre = distance_centre(keys) if centre is None else centre.detach()
        if metric == "l2":  # r = 2 q·k - |k|²; the scale applies after the square root
            self.norms, self.alpha, self.beta = squared_norms(keys, self.centre), 2.0, -1.0
        elif metric == "sqeuclidean":  # exactly the first step of _ScaledSquaredDistance(c = -scale)
            self.norms, self.alpha = squared_norms(keys, self.centre).mul_(-self.scale), 2.0 * self.scale

    def scores(self, q: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(..., n, stop - start)`` scores of queries ``q`` ``(..., n, d)`` against keys
        ``start:stop`` (all keys by default)."""
        k = self.keys[..., start:stop, :]
        if self.unit_blocks:
            k = unit_rows(k)
        if self.metric == "l1":
            return pairwise_similarity(q, k, "l1", 1.0)
        if self.norms is None:
            return _matmul_t(q, k)
        return _norms_plus_gram(q - self.centre, k - self.centre, self.norms[..., start:stop], self.alpha, self.beta)


class BlockSimilarity:
    """``pairwise_similarity(q, k, metric, scale)`` key block by key block, without autograd
    (inside the streaming passes' forward): :meth:`scores` (one GEMM per block; the query side
    and the key norms prepared once per call, :class:`PreparedKeys`; memory ``O(n + m)``
    besides the blocks) and :meth:`similarity_`, each row's non-decreasing map from scores to
    similarities. A row's extremes over keys can therefore be taken on the scores and only the
    extremes mapped (one square root per row instead of one per score for ``l2``). For
    contiguous inputs the similarities are the bits :func:`pairwise_similarity` computes for
    the same blocks (other layouts may take other GEMM kernels: an ulp apart).

    Args:
        q: queries ``(..., n, d)``; ``k``: keys ``(..., m, d)`` (leading dims broadcast).
        metric: one of :data:`METRICS`; ``scale``: a positive multiplier or ``None``
            (:func:`default_scale`).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, metric: str, scale: float | None) -> None:
        self.keys = PreparedKeys(k, metric, scale, unit_keys_once=False, centre=queries_centre(q, metric))
        self.metric, self.scale = metric, self.keys.scale
        self.q = unit_rows(q) if metric == "cosine" else q
        self.q_norms = None
        if metric in DISTANCE_METRICS:
            self.q_norms = squared_norms(q, self.keys.centre).unsqueeze(-1)
            if metric == "sqeuclidean":
                self.q_norms.mul_(-self.scale)

    def scores(self, start: int, stop: int, row_start: int = 0) -> torch.Tensor:
        """``(..., n - row_start, stop - start)`` scores of query rows ``row_start:`` against
        keys ``start:stop``."""
        return self.keys.scores(rows_from(self.q, row_start), start, stop)

    def similarity_(self, r: torch.Tensor, row_start: int = 0) -> torch.Tensor:
        """Similarities of query rows ``row_start:`` from their scores ``r`` ``(..., rows, ·)``,
        in place. ``±inf`` scores (an empty row's extremes) may map to finite values: test
        emptiness on the scores."""
        c = self.scale
        if self.metric == "l2":  # |q - k|² = |q|² - (2 q·k - |k|²)
            s = r.neg_().add_(rows_from(self.q_norms, row_start)).clamp_min_(0.0).sqrt_().neg_()
            return s.mul_(c) if c != 1.0 else s
        if self.metric == "sqeuclidean":
            return r.add_(rows_from(self.q_norms, row_start)).clamp_max_(0.0)
        return r.mul_(c) if c != 1.0 else r


def rows_from(x: torch.Tensor | None, row_start: int) -> torch.Tensor | None:
    """Rows ``row_start:`` of a per-row tensor ``(..., n, ·)``; ``None``, broadcast tensors
    (size 1 there, or fewer than 2 dims) and ``row_start = 0`` pass through."""
    if x is None or row_start == 0 or x.dim() < 2 or x.shape[-2] == 1:
        return x
    return x[..., row_start:, :]


@outside_autocast
def paired_similarity(
    q: torch.Tensor, k: torch.Tensor, metric: str = "dot", scale: float | None = None
) -> torch.Tensor:
    """Row-wise similarity ``sim(q[..., i, :], k[..., i, :])``; same function as
    :func:`pairwise_similarity` on its diagonal. ``q``, ``k``: ``(..., n, d)`` → ``(..., n)``."""
    check_metric(metric)
    _check_pair(q, k, scale, "(..., n, d)")
    c = default_scale(metric, q.shape[-1]) if scale is None else scale
    if metric == "dot":
        s = (q * k).sum(-1)
    elif metric == "cosine":
        s = (unit_rows(q) * unit_rows(k)).sum(-1)
    elif metric == "sqeuclidean":
        s = -(q - k).pow(2).sum(-1)
    elif metric == "l2":
        s = -safe_sqrt((q - k).pow(2).sum(-1))
    else:
        s = -(q - k).abs().sum(-1)
    return s * c if isinstance(c, torch.Tensor) or c != 1.0 else s
