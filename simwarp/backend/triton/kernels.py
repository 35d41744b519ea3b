"""Triton kernels of the fused SoftStep backend (forward: two passes; backward: dq and dk/dv).

Layout: every tensor is addressed as ``(B0, B1, rows, cols)`` with arbitrary strides (stride 0
for broadcast dims), so broadcast leading dims never materialise. Row statistics and step
parameters are contiguous ``(fields, B, n)`` buffers. Accumulation is in ``ACC`` (float32,
or float64 for float64 inputs in the interpreter).

Codes (constexpr): ``METRIC`` 0 = dot (cosine is dot on pre-normalised inputs), 1 = sqeuclidean,
2 = l2. ``STEP`` 0 = none, 1 = sigmoidal, 2 = log, 3 = poly.

The largest logit of every non-empty row is known after pass 1: the row's argmax key has
``u = 1 >= b`` so ``φ = 0`` and ``ℓ = hi / τ``, while ``φ <= 0`` everywhere. Pass 2 therefore
needs no running max: ``p = exp2((s - hi) / τ · log2 e) · m(u)`` and partial sums over key
splits combine by plain addition.

This file is loaded twice by :mod:`simwarp.backend.triton.launch`: once normally (CUDA) and
once with ``TRITON_INTERPRET=1`` (CPU tensors in the interpreter).
"""

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: Rows per tile maximum of pass 1: 16 consecutive rows lie in one warp in the MMA layouts
#: (sm_80 and sm_90), so the maximum needs no reduction across warps (no barrier per tile).
TMAX_ROWS = tl.constexpr(16)


# ---------------------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------------------


@triton.jit
def _dot(x, y, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """``x @ y`` accumulated in ``ACC``. ``UPCAST`` (the CPU interpreter, 16- and 32-bit inputs)
    sums float64 products of the same values and rounds once: NumPy's matmul knows no
    bfloat16, and its float32 rounding depends on the operands' shapes, so the backward's tiles
    would not reproduce pass 1's scores bit for bit as the GPU's do (the pins of
    ``_step_coord`` and ``_score_grad`` need that)."""
    if UPCAST:
        r = tl.dot(x.to(tl.float64), y.to(tl.float64), input_precision="ieee", out_dtype=tl.float64).to(ACC)
    else:
        r = tl.dot(x, y, input_precision=PREC, out_dtype=ACC)
    return r


@triton.jit
def _halves(r):
    """The two 16-bit halves of a uint32 tile, interleaved along the last axis (int32)."""
    return tl.interleave((r & 0xFFFF).to(tl.int32), (r >> 16).to(tl.int32))


@triton.jit
def _dropout_keep(seed, batch, offs_m, col0, threshold, BLOCK_N: tl.constexpr):
    """Which scores of the tile ``(rows offs_m, keys col0 .. col0 + BLOCK_N)`` of batch entry
    ``batch`` survive dropout (a bool tile).

    Key ``j`` of row ``i`` is dropped when its 16-bit draw is below ``threshold``. The draws are
    a function of ``(seed, batch, i, j)`` alone, so the forward and both backward kernels see
    the same mask whatever their tile shapes: one Philox-4x32 call per group of eight keys
    (counters ``j // 8``, ``i``, ``batch``, 0) gives eight 16-bit draws, as FlashAttention
    takes several draws from each call. ``col0`` and ``BLOCK_N`` are multiples of 8."""
    groups = col0 // 8 + tl.arange(0, BLOCK_N // 8)
    c0 = (groups[None, :] + offs_m[:, None] * 0).to(tl.uint32)
    c1 = (offs_m[:, None] + groups[None, :] * 0).to(tl.uint32)
    c2 = c1 * 0 + batch.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c1 * 0)
    draws = tl.interleave(tl.interleave(_halves(r0), _halves(r1)), tl.interleave(_halves(r2), _halves(r3)))
    return draws >= threshold


@triton.jit
def _dropout_constants(SEED, CONSTS, like, DROPOUT: tl.constexpr):
    """``(seed, keep_scale)`` of a launch: the Philox key and ``1 / P(keep)`` (``CONSTS[2]``);
    placeholders (never used) without dropout. ``like``: a scalar of the accumulator dtype."""
    seed = 0
    keep_scale = like
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = tl.load(CONSTS + 2)
    return seed, keep_scale


@triton.jit
def _tile_and_batch(tiles):
    """This program's ``(tile, batch entry)`` for ``tiles`` tiles per batch entry, both folded
    into grid axis 0 (tiles fastest, as a ``(tiles, B)`` grid orders them): CUDA limits grid
    axes 1 and 2 to 65535 programs, and a batch of ``B · H`` entries (window attention, GQA)
    can be larger. Launches size axis 0 with :func:`simwarp.backend.triton.launch.grid`."""
    pid = tl.program_id(0)
    return pid % tiles, pid // tiles


@triton.jit
def _query_block_and_batch(n, BLOCK_M: tl.constexpr, LAST_FIRST: tl.constexpr):
    """:func:`_tile_and_batch` over blocks of ``BLOCK_M`` query rows; with ``LAST_FIRST`` each
    batch entry's blocks run last to first. Under a causal mask the last block sees the most
    keys, so the grid's tail is then left to the blocks with the least work (the
    longest-processing-time-first order of FlashAttention-3's scheduler)."""
    tiles = tl.cdiv(n, BLOCK_M)
    tile, batch = _tile_and_batch(tiles)
    if LAST_FIRST:
        tile = tiles - 1 - tile
    return tile, batch


@triton.jit
def dropout_mask_kernel(SEED, KEEP, n, m, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which scores survive dropout, ``KEEP (B, n, m)`` (int8): the mask the attention kernels
    apply for ``SEED`` (a reference for tests, and for users who need the mask)."""
    q_tiles = tl.cdiv(n, BLOCK_M)
    pid_qk, pid_b = _tile_and_batch(q_tiles * tl.cdiv(m, BLOCK_N))  # query tiles, then key tiles
    pid_q, pid_k = pid_qk % q_tiles, pid_qk // q_tiles
    offs_m = pid_q * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), pid_b, offs_m, pid_k * BLOCK_N, threshold, BLOCK_N)
    ptr = KEEP + (pid_b.to(tl.int64) * n + offs_m[:, None]) * m + offs_n[None, :]
    tl.store(ptr, keep.to(tl.int8), mask=(offs_m[:, None] < n) & (offs_n[None, :] < m))


@triton.jit
def _store_sq_norms(X, OUT, b0, b1, pid_b, tile, sx0, sx1, sxn, sxd, rows, d, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    offs_r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(X + b0 * sx0 + b1 * sx1 + offs_r[:, None].to(tl.int64) * sxn + offs_d[None, :] * sxd,
                mask=(offs_r[:, None] < rows) & (offs_d[None, :] < d), other=0.0).to(ACC)
    tl.store(OUT + pid_b.to(tl.int64) * rows + offs_r, tl.sum(x * x, 1), mask=offs_r < rows)


@triton.jit
def row_norms_kernel(Q, K, QN, KN, sq0, sq1, sqn, sqd, sk0, sk1, skm, skd, B1, n, m, d, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """``QN[b, i] = ‖q_i‖²`` and ``KN[b, j] = ‖k_j‖²`` in ``ACC`` (``(B, n)``, ``(B, m)``, contiguous;
    the first tiles of each batch entry are the queries', the rest the keys'), for the distance
    metrics. Every kernel loads these (``_sq_norms``) instead of summing its own tile's
    squares: a sum's rounding depends on the tile layout, which differs between the forward and
    the backward kernels, and the backward must recompute pass 1's scores bit for bit
    (``_step_coord``)."""
    q_tiles = tl.cdiv(n, BLOCK_R)
    tile, pid_b = _tile_and_batch(q_tiles + tl.cdiv(m, BLOCK_R))
    b0 = (pid_b // B1).to(tl.int64)
    b1 = (pid_b % B1).to(tl.int64)
    if tile < q_tiles:
        _store_sq_norms(Q, QN, b0, b1, pid_b, tile, sq0, sq1, sqn, sqd, n, d, BLOCK_R, BLOCK_D, ACC)
    else:
        _store_sq_norms(K, KN, b0, b1, pid_b, tile - q_tiles, sk0, sk1, skm, skd, m, d, BLOCK_R, BLOCK_D, ACC)


@triton.jit
def _sq_norms(base, offs, count, METRIC: tl.constexpr, ACC: tl.constexpr):
    """Squared norms of rows ``offs`` from ``row_norms_kernel``'s output at ``base`` (0 from
    ``count`` on, as for the zero rows the tiles read there); zeros for ``dot`` (not read)."""
    if METRIC == 0:
        nrm = tl.zeros(offs.shape, ACC)
    else:
        nrm = tl.load(base + offs, mask=offs < count, other=0.0)
    return nrm


@triton.jit
def _scores(q, k, qq, kk, scale, METRIC: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
            UPCAST: tl.constexpr):
    """Raw score tile ``r`` ``(BM, BN)`` and the squared distance (for the metric's backward).

    The similarity is ``s = r · _score_factor(scale)``: for ``dot`` ``r = q·k`` (the scale is
    folded into every per-row coefficient applied to ``r``, so no tile is multiplied by it);
    for the distance metrics ``r = s``."""
    qk = _dot(q, tl.trans(k), PREC, ACC, UPCAST)
    if METRIC == 0:
        r = qk
        dist2 = qk
    else:
        dist2 = qq[:, None] + kk[None, :] - 2.0 * qk
        d2 = tl.maximum(dist2, 0.0, propagate_nan=tl.PropagateNan.ALL)  # a NaN input stays NaN
        if METRIC == 1:
            r = -(d2 * scale)
        else:
            r = -(tl.sqrt(d2) * scale)
    return r, dist2


@triton.jit
def _score_factor(scale, METRIC: tl.constexpr):
    """``s = r · factor`` (``_scores``); ``factor > 0``, so row extremes of ``r`` give those of ``s``."""
    if METRIC == 0:
        f = scale
    else:
        f = 1.0
    return f


@triton.jit
def _validity(offs_m, offs_n, n, m, mask_base, smn, smm, self_off,
              HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr, EVEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Valid (query, key) pairs of a tile. ``EVEN``: the tiles divide ``n`` and ``m`` (no ragged
    edge), so without causal/self/mask rules every pair is valid and the selects fold away."""
    if EVEN:
        valid = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
    else:
        valid = (offs_m[:, None] < n) & (offs_n[None, :] < m)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if EXCL:  # query i's own key is key i + self_off
        valid = valid & (offs_n[None, :] != offs_m[:, None] + self_off)
    if HAS_MASK:
        mk = tl.load(mask_base + offs_m[:, None].to(tl.int64) * smn + offs_n[None, :].to(tl.int64) * smm,
                     mask=valid, other=0)
        valid = valid & (mk != 0)
    return valid


@triton.jit
def _band_coefs(inv_r, a, b, t, STEP: tl.constexpr):
    """Per-row ``(alpha, beta)`` such that ``z = (s - lo) · alpha + beta`` is the step's own
    coordinate: ``u`` itself for ``log`` (and ``none``), the band coordinate
    ``x = (u - a) / (b - a)`` for ``sigmoidal``, the smoothstep argument
    ``y = (x - 1/2) / t + 1/2`` for ``poly`` (``u = 1`` on flat rows, ``inv_r = 0``)."""
    flat = inv_r <= 0.0
    if STEP == 0 or STEP == 2:
        alpha = tl.where(flat, 0.0, inv_r)
        beta = tl.where(flat, 1.0, 0.0)
    else:
        inv_w = 1.0 / (b - a)
        alpha = tl.where(flat, 0.0, inv_r * inv_w)
        beta = tl.where(flat, (1.0 - a) * inv_w, -a * inv_w)
        if STEP == 3:
            inv_t = 1.0 / t
            alpha = alpha * inv_t
            beta = (beta - 0.5) * inv_t + 0.5
    return alpha, beta


@triton.jit
def _coord_coefs(lo, inv_r, a, b, t, factor, STEP: tl.constexpr):
    """Per-row ``(al, be)`` such that ``z = fma(r, al, be)`` is the step's coordinate
    (``_band_coefs``) straight from the raw score ``r`` (``s = r · factor``): one fused
    multiply-add per score. ``al >= 0``, so ``z`` is monotone in ``r``; the skip test
    (``row_stats_kernel``) applies the very same ``fma`` to a tile's largest ``r``, which keeps
    skipping exact."""
    alpha, beta = _band_coefs(inv_r, a, b, t, STEP)
    return alpha * factor, beta - lo * alpha


@triton.jit
def _step_coord(r, al, be, pin_raw, STEP: tl.constexpr):
    """The step's coordinate of raw scores ``r``: ``fma(r, al, be)``, except for ``log``, whose
    weight falls to 0 with infinite slope at ``u = 0``: there the row minimum must land on
    ``u = 0`` exactly, so ``u = (r - pin_raw) · al``.

    ``pin_raw`` (``RS`` plane 4, ``row_stats_kernel``) is the raw score whose coordinate must be
    exact: the row's smallest ``r`` for ``log``, its largest for ``sigmoidal`` (``u = 1``; see
    ``_score_grad``), unused by the other steps."""
    if STEP == 2:
        z = tl.where(al > 0, (r - pin_raw) * al, 1.0)
    else:
        z = tl.fma(r, al, be)
    return z


@triton.jit
def _rows_dropped(z, STEP: tl.constexpr):
    """True where a key at coordinate ``z`` (see ``_coord_coefs``; and so every key with a lower
    score: all ops are monotone) has weight exactly 0 for that row's step."""
    if STEP == 0:
        dropped = z != z  # never (False; NaN-safe)
    else:
        dropped = z <= 0.0
    return dropped


@triton.jit
def _smoothstep(z):
    """The poly step on its coordinate: ``y = clamp(z, 0, 1)`` (the compiler folds the clamp into
    the multiply-add that made ``z``), ``y²`` and ``m = y²(3 - 2y)``."""
    y = tl.minimum(tl.maximum(z, 0.0), 1.0)
    y2 = y * y
    return y, y2, y2 * (3.0 - 2.0 * y)


@triton.jit
def _sigmoidal_band(p, z, band, t):
    """``p · m`` in the band, ``m = 1 / (1 + ((1 - z) / z)^(1/t))``. (The band is bound by the
    special-function unit: a variant with two ``log2`` and approximate quotients measured slower
    on an H200 than this one ``log2``, one ``exp2`` and two divisions.)"""
    ratio = tl.where(band, (1.0 - z) / z, 1.0)
    rr = tl.exp2(tl.log2(ratio) * (1.0 / t))
    return tl.where(band, p / (1.0 + rr), p)


@triton.jit
def _step_weight(x, z, valid, a, b, t, STEP: tl.constexpr, BAND_BRANCH: tl.constexpr):
    """``p = exp2(x) · m`` for valid keys (0 elsewhere) and the kept indicator.

    ``x`` is the log2 softmax numerator (``(s - ref) / τ · log2 e``), ``z`` the step's
    coordinate (``_coord_coefs``); ``a, b, t`` are ``(BM, 1)`` row parameters.
    """
    if STEP == 0:
        keep = valid
        p = tl.exp2(tl.where(keep, x, float("-inf")))
    elif STEP == 1:  # z = band coordinate: m = 1 / (1 + ((1 - z) / z)^(1/t))
        keep = valid & (z > 0.0)
        p = tl.exp2(tl.where(keep, x, float("-inf")))
        band = keep & (z < 1.0)
        if BAND_BRANCH:
            if tl.max(band.to(tl.int32)) > 0:
                p = _sigmoidal_band(p, z, band, t)
        else:
            p = _sigmoidal_band(p, z, band, t)
    elif STEP == 2:
        u = z
        keep = valid & (u > 0.0)
        band = keep & (u < b)
        ub = tl.where(band, u, b)
        phi2 = (t / (1.0 - t)) * (b - ub) * tl.log2(ub / b)
        p = tl.exp2(tl.where(keep, x + phi2, float("-inf")))
    else:  # z = y: m = y² (3 - 2y) on y clamped to [0, 1] (no selects but validity)
        keep = valid & (z > 0.0)
        _y, _y2, m = _smoothstep(z)
        p = tl.exp2(tl.where(valid, x, float("-inf"))) * m
    return p, keep


@triton.jit
def _step_weight_grad(x, u, valid, a, b, t, STEP: tl.constexpr):
    """Backward form for ``sigmoidal`` and ``log``: ``w = exp2(x) · m(u)``, the log-mask
    partials ``φ_u, φ_a, φ_b, φ_t`` (zero outside the band; see docs/gradients.md and
    :mod:`simwarp.steps`) and ``u`` in the band (finite outside it, where the partials vanish:
    a masked NaN score must not reach the row sums as 0 · NaN). ``none`` and ``poly`` have
    closed forms in the tile functions."""
    if STEP == 1:
        keep = valid & ~(u <= a)  # (a NaN row's u is NaN: kept, so its gradients are NaN as elsewhere)
        band = keep & (u < b)
        w = tl.exp2(tl.where(keep, x, float("-inf")))
        bu = tl.where(band, b - u, 1.0)
        ua = tl.where(band, u - a, 1.0)
        inv_t = 1.0 / t
        z2 = tl.log2(bu / ua) * inv_t  # z / ln 2
        rr = tl.exp2(z2)
        mm = 1.0 / (1.0 + rr)
        sig = tl.where(mm > 0.0, rr * mm, 1.0)  # sigmoid(z) = 1 - m, safe when rr overflows
        w = tl.where(band, w * mm, w)
        st = tl.where(band, sig * inv_t, 0.0)
        phi_a = -st / ua
        phi_b = -st / bu
        phi_u = -(phi_a + phi_b)
        phi_t = st * (z2 * LN2)
        u_band = ua + a
    elif STEP == 2:
        keep = valid & (u > 0.0)
        band = keep & (u < b)
        ub = tl.where(band, u, b)
        c = t / (1.0 - t)
        lg = tl.log2(ub / b) * LN2  # log(u / b)
        w = tl.exp2(tl.where(keep, x + c * (b - ub) * lg * LOG2E, float("-inf")))
        bandf = tl.where(band, 1.0, 0.0)
        phi_u = bandf * c * ((b - ub) / ub - lg)
        phi_a = x * 0.0
        phi_b = bandf * c * (lg - (b - ub) / b)
        phi_t = bandf * (b - ub) * lg / ((1.0 - t) * (1.0 - t))
        u_band = ub
    return w, keep, phi_u, phi_a, phi_b, phi_t, u_band


@triton.jit
def _metric_coef(ds, dist2, scale, METRIC: tl.constexpr):
    """Coefficients ``G`` (``dq += G @ k``, ``dk += Gᵀ @ q``) and ``g2 = ∂L/∂dist²`` (for the
    norm terms ``dq += 2 rowsum(g2) q``, ``dk += 2 colsum(g2) k``) of a tile ``ds = ∂L/∂r`` of
    raw-score gradients (``_scores``: for ``dot`` that already holds the scale)."""
    if METRIC == 0:
        g2 = ds * 0.0
        coef = ds
    elif METRIC == 1:
        g2 = tl.where(dist2 >= 0.0, -(ds * scale), 0.0)
        coef = -2.0 * g2
    else:
        pos = dist2 > 0.0
        g2 = tl.where(pos, -(ds * scale) * 0.5 / tl.sqrt(tl.where(pos, dist2, 1.0)), 0.0)
        coef = -2.0 * g2
    return coef, g2


@triton.jit
def _grad_coefs(lo, inv_r, lse, a, b, t, scale, inv_tau, METRIC: tl.constexpr, STEP: tl.constexpr):
    """Per-row coefficients of the backward tiles (row vectors as ``(BM, 1)``): ``k1 = ∂(s/τ)/∂r``,
    the exponent ``x = fma(r, xs, xb)`` (log2 of the weight before the step, ``lse`` known) and
    the coefficients of the step coordinate (``_step_coord``): the smoothstep argument for
    ``poly``, ``u`` for the other steps."""
    factor = _score_factor(scale, METRIC)
    k1 = factor * inv_tau
    if STEP == 3:
        al, be = _coord_coefs(lo, inv_r, a, b, t, factor, STEP)
    else:
        al, be = _coord_coefs(lo, inv_r, a, b, t, factor, 0)
    return k1, k1 * LOG2E, -lse * LOG2E, al, be


@triton.jit
def _score_grad(r, valid, dpd, k1, xs, xb, al, be, pin_raw, inv_r, a2, b2, t2, STEP: tl.constexpr):
    """Backward of a tile of raw scores ``r`` with ``dpd = dO·v - delta``: the weights ``w``
    (for ``dv``), ``dr = ∂L/∂r`` and per-score terms whose row sums give the range and
    parameter gradients (``t_lo, t_hi, t_a, t_b, t_t``; see ``bwd_dq_kernel``). Terms a kernel
    does not use are dropped by the compiler.

    ``poly`` in closed form: ``w = e·m(y)``, ``y = clamp(z)``, and with ``G = ∂L/∂y = 6·e·dpd·y(1-y)``
    every range and parameter gradient of a row is linear in ``ΣG`` and ``ΣG·z`` (``y`` is affine
    in ``s``), so ``t_lo = G/6``, ``t_hi = G·z/6`` (taken as ``G·y/6``: equal, as ``G = 0`` where the
    clamp acts, and free of the NaN a masked non-finite score gives ``z``)."""
    x = tl.fma(r, xs, xb)
    e = tl.exp2(tl.where(valid, x, float("-inf")))  # unused (dropped) for sigmoidal / log
    zero = r * 0.0
    t_lo = zero
    t_hi = zero
    t_a = zero
    t_b = zero
    t_t = zero
    if STEP == 0:
        w = e
        dr = e * dpd * k1
    elif STEP == 3:
        z = tl.fma(r, al, be)
        y, y2, m = _smoothstep(z)
        yy = y - y2
        w = e * m
        gd = e * dpd
        dr = gd * (m * k1 + (6.0 * al) * yy)
        t_lo = gd * yy
        t_hi = t_lo * y  # = G·z/6: G is 0 where the clamp acts (y(1 - y) = 0), and y is never NaN
    else:
        if STEP == 1:
            # u from the gap below the row maximum, so the best key has u = 1 exactly: fma(r, al,
            # be) may round it to 1 - ulp, which with b = 1 lies in the band, where φ's partials
            # are steep for t near 1 (≈ ulp^(1/t - 1) / t). al = ∂u/∂r (0 on flat rows: u = 1)
            u = tl.fma(r - pin_raw, al, 1.0)
        else:
            u = _step_coord(r, al, be, pin_raw, STEP)
        w, keep, phi_u, phi_a, phi_b, phi_t, u_band = _step_weight_grad(x, u, valid, a2, b2, t2, STEP)
        dl = tl.where(keep, w * dpd, 0.0)
        dlu = dl * phi_u * inv_r  # ∂L/∂s through u, for the range sums (0 outside the band)
        dr = dl * (k1 + phi_u * al)
        t_lo = dlu * u_band - dlu
        t_hi = -(dlu * u_band)
        t_a = dl * phi_a
        t_b = dl * phi_b
        t_t = dl * phi_t
    return w, dr, t_lo, t_hi, t_a, t_b, t_t


@triton.jit
def _bwd_weight(r, valid, xs, xb, al, be, pin_raw, a2, b2, t2, STEP: tl.constexpr):
    """The weights ``w`` of a backward tile alone (``_score_grad``'s first output), for ``dv``
    before ``dO·vᵀ`` is live. That lowers the register peak of float32 tiles (with d = 128 the
    other order spills kilobytes) but raises it for 16-bit ones (``DV_FIRST`` picks). The
    compiler shares the common subexpressions with ``_score_grad``."""
    w, _dr, _lo, _hi, _a, _b, _t = _score_grad(r, valid, r * 0.0, 1.0, xs, xb, al, be, pin_raw, al, a2, b2, t2, STEP)
    return w


# ---------------------------------------------------------------------------------------
# Row extremes that carry NaN: a row with a NaN among its valid scores gets a NaN range, and
# so a NaN output (as a row of SDPA would), where tl.min / tl.max would skip the NaN.
# ---------------------------------------------------------------------------------------

#: True in the copy of this file that Triton's CPU interpreter runs (see the module docstring).
INTERPRETED = tl.constexpr(not isinstance(_dot, JITFunction))


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _argmin_nan(v1, i1, v2, i2):
    """Combine of ``_row_argmin``: NaN wins, equal values go to the lower index."""
    first = (v1 < v2) | (v1 != v1) | ((v1 == v2) & (i1 < i2))
    return tl.where(first, v1, v2), tl.where(first, i1, i2)


@triton.jit
def _nan_row_terms(x):
    """0 per row of ``x``, NaN for rows that hold a NaN (the interpreter's stand-in below)."""
    return tl.sum(tl.where(x == x, 0.0, x), 1)


@triton.jit
def _row_extreme(x, LARGEST: tl.constexpr):
    """Row minima (maxima with ``LARGEST``) of a 2-D tile, NaN where a row holds a NaN. On the GPU
    one ``min.NaN`` / ``max.NaN`` per entry, as many instructions as ``tl.min`` / ``tl.max``.
    The interpreter runs a user combine function as a Python loop per entry, so there the
    NaN-skipping reduction plus a NaN sum stands in for it (same values)."""
    if INTERPRETED:
        if LARGEST:
            ext = tl.max(x, 1)
        else:
            ext = tl.min(x, 1)
        ext = ext + _nan_row_terms(x)
    else:
        if LARGEST:
            ext = tl.reduce(x, 1, _max_nan)
        else:
            ext = tl.reduce(x, 1, _min_nan)
    return ext


@triton.jit
def _row_argmin(x, BLOCK_N: tl.constexpr):
    """``_row_extreme`` (minima) and the first column attaining it (int32; for a NaN row, some
    column)."""
    if INTERPRETED:  # (NumPy's nanargmin raises on rows of NaN alone)
        ext, idx = tl.min(tl.where(x == x, x, float("inf")), 1, return_indices=True,
                          return_indices_tie_break_left=True)
        ext = ext + _nan_row_terms(x)
        idx = idx.to(tl.int32)
    else:
        cols = tl.broadcast_to(tl.arange(0, BLOCK_N)[None, :], x.shape)
        ext, idx = tl.reduce((x, cols), 1, _argmin_nan)
    return ext, idx


# ---------------------------------------------------------------------------------------
# Forward pass 1: row range (min, max, first argmin / argmax) and per-tile score maxima
# ---------------------------------------------------------------------------------------


@triton.jit
def _causal_split(q_start, kb_lo, kb_hi, BLOCK_N: tl.constexpr):
    """The first key tile (clamped to ``kb_lo .. kb_hi``) that some row of the query block
    starting at ``q_start`` may not fully see: tiles before it end at or before the block's
    first row, so every key of them is visible to every row (``j <= i``)."""
    return tl.maximum(kb_lo, tl.minimum(kb_hi, (q_start + 1) // BLOCK_N))


@triton.jit
def _tile_index(i, tiles, FROM_LIST: tl.constexpr, SUB: tl.constexpr):
    """Tile visited at step ``i`` of a loop: ``i`` itself, or entry ``i`` of a list of coarse
    (forward) tiles, each of which covers ``SUB`` consecutive fine (backward) tiles."""
    if FROM_LIST:
        return tl.load(tiles + i // SUB) * SUB + i % SUB
    return i


@triton.jit
def _entries_before(tiles, count, first, SUB: tl.constexpr, CHUNK: tl.constexpr):
    """How many steps of a loop over the ascending list ``tiles[:count]`` (``SUB`` fine tiles per
    entry, as in ``_tile_index``) visit a fine tile below ``first``: where a causal loop over a
    list switches between its unmasked and its masked part."""
    total = tl.zeros([], tl.int32)
    for j0 in range(0, count, CHUNK):
        offs = j0 + tl.arange(0, CHUNK)
        coarse = tl.load(tiles + offs, mask=offs < count, other=first)  # padding contributes 0
        total += tl.sum(tl.minimum(tl.maximum(first - coarse * SUB, 0), SUB), 0)
    return total


@triton.jit
def _tile_scores(q, qq, k_base, kn_base, kb, key_end, d, skm, skd, scale, METRIC: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Raw scores ``r`` of the query block against key tile ``kb`` (keys from ``key_end`` on read as 0)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skm + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < key_end) & (offs_d[None, :] < d), other=0.0)
    kk = _sq_norms(kn_base, offs_n, key_end, METRIC, ACC)
    r, _unused = _scores(q, k, qq, kk, scale, METRIC, PREC, ACC, UPCAST)
    return r


@triton.jit
def _range_update(run_lo, run_hi, arg_lo, arg_hi, r, kb, offs_m, mask_base, tm_base, n, m, smkn, smkm, self_off,
                  CAUSAL: tl.constexpr, EXCL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN: tl.constexpr,
                  TRACK_ARG: tl.constexpr, STORE_TMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold key tile ``kb``'s scores into the running row min / max (and first arg), and store
    its maxima per group of ``TMAX_ROWS`` rows."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = _validity(offs_m, offs_n, n, m, mask_base, smkn, smkm, self_off, HAS_MASK, CAUSAL, EXCL, EVEN, BLOCK_M, BLOCK_N)
    s_lo = tl.where(valid, r, float("inf"))
    s_hi = tl.where(valid, r, float("-inf"))
    if TRACK_ARG:  # a NaN row needs one NaN extreme only: the maximum skips NaN (cheaper)
        blk_lo, idx_lo = _row_argmin(s_lo, BLOCK_N)
        if INTERPRETED:  # (NumPy's nanargmax raises on rows of NaN alone; the minimum carries the NaN)
            s_hi = tl.where(s_hi == s_hi, s_hi, float("-inf"))
        blk_hi, idx_hi = tl.max(s_hi, 1, return_indices=True, return_indices_tie_break_left=True)
        idx_hi = idx_hi.to(tl.int32)
        new_lo = blk_lo < run_lo
        new_hi = blk_hi > run_hi
        arg_lo = tl.where(new_lo, idx_lo + kb * BLOCK_N, arg_lo)
        arg_hi = tl.where(new_hi, idx_hi + kb * BLOCK_N, arg_hi)
    else:
        blk_lo = _row_extreme(s_lo, False)
        blk_hi = _row_extreme(s_hi, True)
    run_lo = tl.minimum(run_lo, blk_lo, propagate_nan=tl.PropagateNan.ALL)
    run_hi = tl.maximum(run_hi, blk_hi, propagate_nan=tl.PropagateNan.ALL)
    if STORE_TMAX:
        part = _row_extreme(tl.reshape(blk_hi, (BLOCK_M // TMAX_ROWS, TMAX_ROWS)), True)
        tl.store(tm_base + kb * (BLOCK_M // TMAX_ROWS) + tl.arange(0, BLOCK_M // TMAX_ROWS), part)
    return run_lo, run_hi, arg_lo, arg_hi


@triton.jit
def _range_tiles(run_lo, run_hi, arg_lo, arg_hi, start, stop, q, qq, offs_m, k_base, kn_base, mask_base, tm_base,
                 n, m, d, skm, skd, smkn, smkm, self_off, scale,
                 METRIC: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr, HAS_MASK: tl.constexpr,
                 EVEN: tl.constexpr, TRACK_ARG: tl.constexpr, STORE_TMAX: tl.constexpr, PIPELINE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                 ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Pass 1 over key tiles ``start .. stop - 1``. ``PIPELINE``: the next tile's product is issued
    before this tile's reductions, so the tensor cores and the min/max run at the same time
    (SASS: the reductions sit between the next tile's HGMMAs), at the price of a second
    accumulator (about 166 instead of 94 registers at d = 64: one block per SM instead of two)
    and one product on zeros past the last tile."""
    if PIPELINE:
        r_next = _tile_scores(q, qq, k_base, kn_base, start, tl.where(start < stop, m, 0), d, skm, skd, scale, METRIC,
                              BLOCK_N, BLOCK_D, PREC, ACC, UPCAST)
        for kb in range(start, stop):
            r = r_next
            r_next = _tile_scores(q, qq, k_base, kn_base, kb + 1, tl.where(kb + 1 < stop, m, 0), d, skm, skd, scale, METRIC,
                                  BLOCK_N, BLOCK_D, PREC, ACC, UPCAST)
            run_lo, run_hi, arg_lo, arg_hi = _range_update(
                run_lo, run_hi, arg_lo, arg_hi, r, kb, offs_m, mask_base, tm_base, n, m, smkn, smkm, self_off,
                CAUSAL, EXCL, HAS_MASK, EVEN, TRACK_ARG, STORE_TMAX, BLOCK_M, BLOCK_N)
    else:
        for kb in range(start, stop):
            r = _tile_scores(q, qq, k_base, kn_base, kb, m, d, skm, skd, scale, METRIC, BLOCK_N, BLOCK_D, PREC, ACC, UPCAST)
            run_lo, run_hi, arg_lo, arg_hi = _range_update(
                run_lo, run_hi, arg_lo, arg_hi, r, kb, offs_m, mask_base, tm_base, n, m, smkn, smkm, self_off,
                CAUSAL, EXCL, HAS_MASK, EVEN, TRACK_ARG, STORE_TMAX, BLOCK_M, BLOCK_N)
    return run_lo, run_hi, arg_lo, arg_hi


@triton.jit
def range_kernel(
    Q, K, QN, KN, MASK, CONSTS, LOP, HIP, AMINP, AMAXP, TMAX,
    sq0, sq1, sqn, sqd, sk0, sk1, skm, skd, smk0, smk1, smkn, smkm,
    B1, B, n, m, d, n_qb, n_kb, kb_per_split, self_off,
    METRIC: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN: tl.constexpr,
    TRACK_ARG: tl.constexpr, STORE_TMAX: tl.constexpr, PIPELINE: tl.constexpr, LAST_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Per query block and key split: row min / max of the raw scores ``r`` (``_scores``; the
    factor to ``s`` is positive and rounding is monotone, so ``lo = min(r) · factor`` exactly),
    with ``TRACK_ARG`` the first key attaining each (for the range gradient) and, with
    ``STORE_TMAX``, every key tile's largest valid ``r`` over each group of ``TMAX_ROWS`` rows
    (for block skipping; ``TMAX``: ``(B, n_qb, n_kb, BLOCK_M // TMAX_ROWS)``)."""
    pid_q, pid_b = _query_block_and_batch(n, BLOCK_M, LAST_FIRST)
    pid_s = tl.program_id(1)
    b0 = (pid_b // B1).to(tl.int64)
    b1 = (pid_b % B1).to(tl.int64)
    q_start = pid_q * BLOCK_M
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b0 * sq0 + b1 * sq1 + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < n) & (offs_d[None, :] < d), other=0.0)
    qq = _sq_norms(QN + pid_b.to(tl.int64) * n, offs_m, n, METRIC, ACC)
    scale = tl.load(CONSTS)
    k_base = K + b0 * sk0 + b1 * sk1
    kn_base = KN + pid_b.to(tl.int64) * m
    mask_base = MASK + b0 * smk0 + b1 * smk1

    run_lo = tl.full([BLOCK_M], float("inf"), ACC)
    run_hi = tl.full([BLOCK_M], float("-inf"), ACC)
    arg_lo = tl.zeros([BLOCK_M], tl.int32)
    arg_hi = tl.zeros([BLOCK_M], tl.int32)
    kb_lo = pid_s * kb_per_split
    kb_hi = tl.minimum(n_kb, kb_lo + kb_per_split)
    if CAUSAL:
        kb_hi = tl.minimum(kb_hi, tl.cdiv(tl.minimum(m, q_start + BLOCK_M), BLOCK_N))
    tm_base = TMAX + (pid_b.to(tl.int64) * n_qb + pid_q) * n_kb * (BLOCK_M // TMAX_ROWS)
    if CAUSAL:  # tiles left of the diagonal block need no causal mask: fewer selects per score
        kb_mid = _causal_split(q_start, kb_lo, kb_hi, BLOCK_N)
        run_lo, run_hi, arg_lo, arg_hi = _range_tiles(
            run_lo, run_hi, arg_lo, arg_hi, kb_lo, kb_mid, q, qq, offs_m, k_base, kn_base, mask_base, tm_base, n, m, d, skm, skd,
            smkn, smkm, self_off, scale, METRIC, False, EXCL, HAS_MASK, EVEN,
            TRACK_ARG, STORE_TMAX, PIPELINE, BLOCK_M, BLOCK_N, BLOCK_D, PREC, ACC, UPCAST)
        kb_lo = kb_mid
    run_lo, run_hi, arg_lo, arg_hi = _range_tiles(
        run_lo, run_hi, arg_lo, arg_hi, kb_lo, kb_hi, q, qq, offs_m, k_base, kn_base, mask_base, tm_base, n, m, d, skm, skd,
        smkn, smkm, self_off, scale, METRIC, CAUSAL, EXCL, HAS_MASK, EVEN,
        TRACK_ARG, STORE_TMAX, PIPELINE, BLOCK_M, BLOCK_N, BLOCK_D, PREC, ACC, UPCAST)
    out_off = (pid_s.to(tl.int64) * B + pid_b) * n + offs_m
    row_ok = offs_m < n
    tl.store(LOP + out_off, run_lo, mask=row_ok)
    tl.store(HIP + out_off, run_hi, mask=row_ok)
    if TRACK_ARG:
        tl.store(AMINP + out_off, arg_lo, mask=row_ok)
        tl.store(AMAXP + out_off, arg_hi, mask=row_ok)


# ---------------------------------------------------------------------------------------
# Between the passes: row ranges, and which key tiles every row of a query block drops
# ---------------------------------------------------------------------------------------


@triton.jit
def row_stats_kernel(
    LOP, HIP, AMINP, AMAXP, PRM, CONSTS, TMAX, RS, EMPTY, AMIN, AMAX, FLAGS, COUNTS, LIST, LCOUNT,
    S, B, n, m, n_qb, n_kb,
    METRIC: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr, TRACK_ARG: tl.constexpr,
    SKIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
):
    """Between the passes, one program per query block (the forward's ``BLOCK_M`` rows):

    1. each row's range from the key splits' partial minima / maxima of ``r`` (``LOP, HIP``:
       ``(S, B, n)``; the first split attaining an extreme wins ties, as does the first key within
       a split), written as ``RS = (lo, hi, inv_r, empty, pin_raw)`` planes (``lo, hi`` in units
       of ``s``; ``inv_r = 0`` on flat and empty rows; ``pin_raw``: see ``_step_coord``),
       ``EMPTY`` and, with ``TRACK_ARG``, the argmin / argmax. A row with a NaN or inf among its
       valid scores (a non-finite extreme) gets ``lo = hi = NaN`` and ``inv_r = 0``: pass 2
       writes it NaN, and it skips no tile;
    2. with ``SKIP``: ``FLAGS[b, qb, kb] = 1`` where every row of the block is out of range, empty
       or drops all of key tile ``kb`` (judged from the tile's largest ``r`` over the row's group
       of ``TMAX_ROWS`` rows), and for tiles past
       the causal diagonal: such tiles have weight exactly 0. ``COUNTS[b, qb] = (skipped,
       visited)``, and ``LIST[b, qb, :LCOUNT[b, qb]]`` the tiles to visit, ascending.

    One launch instead of a dozen small tensor operations and a separate list kernel: at short
    sequences the launches, not the arithmetic, are what costs."""
    pid_q, pid_b = _tile_and_batch(tl.cdiv(n, BLOCK_M))
    q_start = pid_q * BLOCK_M
    offs_m = q_start + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n
    rows = pid_b.to(tl.int64) * n + offs_m
    plane = (pid_b.to(tl.int64) * 0 + B) * n
    lo_raw = tl.load(LOP + rows, mask=row_ok, other=float("inf"))
    hi_raw = tl.load(HIP + rows, mask=row_ok, other=float("-inf"))
    if TRACK_ARG:
        amin = tl.load(AMINP + rows, mask=row_ok, other=0)
        amax = tl.load(AMAXP + rows, mask=row_ok, other=0)
    for sp in range(1, S):
        off = sp * plane
        lo_s = tl.load(LOP + off + rows, mask=row_ok, other=float("inf"))
        hi_s = tl.load(HIP + off + rows, mask=row_ok, other=float("-inf"))
        if TRACK_ARG:
            amin = tl.where(lo_s < lo_raw, tl.load(AMINP + off + rows, mask=row_ok, other=0), amin)
            amax = tl.where(hi_s > hi_raw, tl.load(AMAXP + off + rows, mask=row_ok, other=0), amax)
        lo_raw = _min_nan(lo_raw, lo_s)
        hi_raw = _max_nan(hi_raw, hi_s)
    empty = (lo_raw == float("inf")) & (hi_raw == float("-inf"))
    # A NaN or infinite score among the row's valid ones: lo = hi = NaN, and pass 2 writes a NaN
    # row (the other paths give NaN through the softmax; here x - x is 0 for finite x only).
    poisoned = ~empty & ((lo_raw - lo_raw != 0.0) | (hi_raw - hi_raw != 0.0))
    lo_raw = tl.where(empty, 0.0, tl.where(poisoned, float("nan"), lo_raw))
    hi_raw = tl.where(empty, 0.0, tl.where(poisoned, float("nan"), hi_raw))
    factor = _score_factor(tl.load(CONSTS), METRIC)
    lo = lo_raw * factor
    hi = hi_raw * factor
    # The range from the raw extremes, so that a flat row (one valid key, or all scores equal)
    # gets exactly 0: the GPU compiler contracts ``hi - lo`` into ``fma(hi_raw, factor, -lo)``,
    # which is the rounding error of ``lo`` (not 0) whenever ``factor`` is not a power of two
    # (``dot`` at d = 48 or 128), and a positive error made such a row "steep" with
    # ``inv_r`` ~ 1/ulp: its keys' ``u`` came out garbage (the first row of every causal
    # sequence lost its only key in about half the heads; found on an H100, invisible to the
    # interpreter, which rounds every operation).
    r = (hi_raw - lo_raw) * factor
    steep = r >= 1.1754943508222875e-38  # flat: r below float32's smallest normal (as common.unit_affine)
    inv_r = tl.where(steep, 1.0 / tl.where(steep, r, 1.0), 0.0)
    tl.store(RS + rows, lo, mask=row_ok)
    tl.store(RS + plane + rows, hi, mask=row_ok)
    tl.store(RS + 2 * plane + rows, inv_r, mask=row_ok)
    tl.store(RS + 3 * plane + rows, tl.where(empty, 1.0, 0.0), mask=row_ok)
    if STEP == 1:
        tl.store(RS + 4 * plane + rows, hi_raw, mask=row_ok)
    else:
        tl.store(RS + 4 * plane + rows, lo_raw, mask=row_ok)
    tl.store(EMPTY + rows, empty.to(tl.int8), mask=row_ok)
    if TRACK_ARG:
        tl.store(AMIN + rows, amin, mask=row_ok)
        tl.store(AMAX + rows, amax, mask=row_ok)
    if SKIP:
        a = tl.load(PRM + rows, mask=row_ok, other=0.5)[:, None]
        b = tl.load(PRM + plane + rows, mask=row_ok, other=1.0)[:, None]
        t = tl.load(PRM + 2 * plane + rows, mask=row_ok, other=0.5)[:, None]
        al, be = _coord_coefs(lo[:, None], inv_r[:, None], a, b, t, factor, STEP)
        n_vis = _visible_tiles(q_start, n_kb, m, BLOCK_M, BLOCK_N, CAUSAL)
        slot = pid_b.to(tl.int64) * n_qb + pid_q
        base = slot * n_kb
        group = tl.arange(0, BLOCK_M) // TMAX_ROWS  # each row is judged by its own group's maxima
        n_skip = tl.zeros([], tl.int32)
        n_list = tl.zeros([], tl.int32)
        for k0 in range(0, n_kb, TILES):
            offs_t = k0 + tl.arange(0, TILES)
            visited = offs_t < n_vis
            tm = tl.load(TMAX + (base + offs_t[None, :]) * (BLOCK_M // TMAX_ROWS) + group[:, None],
                         mask=visited[None, :], other=float("-inf"))
            z = _step_coord(tm, al, be, lo_raw[:, None], STEP)
            ok = ((~row_ok[:, None]) | empty[:, None] | (tm == float("-inf"))
                  | ((inv_r[:, None] > 0) & _rows_dropped(z, STEP)))
            flag = tl.min(ok.to(tl.int32), axis=0)
            in_range = offs_t < n_kb
            tl.store(FLAGS + base + offs_t, flag.to(tl.int8), mask=in_range)
            n_skip += tl.sum(tl.where(visited, flag, 0), axis=0)
            keep = ((flag == 0) & in_range).to(tl.int32)
            tl.store(LIST + base + n_list + tl.cumsum(keep, 0) - keep, offs_t, mask=keep != 0)
            n_list += tl.sum(keep, 0)
        tl.store(COUNTS + 2 * slot, n_skip)
        tl.store(COUNTS + 2 * slot + 1, n_vis)
        tl.store(LCOUNT + slot, n_list)


@triton.jit
def compact_kernel(FLAGS, LIST, COUNT, s_batch, s_outer, s_inner, n_inner, n_outer, TILES: tl.constexpr):
    """``LIST[b, o, :COUNT[b, o]]``: the inner indices ``i`` (ascending) with ``FLAGS[b, o, i] == 0``
    (strided: the backward lists each key tile's query blocks this way; ``row_stats_kernel``
    lists the rows' key tiles itself). The tile loops then run over these lists without a
    branch, which keeps their loads pipelined."""
    pid_o, pid_b = _tile_and_batch(n_outer)
    src = FLAGS + pid_b.to(tl.int64) * s_batch + pid_o.to(tl.int64) * s_outer
    slot = pid_b.to(tl.int64) * n_outer + pid_o
    dst = LIST + slot * n_inner
    count = tl.zeros([], tl.int32)
    for i0 in range(0, n_inner, TILES):
        offs = i0 + tl.arange(0, TILES)
        ok = offs < n_inner
        keep = ((tl.load(src + offs.to(tl.int64) * s_inner, mask=ok, other=1) == 0) & ok).to(tl.int32)
        pos = count + tl.cumsum(keep, 0) - keep
        tl.store(dst + pos, offs, mask=keep != 0)
        count += tl.sum(keep, 0)
    tl.store(COUNT + slot, count)


# ---------------------------------------------------------------------------------------
# Forward pass 2: step + softmax (known row maximum) + value accumulation, with tile skipping
# ---------------------------------------------------------------------------------------


@triton.jit
def _key_tile(q, qq, kb, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm,
              self_off, scale, METRIC: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
              HAS_MASK: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
              UPCAST: tl.constexpr):
    """Key tile ``kb`` seen from a query block: its keys and values, the scores (and the raw
    squared distance, for the metric's backward) and which pairs are valid."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    col_ok = offs_n < m
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skm + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < d), other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svm + offs_e[None, :] * sve,
                mask=col_ok[:, None] & (offs_e[None, :] < e), other=0.0)
    kk = _sq_norms(kn_base, offs_n, m, METRIC, ACC)
    s, dist2 = _scores(q, k, qq, kk, scale, METRIC, PREC, ACC, UPCAST)
    valid = _validity(offs_m, offs_n, n, m, mask_base, smkn, smkm, self_off, HAS_MASK, CAUSAL, EXCL, EVEN, BLOCK_M, BLOCK_N)
    return k, v, s, dist2, valid


@triton.jit
def _attend_tile(acc, denom, kept, q, qq, kb, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e,
                 skm, skd, svm, sve, smkn, smkm, self_off, scale, xs, xb, al, be, pin_raw, a2, b2, t2,
                 seed, batch, threshold, keep_scale,
                 METRIC: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
                 HAS_MASK: tl.constexpr, BAND_BRANCH: tl.constexpr, COUNT_KEPT: tl.constexpr,
                 DROPOUT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                 PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, EVEN: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    k, v, r, dist2, valid = _key_tile(
        q, qq, kb, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale,
        METRIC, CAUSAL, EXCL, HAS_MASK, EVEN, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC, UPCAST)
    # Two multiply-adds per score: the softmax exponent and the step's coordinate.
    p, keep = _step_weight(tl.fma(r, xs, xb), _step_coord(r, al, be, pin_raw, STEP), valid, a2, b2, t2, STEP,
                           BAND_BRANCH)
    pv = p
    if DROPOUT:  # on the values' side only: the normaliser sums the weights before dropout
        pv = tl.where(_dropout_keep(seed, batch, offs_m, kb * BLOCK_N, threshold, BLOCK_N), p * keep_scale, 0.0)
    acc += _dot(pv.to(v.dtype), v, PREC, ACC, UPCAST)
    denom += tl.sum(p, 1)
    if COUNT_KEPT:
        kept += tl.sum(keep.to(ACC), 1)
    return acc, denom, kept


@triton.jit
def _attend_tiles(acc, denom, kept, start, stop, tiles, FROM_LIST: tl.constexpr, q, qq, offs_m, k_base, kn_base, v_base,
                  mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale, xs, xb, al, be, pin_raw,
                  a2, b2, t2, seed, batch, threshold, keep_scale,
                  METRIC: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
                  HAS_MASK: tl.constexpr, BAND_BRANCH: tl.constexpr, COUNT_KEPT: tl.constexpr, DROPOUT: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr,
                  ACC: tl.constexpr, UPCAST: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Key tiles ``start .. stop - 1`` (``FROM_LIST``: entries ``start .. stop - 1`` of ``tiles``)."""
    for i in range(start, stop):
        kb = i
        if FROM_LIST:
            kb = tl.load(tiles + i)
        acc, denom, kept = _attend_tile(
            acc, denom, kept, q, qq, kb, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e,
            skm, skd, svm, sve, smkn, smkm, self_off, scale, xs, xb, al, be, pin_raw, a2, b2, t2,
            seed, batch, threshold, keep_scale,
            METRIC, STEP, CAUSAL, EXCL, HAS_MASK, BAND_BRANCH, COUNT_KEPT, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC,
            UPCAST, EVEN, BLOCK_M)
    return acc, denom, kept


@triton.jit
def _visible_tiles(q_start, n_kb, m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key tiles a query block starting at row ``q_start`` visits (all splits together)."""
    n_vis = n_kb
    if CAUSAL:
        n_vis = tl.minimum(n_kb, tl.cdiv(tl.minimum(m, q_start + BLOCK_M), BLOCK_N))
    return n_vis


@triton.jit
def attend_kernel(
    Q, K, V, QN, KN, MASK, PRM, CONSTS, RS, LIST, COUNT, OUT, LSE, KEPT, ACCP, DENP, KEPTP, SEED,
    sq0, sq1, sqn, sqd, sk0, sk1, skm, skd, sv0, sv1, svm, sve, smk0, smk1, smkn, smkm,
    B1, B, n, m, d, e, n_qb, n_kb, kb_per_split, self_off, threshold,
    METRIC: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
    HAS_MASK: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr, BAND_BRANCH: tl.constexpr,
    SKIP_TILES: tl.constexpr, COUNT_KEPT: tl.constexpr, DROPOUT: tl.constexpr, LAST_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_q, pid_b = _query_block_and_batch(n, BLOCK_M, LAST_FIRST)
    pid_s = tl.program_id(1)
    b0 = (pid_b // B1).to(tl.int64)
    b1 = (pid_b % B1).to(tl.int64)
    q_start = pid_q * BLOCK_M
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < n
    q = tl.load(Q + b0 * sq0 + b1 * sq1 + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < d), other=0.0)
    qq = _sq_norms(QN + pid_b.to(tl.int64) * n, offs_m, n, METRIC, ACC)
    scale = tl.load(CONSTS)
    inv_tau = tl.load(CONSTS + 1)
    seed, keep_scale = _dropout_constants(SEED, CONSTS, inv_tau, DROPOUT)
    rows = pid_b.to(tl.int64) * n + offs_m
    plane = (pid_b.to(tl.int64) * 0 + B) * n
    lo = tl.load(RS + rows, mask=row_ok, other=0.0)
    hi = tl.load(RS + plane + rows, mask=row_ok, other=0.0)
    inv_r = tl.load(RS + 2 * plane + rows, mask=row_ok, other=0.0)
    pin_raw = tl.load(RS + 4 * plane + rows, mask=row_ok, other=0.0)[:, None]
    a2 = tl.load(PRM + rows, mask=row_ok, other=0.5)[:, None]
    b2 = tl.load(PRM + plane + rows, mask=row_ok, other=1.0)[:, None]
    t2 = tl.load(PRM + 2 * plane + rows, mask=row_ok, other=0.5)[:, None]
    factor = _score_factor(scale, METRIC)
    al, be = _coord_coefs(lo[:, None], inv_r[:, None], a2, b2, t2, factor, STEP)
    # x = (s - hi) / τ · log2 e = fma(r, xs, xb): the row maximum has x = 0 (up to rounding)
    xs = factor * inv_tau * LOG2E
    xb = -(hi * inv_tau * LOG2E)[:, None]
    k_base = K + b0 * sk0 + b1 * sk1
    kn_base = KN + pid_b.to(tl.int64) * m
    v_base = V + b0 * sv0 + b1 * sv1
    mask_base = MASK + b0 * smk0 + b1 * smk1

    acc = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    denom = tl.zeros([BLOCK_M], ACC)
    kept = tl.zeros([BLOCK_M], ACC)
    kb_lo = pid_s * kb_per_split
    kb_hi = tl.minimum(n_kb, kb_lo + kb_per_split)
    if CAUSAL:
        kb_hi = tl.minimum(kb_hi, tl.cdiv(tl.minimum(m, q_start + BLOCK_M), BLOCK_N))
    # Block skipping: the query block's list of kept key tiles, shared evenly among the splits.
    # A loop whose tile index is loaded from memory pipelines less well than a plain range, so
    # a block whose list keeps every visible tile runs the plain range instead: exactly one of
    # the two loops has iterations (they run one after the other and share shared memory).
    if SKIP_TILES:
        slot = pid_b.to(tl.int64) * n_qb + pid_q
        count = tl.load(COUNT + slot)
        per = tl.cdiv(count, tl.num_programs(1))
        i_lo = pid_s * per
        i_hi = tl.minimum(count, i_lo + per)
        listed = count < _visible_tiles(q_start, n_kb, m, BLOCK_M, BLOCK_N, CAUSAL)
        i_hi = tl.where(listed, i_hi, i_lo)
        kb_hi = tl.where(listed, kb_lo, kb_hi)
        if CAUSAL:  # listed tiles left of the diagonal block first, without the causal mask
            i_mid = _entries_before(LIST + slot * n_kb, count, (q_start + 1) // BLOCK_N, 1, 64)
            i_mid = tl.maximum(i_lo, tl.minimum(i_hi, i_mid))
            acc, denom, kept = _attend_tiles(
                acc, denom, kept, i_lo, i_mid, LIST + slot * n_kb, True,
                q, qq, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off,
                scale, xs, xb, al, be, pin_raw, a2, b2, t2, seed, pid_b, threshold, keep_scale, METRIC, STEP, False, EXCL,
                HAS_MASK, BAND_BRANCH, COUNT_KEPT, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC, UPCAST, EVEN, BLOCK_M)
            i_lo = i_mid
        acc, denom, kept = _attend_tiles(
            acc, denom, kept, i_lo, i_hi, LIST + slot * n_kb, True,
            q, qq, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale,
            xs, xb, al, be, pin_raw, a2, b2, t2, seed, pid_b, threshold, keep_scale, METRIC, STEP, CAUSAL, EXCL, HAS_MASK,
            BAND_BRANCH, COUNT_KEPT, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC, UPCAST, EVEN, BLOCK_M)
    if CAUSAL:  # tiles left of the diagonal block need no causal mask: fewer selects per score
        kb_mid = _causal_split(q_start, kb_lo, kb_hi, BLOCK_N)
        acc, denom, kept = _attend_tiles(
            acc, denom, kept, kb_lo, kb_mid, LIST, False,
            q, qq, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale,
            xs, xb, al, be, pin_raw, a2, b2, t2, seed, pid_b, threshold, keep_scale, METRIC, STEP, False, EXCL, HAS_MASK,
            BAND_BRANCH, COUNT_KEPT, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC, UPCAST, EVEN, BLOCK_M)
        kb_lo = kb_mid
    acc, denom, kept = _attend_tiles(
        acc, denom, kept, kb_lo, kb_hi, LIST, False,
        q, qq, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale,
        xs, xb, al, be, pin_raw, a2, b2, t2, seed, pid_b, threshold, keep_scale, METRIC, STEP, CAUSAL, EXCL, HAS_MASK,
        BAND_BRANCH, COUNT_KEPT, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC, UPCAST, EVEN, BLOCK_M)

    if SPLIT:
        part = (pid_s.to(tl.int64) * B + pid_b) * n + offs_m
        tl.store(ACCP + part[:, None] * e + offs_e[None, :], acc, mask=row_ok[:, None] & (offs_e[None, :] < e))
        tl.store(DENP + part, denom, mask=row_ok)
        if COUNT_KEPT:
            tl.store(KEPTP + part, kept, mask=row_ok)
    else:
        nonempty = denom > 0.0
        poisoned = hi != hi  # row_stats_kernel: a NaN or inf among the row's valid scores
        out = tl.where(poisoned[:, None], float("nan"), acc / tl.where(nonempty, denom, 1.0)[:, None])
        tl.store(OUT + rows[:, None] * e + offs_e[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_e[None, :] < e))
        lse = tl.where(nonempty, hi * inv_tau + tl.log(tl.where(nonempty, denom, 1.0)), float("-inf"))
        lse = tl.where(poisoned, float("nan"), lse)
        tl.store(LSE + rows, lse, mask=row_ok)
        if COUNT_KEPT:
            tl.store(KEPT + rows, kept, mask=row_ok)
    if not COUNT_KEPT:  # not asked for: NaN marks the count as absent (no separate fill launch)
        if pid_s == 0:
            tl.store(KEPT + rows, tl.full([BLOCK_M], float("nan"), ACC), mask=row_ok)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@triton.jit
def bwd_rows_kernel(LSE, G, OUT, GLSE, LD, B, n, e, HAS_GLSE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_E: tl.constexpr, ACC: tl.constexpr):
    """``LD = (lse, delta)`` per row for the backward kernels: ``delta = rowsum(dO · O) - g_lse``
    and ``lse`` with empty rows' ``-inf`` replaced by 0 (their weights are all 0 anyway)."""
    pid_q, pid_b = _tile_and_batch(tl.cdiv(n, BLOCK_M))
    offs_m = pid_q * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < n
    rows = pid_b.to(tl.int64) * n + offs_m
    tile = rows[:, None] * e + offs_e[None, :]
    tile_ok = row_ok[:, None] & (offs_e[None, :] < e)
    g = tl.load(G + tile, mask=tile_ok, other=0.0).to(ACC)
    o = tl.load(OUT + tile, mask=tile_ok, other=0.0).to(ACC)
    delta = tl.sum(g * o, 1)
    if HAS_GLSE:
        delta -= tl.load(GLSE + rows, mask=row_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    plane = (pid_b.to(tl.int64) * 0 + B) * n
    tl.store(LD + rows, tl.where(lse == float("-inf"), 0.0, lse), mask=row_ok)
    tl.store(LD + plane + rows, delta, mask=row_ok)


@triton.jit
def _backward_rows(RS, LD, PRM, rows, row_ok, plane):
    """Row statistics of the backward: the forward's ``RS`` (``lo, hi, inv_r, empty, pin_raw``
    planes; ``row_stats_kernel``), ``LD`` (``lse, delta``; ``bwd_rows_kernel``) and the step
    parameters (``PRM``: ``a, b, t``) of ``rows``."""
    lo = tl.load(RS + rows, mask=row_ok, other=0.0)
    inv_r = tl.load(RS + 2 * plane + rows, mask=row_ok, other=0.0)
    pin_raw = tl.load(RS + 4 * plane + rows, mask=row_ok, other=0.0)
    lse = tl.load(LD + rows, mask=row_ok, other=0.0)
    delta = tl.load(LD + plane + rows, mask=row_ok, other=0.0)
    a = tl.load(PRM + rows, mask=row_ok, other=0.5)
    b = tl.load(PRM + plane + rows, mask=row_ok, other=1.0)
    t = tl.load(PRM + 2 * plane + rows, mask=row_ok, other=0.5)
    return lo, inv_r, lse, delta, pin_raw, a, b, t


@triton.jit
def _dq_tile(dq, rsum, g_lo, g_hi, g_a, g_b, g_t, q, qq, do, kb, offs_m, k_base, kn_base, v_base, mask_base,
             n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale,
             delta, k1, xs, xb, al, be, pin_raw, inv_r, a2, b2, t2, seed, batch, threshold, keep_scale,
             METRIC: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
             HAS_MASK: tl.constexpr, NEED_RANGE: tl.constexpr, NEED_PARAMS: tl.constexpr, DROPOUT: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
             PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, EVEN: tl.constexpr,
             BLOCK_M: tl.constexpr):
    k, v, r, dist2, valid = _key_tile(
        q, qq, kb, offs_m, k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale,
        METRIC, CAUSAL, EXCL, HAS_MASK, EVEN, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC, UPCAST)
    dp = _dot(do, tl.trans(v).to(do.dtype), PREC, ACC, UPCAST)
    if DROPOUT:  # ∂L/∂w of a dropped score is 0
        dp = tl.where(_dropout_keep(seed, batch, offs_m, kb * BLOCK_N, threshold, BLOCK_N), dp * keep_scale, 0.0)
    dpd = dp - delta[:, None]
    _w, ds, t_lo, t_hi, t_a, t_b, t_t = _score_grad(r, valid, dpd, k1, xs, xb, al, be, pin_raw[:, None], inv_r[:, None], a2, b2, t2, STEP)
    if NEED_RANGE or (STEP == 3 and NEED_PARAMS):  # poly's parameter gradients need them too
        g_lo += tl.sum(t_lo, 1)
        g_hi += tl.sum(t_hi, 1)
    if NEED_PARAMS and STEP != 3:
        g_a += tl.sum(t_a, 1)
        g_b += tl.sum(t_b, 1)
        g_t += tl.sum(t_t, 1)
    coef, g2 = _metric_coef(ds, dist2, scale, METRIC)
    dq += _dot(coef.to(k.dtype), k, PREC, ACC, UPCAST)
    if METRIC != 0:
        rsum += tl.sum(g2, 1)
    return dq, rsum, g_lo, g_hi, g_a, g_b, g_t


@triton.jit
def _route_range(gr, IDX, rows, row_ok, qf, k_base, skm, skd, offs_d, d, DK, dk_row0, scale,
                 METRIC: tl.constexpr, RANGE_DK: tl.constexpr, ACC: tl.constexpr):
    """The range gradient of one extreme: ``gr · ∂s(q_i, k_j)/∂q_i`` with ``j`` the row's
    argmin (or argmax) key, returned for ``dq``; with ``RANGE_DK`` the ``k_j`` part is added into
    ``DK`` (atomically: rows share extreme keys). Empty rows have ``gr = 0``."""
    idx = tl.load(IDX + rows, mask=row_ok, other=0)
    dmask = row_ok[:, None] & (offs_d[None, :] < d)
    kr = tl.load(k_base + idx[:, None].to(tl.int64) * skm + offs_d[None, :] * skd, mask=dmask, other=0.0).to(ACC)
    if METRIC == 0:
        gq = kr * scale
        gk = qf * scale
    else:
        diff = qf - kr
        if METRIC == 1:
            gq = diff * (-2.0 * scale)
        else:
            nrm = tl.sqrt(tl.sum(diff * diff, 1))
            gq = diff * tl.where(nrm > 0.0, -scale / tl.where(nrm > 0.0, nrm, 1.0), 0.0)[:, None]
        gk = -gq
    if RANGE_DK:
        tl.atomic_add(DK + (dk_row0 + idx[:, None].to(tl.int64)) * d + offs_d[None, :], gr[:, None] * gk, mask=dmask)
    return gr[:, None] * gq


@triton.jit
def range_grad_kernel(
    Q, K, CONSTS, GS, AMIN, AMAX, DQ, DK,
    sq0, sq1, sqn, sqd, sk0, sk1, skm, skd, B1, B, n, m, d,
    METRIC: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Route the range gradient ``G_lo, G_hi`` (``GS``, ``(2, B, n)``) through the metric at each
    row's argmin / argmax key: adds into ``DQ`` (rows owned by this program) and, atomically,
    into ``DK`` (rows share extreme keys). One program per query block; runs after the other
    backward kernels."""
    pid_q, pid_b = _tile_and_batch(tl.cdiv(n, BLOCK_M))
    b0 = (pid_b // B1).to(tl.int64)
    b1 = (pid_b % B1).to(tl.int64)
    offs_m = pid_q * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n
    dmask = row_ok[:, None] & (offs_d[None, :] < d)
    rows = pid_b.to(tl.int64) * n + offs_m
    q = tl.load(Q + b0 * sq0 + b1 * sq1 + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                mask=dmask, other=0.0).to(ACC)
    scale = tl.load(CONSTS)
    k_base = K + b0 * sk0 + b1 * sk1
    dk_row0 = pid_b.to(tl.int64) * m
    g_lo = tl.load(GS + rows, mask=row_ok, other=0.0)
    g_hi = tl.load(GS + B * n + rows, mask=row_ok, other=0.0)
    gq = _route_range(g_lo, AMIN, rows, row_ok, q, k_base, skm, skd, offs_d, d, DK, dk_row0, scale,
                      METRIC, NEED_DK, ACC)
    gq += _route_range(g_hi, AMAX, rows, row_ok, q, k_base, skm, skd, offs_d, d, DK, dk_row0, scale,
                       METRIC, NEED_DK, ACC)
    if NEED_DQ:
        dq_ptr = DQ + rows[:, None] * d + offs_d[None, :]
        tl.store(dq_ptr, tl.load(dq_ptr, mask=dmask, other=0.0) + gq, mask=dmask)


@triton.jit
def bwd_dq_kernel(
    Q, K, V, QN, KN, DO, MASK, PRM, CONSTS, RS, LD, LIST, COUNT, DQ, RSUM, SEED,
    sq0, sq1, sqn, sqd, sk0, sk1, skm, skd, sv0, sv1, svm, sve, sdo0, sdon, sdoe,
    smk0, smk1, smkn, smkm,
    B1, B, n, m, d, e, n_kb, kb_per_split, tm_qb, tm_kb, self_off, threshold,
    METRIC: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
    HAS_MASK: tl.constexpr, EVEN: tl.constexpr, SKIP_TILES: tl.constexpr, TM_BM: tl.constexpr,
    TM_BN: tl.constexpr, NEED_RANGE: tl.constexpr, NEED_PARAMS: tl.constexpr, DROPOUT: tl.constexpr,
    LAST_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per query block: ``dq`` (without the range gradient) and the per-row sums ``G_lo, G_hi``
    (with ``NEED_RANGE``) and ``da, db, dt`` (with ``NEED_PARAMS``) over the keys of split
    ``pid_s`` (all linear in the keys' contributions, so splits add up)."""
    pid_q, pid_b = _query_block_and_batch(n, BLOCK_M, LAST_FIRST)
    pid_s = tl.program_id(1)
    b0 = (pid_b // B1).to(tl.int64)
    b1 = (pid_b % B1).to(tl.int64)
    q_start = pid_q * BLOCK_M
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < n
    q = tl.load(Q + b0 * sq0 + b1 * sq1 + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < d), other=0.0)
    qf = q.to(ACC)
    qq = _sq_norms(QN + pid_b.to(tl.int64) * n, offs_m, n, METRIC, ACC)
    do = tl.load(DO + pid_b.to(tl.int64) * sdo0 + offs_m[:, None].to(tl.int64) * sdon + offs_e[None, :] * sdoe,
                 mask=row_ok[:, None] & (offs_e[None, :] < e), other=0.0)
    scale = tl.load(CONSTS)
    inv_tau = tl.load(CONSTS + 1)
    seed, keep_scale = _dropout_constants(SEED, CONSTS, inv_tau, DROPOUT)
    rows = pid_b.to(tl.int64) * n + offs_m
    plane = (pid_b.to(tl.int64) * 0 + B) * n
    lo, inv_r, lse, delta, pin_raw, a, b, t = _backward_rows(RS, LD, PRM, rows, row_ok, plane)
    a2 = a[:, None]
    b2 = b[:, None]
    t2 = t[:, None]
    k1, xs, xb, al, be = _grad_coefs(lo[:, None], inv_r[:, None], lse[:, None], a2, b2, t2, scale, inv_tau,
                                     METRIC, STEP)
    k_base = K + b0 * sk0 + b1 * sk1
    kn_base = KN + pid_b.to(tl.int64) * m
    v_base = V + b0 * sv0 + b1 * sv1
    mask_base = MASK + b0 * smk0 + b1 * smk1

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    rsum = tl.zeros([BLOCK_M], ACC)
    g_lo = tl.zeros([BLOCK_M], ACC)
    g_hi = tl.zeros([BLOCK_M], ACC)
    g_a = tl.zeros([BLOCK_M], ACC)
    g_b = tl.zeros([BLOCK_M], ACC)
    g_t = tl.zeros([BLOCK_M], ACC)
    kb_lo = pid_s * kb_per_split
    kb_hi = tl.minimum(n_kb, kb_lo + kb_per_split)
    if CAUSAL:
        kb_hi = tl.minimum(kb_hi, tl.cdiv(tl.minimum(m, q_start + BLOCK_M), BLOCK_N))
    # Key tiles to visit: the block's list of kept forward tiles (SUB backward tiles each) or the
    # plain range, shared evenly among the splits.
    if SKIP_TILES:
        SUB = TM_BN // BLOCK_N
        slot = pid_b.to(tl.int64) * tm_qb + q_start // TM_BM
        tiles = LIST + slot * tm_kb
        count = tl.load(COUNT + slot)
        per = tl.cdiv(count * SUB, tl.num_programs(1))
        start = pid_s * per
        stop = tl.minimum(count * SUB, start + per)
    else:
        SUB = 1
        tiles = LIST
        start = kb_lo
        stop = kb_hi
    if CAUSAL:  # tiles left of the diagonal block first, without the causal mask
        first_masked = (q_start + 1) // BLOCK_N
        if SKIP_TILES:
            first_masked = _entries_before(tiles, count, first_masked, SUB, 64)
        mid = tl.maximum(start, tl.minimum(stop, first_masked))
        for i in range(start, mid):
            dq, rsum, g_lo, g_hi, g_a, g_b, g_t = _dq_tile(
                dq, rsum, g_lo, g_hi, g_a, g_b, g_t, q, qq, do, _tile_index(i, tiles, SKIP_TILES, SUB), offs_m,
                k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale,
                delta, k1, xs, xb, al, be, pin_raw, inv_r, a2, b2, t2, seed, pid_b, threshold, keep_scale, METRIC, STEP,
                False, EXCL, HAS_MASK, NEED_RANGE, NEED_PARAMS, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC, UPCAST, EVEN, BLOCK_M)
        start = mid
    for i in range(start, stop):
        dq, rsum, g_lo, g_hi, g_a, g_b, g_t = _dq_tile(
            dq, rsum, g_lo, g_hi, g_a, g_b, g_t, q, qq, do, _tile_index(i, tiles, SKIP_TILES, SUB), offs_m,
            k_base, kn_base, v_base, mask_base, n, m, d, e, skm, skd, svm, sve, smkn, smkm, self_off, scale,
            delta, k1, xs, xb, al, be, pin_raw, inv_r, a2, b2, t2, seed, pid_b, threshold, keep_scale, METRIC, STEP,
            CAUSAL, EXCL, HAS_MASK, NEED_RANGE, NEED_PARAMS, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_E, PREC, ACC, UPCAST, EVEN, BLOCK_M)
    if METRIC != 0:
        dq += 2.0 * rsum[:, None] * qf
    if STEP == 3:  # g_lo, g_hi hold ΣG/6, ΣG·z/6 (_score_grad); with ΣG·u, every sum is linear in them
        alpha, beta = _band_coefs(inv_r, a, b, t, STEP)
        sg = 6.0 * g_lo
        sgu = tl.where(inv_r > 0, (6.0 * t * (b - a)) * (g_hi - beta * g_lo), sg)  # u = (z - beta)·t(b - a)
        c_w = 1.0 / (t * (b - a) * (b - a))
        g_a = (sgu - b * sg) * c_w
        g_b = (a * sg - sgu) * c_w
        g_t = ((a + b) * 0.5 * sg - sgu) / t / (t * (b - a))  # t * t is subnormal for t < 1e-19
        g_lo = alpha * (sgu - sg)
        g_hi = -alpha * sgu
    part = (pid_s.to(tl.int64) * B + pid_b) * n + offs_m
    tl.store(DQ + part[:, None] * d + offs_d[None, :], dq, mask=row_ok[:, None] & (offs_d[None, :] < d))
    plane_s = tl.num_programs(1).to(tl.int64) * B * n
    tl.store(RSUM + part, g_lo, mask=row_ok)
    tl.store(RSUM + plane_s + part, g_hi, mask=row_ok)
    tl.store(RSUM + 2 * plane_s + part, g_a, mask=row_ok)
    tl.store(RSUM + 3 * plane_s + part, g_b, mask=row_ok)
    tl.store(RSUM + 4 * plane_s + part, g_t, mask=row_ok)


@triton.jit
def _dkdv_tile(dk, dv, csum, k, v, kk, qb, offs_n, q_base, qn_base, do_base, mask_base, RS, LD, PRM, plane, pid_b,
               n, m, d, e, sqn, sqd, sdon, sdoe, smkn, smkm, self_off, scale, inv_tau,
               k_start, seed, threshold, keep_scale,
               METRIC: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
               HAS_MASK: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, DV_FIRST: tl.constexpr,
               DROPOUT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
               PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, EVEN: tl.constexpr,
               BLOCK_N: tl.constexpr):
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < n
    rows = pid_b.to(tl.int64) * n + offs_m
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < d), other=0.0)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sdon + offs_e[None, :] * sdoe,
                 mask=row_ok[:, None] & (offs_e[None, :] < e), other=0.0)
    lo, inv_r, lse, delta, pin_raw, a, b, t = _backward_rows(RS, LD, PRM, rows, row_ok, plane)
    qq = _sq_norms(qn_base, offs_m, n, METRIC, ACC)
    r, dist2 = _scores(q, k, qq, kk, scale, METRIC, PREC, ACC, UPCAST)
    valid = _validity(offs_m, offs_n, n, m, mask_base, smkn, smkm, self_off, HAS_MASK, CAUSAL, EXCL, EVEN, BLOCK_M, BLOCK_N)
    a2 = a[:, None]
    b2 = b[:, None]
    t2 = t[:, None]
    k1, xs, xb, al, be = _grad_coefs(lo[:, None], inv_r[:, None], lse[:, None], a2, b2, t2, scale, inv_tau,
                                     METRIC, STEP)
    survive = valid
    if DROPOUT:
        survive = _dropout_keep(seed, pid_b, offs_m, k_start, threshold, BLOCK_N)
    if DV_FIRST:  # dv before dO·vᵀ is live (see _bwd_weight)
        if NEED_DV:
            w = _bwd_weight(r, valid, xs, xb, al, be, pin_raw[:, None], a2, b2, t2, STEP)
            if DROPOUT:
                w = tl.where(survive, w * keep_scale, 0.0)
            dv += _dot(tl.trans(w).to(do.dtype), do, PREC, ACC, UPCAST)
    dpd = r * 0.0
    if NEED_DK:
        dp = _dot(do, tl.trans(v).to(do.dtype), PREC, ACC, UPCAST)
        if DROPOUT:  # ∂L/∂w of a dropped score is 0
            dp = tl.where(survive, dp * keep_scale, 0.0)
        dpd = dp - delta[:, None]
    w, ds, _lo, _hi, _a, _b, _t = _score_grad(r, valid, dpd, k1, xs, xb, al, be, pin_raw[:, None], inv_r[:, None],
                                              a2, b2, t2, STEP)
    if not DV_FIRST:
        if NEED_DV:
            if DROPOUT:
                w = tl.where(survive, w * keep_scale, 0.0)
            dv += _dot(tl.trans(w).to(do.dtype), do, PREC, ACC, UPCAST)
    if NEED_DK:
        coef, g2 = _metric_coef(ds, dist2, scale, METRIC)
        dk += _dot(tl.trans(coef).to(q.dtype), q, PREC, ACC, UPCAST)
        if METRIC != 0:
            csum += tl.sum(g2, 0)
    return dk, dv, csum


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, QN, KN, DO, MASK, PRM, CONSTS, RS, LD, LIST, COUNT, DK, DV, SEED,
    sq0, sq1, sqn, sqd, sk0, sk1, skm, skd, sv0, sv1, svm, sve, sdo0, sdon, sdoe,
    smk0, smk1, smkn, smkm,
    B1, B, n, m, d, e, n_qb, tm_qb, tm_kb, self_off, threshold,
    METRIC: tl.constexpr, STEP: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
    HAS_MASK: tl.constexpr, EVEN: tl.constexpr, SKIP_TILES: tl.constexpr, TM_BM: tl.constexpr,
    TM_BN: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, DV_FIRST: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per key block: ``dk`` (without the range scatter) and ``dv``, looping over query blocks."""
    pid_k, pid_b = _tile_and_batch(tl.cdiv(m, BLOCK_N))
    b0 = (pid_b // B1).to(tl.int64)
    b1 = (pid_b % B1).to(tl.int64)
    k_start = pid_k * BLOCK_N
    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    col_ok = offs_n < m
    k = tl.load(K + b0 * sk0 + b1 * sk1 + offs_n[:, None].to(tl.int64) * skm + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < d), other=0.0)
    v = tl.load(V + b0 * sv0 + b1 * sv1 + offs_n[:, None].to(tl.int64) * svm + offs_e[None, :] * sve,
                mask=col_ok[:, None] & (offs_e[None, :] < e), other=0.0)
    kf = k.to(ACC)
    kk = _sq_norms(KN + pid_b.to(tl.int64) * m, offs_n, m, METRIC, ACC)
    scale = tl.load(CONSTS)
    inv_tau = tl.load(CONSTS + 1)
    seed, keep_scale = _dropout_constants(SEED, CONSTS, inv_tau, DROPOUT)
    plane = (pid_b.to(tl.int64) * 0 + B) * n
    q_base = Q + b0 * sq0 + b1 * sq1
    qn_base = QN + pid_b.to(tl.int64) * n
    do_base = DO + pid_b.to(tl.int64) * sdo0
    mask_base = MASK + b0 * smk0 + b1 * smk1

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_E], ACC)
    csum = tl.zeros([BLOCK_N], ACC)
    # Query blocks to visit: the key block's list of kept forward tiles (SUB backward query blocks
    # each) or the plain range (from the diagonal on, if causal).
    if SKIP_TILES:
        SUB = TM_BM // BLOCK_M
        slot = pid_b.to(tl.int64) * tm_kb + k_start // TM_BN
        tiles = LIST + slot * tm_qb
        count = tl.load(COUNT + slot)
        start = 0
        stop = count * SUB
    else:
        SUB = 1
        tiles = LIST
        start = 0
        if CAUSAL:
            start = k_start // BLOCK_M
        stop = n_qb
    if CAUSAL:  # the diagonal query blocks first, with the causal mask; every later one sees all keys
        first_full = tl.cdiv(k_start + BLOCK_N - 1, BLOCK_M)
        if SKIP_TILES:
            first_full = _entries_before(tiles, count, first_full, SUB, 64)
        mid = tl.maximum(start, tl.minimum(stop, first_full))
        for i in range(start, mid):
            dk, dv, csum = _dkdv_tile(
                dk, dv, csum, k, v, kk, _tile_index(i, tiles, SKIP_TILES, SUB), offs_n, q_base, qn_base, do_base, mask_base,
                RS, LD, PRM, plane, pid_b, n, m, d, e, sqn, sqd, sdon, sdoe, smkn, smkm, self_off, scale, inv_tau,
                k_start, seed, threshold, keep_scale,
                METRIC, STEP, True, EXCL, HAS_MASK, NEED_DK, NEED_DV, DV_FIRST, DROPOUT, BLOCK_M, BLOCK_D, BLOCK_E,
                PREC, ACC, UPCAST, EVEN, BLOCK_N)
        start = mid
    for i in range(start, stop):  # no causal mask here (see above)
        dk, dv, csum = _dkdv_tile(
            dk, dv, csum, k, v, kk, _tile_index(i, tiles, SKIP_TILES, SUB), offs_n, q_base, qn_base, do_base, mask_base,
            RS, LD, PRM, plane, pid_b, n, m, d, e, sqn, sqd, sdon, sdoe, smkn, smkm, self_off, scale, inv_tau,
            k_start, seed, threshold, keep_scale,
            METRIC, STEP, False, EXCL, HAS_MASK, NEED_DK, NEED_DV, DV_FIRST, DROPOUT, BLOCK_M, BLOCK_D, BLOCK_E,
            PREC, ACC, UPCAST, EVEN, BLOCK_N)
    if METRIC != 0:
        dk += 2.0 * csum[:, None] * kf
    cols = pid_b.to(tl.int64) * m + offs_n
    if NEED_DK:
        tl.store(DK + cols[:, None] * d + offs_d[None, :], dk, mask=col_ok[:, None] & (offs_d[None, :] < d))
    if NEED_DV:
        tl.store(DV + cols[:, None] * e + offs_e[None, :], dv, mask=col_ok[:, None] & (offs_e[None, :] < e))
