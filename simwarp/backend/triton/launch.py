"""Host side of the fused backend: kernel loading, launch plans and the autograd Function.

For ``l2`` and ``sqeuclidean`` both start with ``row_norms_kernel`` (the squared norms every
kernel loads, so the backward recomputes the forward's scores exactly).
Forward = ``range_kernel`` (pass 1: row min/max, first argmin/argmax, per-tile score maxima),
``row_stats_kernel`` (row ranges over the key splits, tiles to skip and the lists of tiles to
visit) and ``attend_kernel`` (pass 2: step, softmax with the row maximum known from pass 1,
``p @ v``, tile skipping). Backward = ``bwd_dq_kernel`` (``dq`` and the per-row sums ``G_lo, G_hi, da, db,
dt``) and ``bwd_dkdv_kernel`` (``dk``, ``dv``), both recomputing scores, then
``range_grad_kernel`` routes ``G_lo, G_hi`` to each row's argmin/argmax key, into ``dq`` and
atomically into ``dk`` (docs/gradients.md).

When a grid has few programs (the neighbour-bank case: few queries, up to millions of keys),
the key axis is split over ``num_splits`` programs per query block; since the row maximum is
known after pass 1 the partial sums combine by plain addition.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from simwarp import steps as _steps
from simwarp._autograd import first_order
from simwarp.backend.common import (
    WarpSpec,
    broadcast_shape,
    device_constants,
    make_spec,
    work_dtype,
)
from simwarp.similarity import DISTANCE_METRICS, default_scale, distance_centre, unit_rows

METRIC_CODES = {"dot": 0, "cosine": 0, "sqeuclidean": 1, "l2": 2}
#: Steps with a kernel implementation, and the registered function each must still be.
KERNEL_STEPS = {"none": 0, "sigmoidal": 1, "log": 2, "poly": 3}
MAX_HEAD_DIM = 256
MAX_VALUE_DIM = 256

_MODULES: dict[bool, object] = {}
#: Held while a kernel module loads: the interpreted load sets ``TRITON_INTERPRET`` for the process.
_MODULES_LOCK = threading.Lock()
#: Launch option of every kernel: multiply-adds fused (FFMA), which the per-score arithmetic is
#: written for. Triton <= 3.9 fuses by default; 3.10 will not, and 3.9 warns when it is left unset.
_FUSION = dict(enable_fp_fusion=True)


def _launches_on(device_of):
    """Run the decorated launcher with the inputs' CUDA device current (``device_of`` maps its
    arguments to that device). Triton launches on the *current* device and its current stream,
    not on the tensors' device: with ``q`` on ``cuda:1`` while ``cuda:0`` is current (a model
    split over GPUs in one process), the kernels would fault or read unordered memory."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            device = device_of(*args, **kwargs)
            if device.type != "cuda":
                return fn(*args, **kwargs)
            with torch.cuda.device(device):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: CPU tensors then run the kernels in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_module(interpret: bool):
    """The kernels compiled for the GPU (``interpret=False``) or for Triton's CPU interpreter.

    The interpreted copy is a second load of ``kernels.py`` made with ``TRITON_INTERPRET=1``
    (``triton.jit`` decides at decoration time), so it works whatever was imported before.
    """
    with _MODULES_LOCK:
        if interpret not in _MODULES:
            _MODULES[interpret] = _interpreted_kernels() if interpret else importlib.import_module(f"{__package__}.kernels")
        return _MODULES[interpret]


def _interpreted_kernels():
    path = Path(__file__).with_name("kernels.py")
    spec = importlib.util.spec_from_file_location("simwarp.backend.triton._kernels_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


@dataclass(frozen=True)
class KernelConfig:
    """Launch knobs; ``None`` = a heuristic default for the inputs.

    Attributes:
        block_m, block_n: forward query/key tile (also the granularity of block skipping).
        bwd_block_m, bwd_block_n: tiles of the ``dq`` kernel (query blocks over key tiles);
            must divide ``block_m`` / ``block_n``.
        bwd_kv_block_m, bwd_kv_block_n: tiles of the ``dk``/``dv`` kernel (key blocks over
            query tiles); must divide ``block_m`` / ``block_n``.
        num_splits: key-axis splits per query block (``None``: automatic, more when the grid
            is small, e.g. a neighbour bank with few queries).
        num_warps, num_stages, bwd_num_warps, bwd_num_stages: Triton launch options.
        allow_tf32: float32 products in one TF32 pass (faster, ~1e-3 relative error);
            default False = three TF32 passes (``tf32x3``: float32 accuracy on tensor cores).
        band_branch: evaluate the step's band math only in tiles that have in-band entries.
        block_skipping: skip key tiles that every row of a query block drops (exact: their
            weights are 0). Pays on inputs with local structure; without it the tile loop
            has no branch, which lets Triton pipeline the loads (faster on dense patterns).
        pipeline_range: pass 1 issues the next tile's product before reducing the current
            one (tensor cores and min/max overlap, but twice the accumulator registers);
            off until timed on a GPU (``benchmarks/bench_attention_gpu.py --sweep``).
        heavy_first: under a causal mask, launch each batch entry's query blocks last to
            first in the kernels that loop over keys per query block (pass 1, pass 2, ``dq``):
            the last blocks see the most keys, so the grid's tail is left to light blocks.
            Same results bit for bit; off until timed on a GPU (``--sweep``).
    """

    block_m: int | None = None
    block_n: int | None = None
    bwd_block_m: int | None = None
    bwd_block_n: int | None = None
    bwd_kv_block_m: int | None = None
    bwd_kv_block_n: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    bwd_num_warps: int | None = None
    bwd_num_stages: int | None = None
    allow_tf32: bool = False
    band_branch: bool = True
    block_skipping: bool = True
    pipeline_range: bool = False
    heavy_first: bool = False


@dataclass(frozen=True)
class _Plan:
    metric: int
    step: int
    scale: float
    inv_tau: float
    causal: bool
    exclude_self: bool
    detach_range: bool
    interpret: bool
    self_offset: int
    count_kept: bool
    grad_enabled: bool
    config: KernelConfig
    dropout_threshold: int = 0  # dropout_p in units of 2^-16 (kernels._dropout_keep); 0 = off


def _pow2(x: int, low: int = 16) -> int:
    return max(low, 1 << max(0, (x - 1).bit_length()))


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: WarpSpec) -> str | None:
    """Why the fused kernels cannot run this call (``None`` if they can)."""
    dev = q.device.type
    if dev != "cuda" and not (dev == "cpu" and interpreting()):
        return f"tensors on {q.device} (needs CUDA, or CPU tensors with TRITON_INTERPRET=1)"
    allowed = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if dev == "cpu" else ())
    if q.dtype not in allowed:
        return f"dtype {q.dtype} (supported: {', '.join(str(x) for x in allowed)})"
    if spec.metric not in METRIC_CODES:
        return f"metric {spec.metric!r} (supported: {', '.join(METRIC_CODES)})"
    name = spec.step.name
    if name not in KERNEL_STEPS or getattr(_steps, f"{name}_log_mask", None) is not spec.step.log_mask:
        return f"step {name!r} (kernel steps: {', '.join(KERNEL_STEPS)}; user or overwritten steps run on impl='chunked')"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if v.shape[-1] > MAX_VALUE_DIM:
        return f"value dim {v.shape[-1]} > {MAX_VALUE_DIM}"
    return None


@functools.lru_cache(maxsize=256)  # a pure function of hashable arguments, on every call's path
def _resolve_config(
    cfg: KernelConfig, d: int, dtype: torch.dtype, step: int = 1, causal: bool = False
) -> KernelConfig:
    # Defaults timed on an H100 and an H200 (benchmarks/RESULTS.md) and checked with ptxas -v
    # for register spills: 128x128 forward tiles for none when the mask is not causal (the
    # diagonal tiles' extra selects spill there), 128x64 otherwise (poly, non-causal, H100:
    # 1.14x faster than 128x128 at d = 64 with four warps, 1.05x at d = 128 with eight); dq
    # 64x32 (64x64 for non-causal none/poly at d = 128: 1.10x faster) and dk/dv 64x64 for
    # none/poly (1.13-1.27x faster than 32x64 at the target shapes; the sigmoidal/log tiles
    # would spill), all with four warps. float32 products run as three TF32 passes (tf32x3)
    # and take smaller tiles.
    big = d > 128
    wide = dtype in (torch.float32, torch.float64)
    bm = cfg.block_m or (64 if big or wide else 128)
    bn = cfg.block_n or (32 if big else 64 if wide or causal or step != 0 else 128)
    # the non-causal poly forward at d <= 64 with its default 128x64 tiles: four warps
    four_warps = step == 3 and not (causal or wide) and d <= 64 and (bm, bn) == (128, 64)
    small = 32 if big or wide else None
    bbm = cfg.bwd_block_m or min(bm, small or 64)
    bbn = cfg.bwd_block_n or min(bn, 64 if step in (0, 3) and not (big or wide or causal) and d > 64 else 32)
    kvm = cfg.bwd_kv_block_m or min(bm, 64 if step in (0, 3) and not (big or wide) else 32)
    kvn = cfg.bwd_kv_block_n or min(bn, small or 64)
    tiles = (("block_m", bm), ("block_n", bn), ("bwd_block_m", bbm), ("bwd_block_n", bbn),
             ("bwd_kv_block_m", kvm), ("bwd_kv_block_n", kvn))
    for name, x in tiles:
        if x < 16 or x & (x - 1):
            raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {x}")
    if bm % bbm or bn % bbn or bm % kvm or bn % kvn:
        raise ValueError(
            f"backward tiles (dq {bbm}x{bbn}, dk/dv {kvm}x{kvn}) must divide the forward tiles ({bm}x{bn}) "
            "(block skipping reuses them)"
        )
    return replace(
        cfg, block_m=bm, block_n=bn, bwd_block_m=bbm, bwd_block_n=bbn, bwd_kv_block_m=kvm, bwd_kv_block_n=kvn,
        num_warps=cfg.num_warps or (4 if four_warps else 8),
        # float32 at d > 128: two stages of K/V tiles need 256 KiB of shared memory, over sm_90's 227
        num_stages=cfg.num_stages or (3 if d <= 64 else 1 if big and wide else 2),
        bwd_num_warps=cfg.bwd_num_warps or (8 if wide or big else 4),
        bwd_num_stages=cfg.bwd_num_stages or (2 if d <= 128 else 1),
    )


def _num_splits(cfg: KernelConfig, programs: int, n_kb: int, device: torch.device) -> int:
    if cfg.num_splits is not None:
        if cfg.num_splits < 1:
            raise ValueError(f"KernelConfig.num_splits must be >= 1, got {cfg.num_splits}")
        return min(cfg.num_splits, n_kb)
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= target:
        return 1
    return max(1, min(target // max(programs, 1), n_kb // 8))


def _view4(x: torch.Tensor, batch: torch.Size, rows: int, cols: int) -> torch.Tensor:
    """``x`` broadcast to ``(*batch, rows, cols)`` as a ``(B0, B1, rows, cols)`` view (a copy
    only when the broadcast leading dims cannot be merged, or when the feature axis's offsets
    would overflow the kernels' 32-bit arithmetic: a feature-major bank ``k = bank_t.T`` of
    more than ~2^31 / d rows)."""
    if x.shape[-1] > 1 and x.stride(-1) * (x.shape[-1] - 1) >= 2**31:
        x = x.contiguous()
    b1 = batch[-1] if len(batch) else 1
    b0 = math.prod(batch) // b1 if b1 else 0
    return x.expand(*batch, rows, cols).reshape(b0, b1, rows, cols)


def _tl_acc(mod, dtype: torch.dtype):
    return mod.tl.float64 if dtype == torch.float64 else mod.tl.float32


class _TritonWarp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, t, mask, seed, plan: _Plan):
        # needs_input_grad says True under torch.no_grad too: the plan knows the grad mode
        track_arg = plan.grad_enabled and _tracks_range(plan.step, plan.detach_range, *ctx.needs_input_grad[:2])
        out_b, stats, counts, saved, dims = _launch_forward(q, k, v, a, b, t, mask, seed, plan, track_arg)
        ctx.plan, ctx.dims, ctx.has_mask = plan, dims, mask is not None
        ctx.save_for_backward(*saved, *(() if mask is None else (mask,)))
        # (no unaliased(): under torch.compile the fused path runs as custom operators, not this Function)
        ctx.mark_non_differentiable(*stats[1:], counts)
        return (out_b, *stats, counts)

    @staticmethod
    @first_order
    def backward(ctx, g_out, g_lse, *_unused):
        mask = ctx.saved_tensors[17] if ctx.has_mask else None
        grads = _launch_backward(ctx.plan, ctx.dims, ctx.saved_tensors[:17], mask, g_out, g_lse,
                                 _read_inputs(ctx.plan.step, ctx.needs_input_grad[:6]))
        return (*grads, None, None, None)


def _read_inputs(step: int, needs) -> tuple[bool, ...]:
    """``needs`` (of ``q, k, v, a, b, t``) without the step parameters that kernel step ``step``
    never reads (``none``: all three, ``log``: ``a``): their gradient is ``None``, as on the
    dense and chunked paths, and the kernels skip their sums."""
    q, k, v, a, b, t = (bool(x) for x in needs)
    return q, k, v, a and step not in (0, 2), b and step != 0, t and step != 0


def _dims(q, k, v, cfg: KernelConfig) -> tuple:
    """``(batch, B, B1, n, m, d, e, n_qb, n_kb)`` of a call: the broadcast batch, its size and
    last dim, the sizes, and the forward's query/key tile counts."""
    batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    n, m, d, e = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return (batch, math.prod(batch), batch[-1] if len(batch) else 1, n, m, d, e,
            triton_cdiv(n, cfg.block_m), triton_cdiv(m, cfg.block_n))


@_launches_on(lambda q, *args, **kwargs: q.device)
def _launch_forward(q, k, v, a, b, t, mask, seed, plan: _Plan, track_arg: bool):
    """The forward kernels. Returns ``(out, [lse, kept, lo, hi, empty], skip_counts, saved,
    dims)``: ``saved`` (17 tensors) and ``dims`` are what :func:`_launch_backward` needs."""
    mod = kernel_module(plan.interpret)
    cfg = plan.config
    acc = work_dtype(q.dtype)
    tl_acc = _tl_acc(mod, q.dtype)
    prec = _precision(q.dtype, cfg)
    dev = q.device
    dims = batch, B, B1, n, m, d, e, n_qb, n_kb = _dims(q, k, v, cfg)
    # Pass 1 (after the distance metrics' norms) goes to the GPU first: everything else is host
    # work that overlaps it.
    q4, k4 = _view4(q, batch, n, d), _view4(k, batch, m, d)
    mask4 = _mask4(mask, batch, n, m, q4)
    consts = _consts(plan, acc, dev)
    if seed is None:  # no dropout: the kernels never read it
        seed = consts
    BM, BN = cfg.block_m, cfg.block_n
    BD, BE = _pow2(d), _pow2(e)
    S = _num_splits(cfg, B * n_qb, n_kb, dev)
    kps = triton_cdiv(n_kb, S)
    S = triton_cdiv(n_kb, kps)
    common = dict(METRIC=plan.metric, CAUSAL=plan.causal, EXCL=plan.exclude_self, HAS_MASK=mask is not None,
                  EVEN=_even_tiles(n, m, cfg), LAST_FIRST=plan.causal and cfg.heavy_first,
                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, PREC=prec, ACC=tl_acc,
                  UPCAST=plan.interpret and q.dtype != torch.float64, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_FUSION)
    strides = (*q4.stride(), *k4.stride())
    mstrides = mask4.stride()

    lo_p, hi_p = _buffers(acc, dev, (S, B, n), (S, B, n))
    # without tracking the argmin/argmax pointers are never dereferenced: any tensor will do
    amin_p, amax_p = _buffers(torch.int32, dev, (S, B, n), (S, B, n)) if track_arg else (lo_p, lo_p)
    tmax_shape = (B, n_qb, n_kb, BM // mod.TMAX_ROWS.value) if cfg.block_skipping else (1,)
    tmax = torch.empty(tmax_shape, dtype=acc, device=dev)  # visited tiles: written
    forward_grid = grid(n_qb, B, S)
    qn, kn = _sq_norms(mod, plan, q4, k4, B, B1, acc, consts)
    mod.range_kernel[forward_grid](
        q4, k4, qn, kn, mask4, consts, lo_p, hi_p, amin_p, amax_p, tmax,
        *strides, *mstrides, B1, B, n, m, d, n_qb, n_kb, kps, plan.self_offset, TRACK_ARG=track_arg,
        STORE_TMAX=cfg.block_skipping, PIPELINE=cfg.pipeline_range, **common,
    )
    v4 = _view4(v, batch, m, e)
    prm = torch.stack([p.to(acc).expand(*batch, n, 1).reshape(B, n) if p.dim() else p.to(acc).expand(B, n)
                       for p in (a, b, t)]).contiguous()
    # Row ranges from the splits (and, with block skipping, the tiles every row drops and
    # each query block's list of tiles to visit), all in one launch.
    rs = torch.empty((5, B, n), dtype=acc, device=dev)  # lo, hi, inv_r, empty, pin_raw (kernels._step_coord)
    empty = torch.empty((B, n), dtype=torch.bool, device=dev)
    argmin, argmax = _buffers(torch.int32, dev, (B, n), (B, n)) if track_arg else (amin_p, amax_p)
    if cfg.block_skipping:
        flags = torch.empty((B, n_qb, n_kb), dtype=torch.int8, device=dev)
        counts, row_list, row_count = _buffers(torch.int32, dev, (B, n_qb, 2), (B, n_qb, n_kb), (B, n_qb))
    else:  # the lists are never read: the counts (zero skipped, zero visited) stand in
        counts = torch.zeros((1, 2), dtype=torch.int32, device=dev)
        flags = row_list = row_count = counts
    mod.row_stats_kernel[grid(n_qb, B)](
        lo_p, hi_p, amin_p, amax_p, prm, consts, tmax, rs, empty.view(torch.int8), argmin, argmax,
        flags, counts, row_list, row_count, S, B, n, m, n_qb, n_kb,
        METRIC=plan.metric, STEP=plan.step, CAUSAL=plan.causal, TRACK_ARG=track_arg, SKIP=cfg.block_skipping,
        BLOCK_M=BM, BLOCK_N=BN, TILES=min(64, _pow2(n_kb)), num_warps=4, **_FUSION,
    )
    lo, hi = rs[0], rs[1]

    out = torch.empty((B, n, e), dtype=q.dtype, device=dev)
    lse = torch.empty((B, n), dtype=acc, device=dev)
    kept = torch.empty((B, n), dtype=acc, device=dev)  # NaN from the kernel without count_kept
    if S > 1:
        accp, denp, keptp = _buffers(acc, dev, (S, B, n, e), (S, B, n), (S, B, n))
    else:
        accp = denp = keptp = lse
    mod.attend_kernel[forward_grid](
        q4, k4, v4, qn, kn, mask4, prm, consts, rs, row_list, row_count, out, lse, kept, accp, denp, keptp, seed,
        *strides, *v4.stride(), *mstrides, B1, B, n, m, d, e, n_qb, n_kb, kps, plan.self_offset,
        plan.dropout_threshold, STEP=plan.step, SPLIT=S > 1, BAND_BRANCH=cfg.band_branch,
        SKIP_TILES=cfg.block_skipping, COUNT_KEPT=plan.count_kept, DROPOUT=plan.dropout_threshold > 0,
        BLOCK_E=BE, **common,
    )
    if S > 1:
        den = denp.sum(0)
        nonempty = den > 0
        den1 = torch.where(nonempty, den, 1.0)
        out = torch.where(nonempty.unsqueeze(-1), accp.sum(0) / den1.unsqueeze(-1), 0.0)
        poisoned = hi.isnan()  # NaN or inf among the row's scores (kernels.row_stats_kernel)
        out = out.masked_fill(poisoned.unsqueeze(-1), math.nan).to(q.dtype)
        lse = torch.where(nonempty, hi * plan.inv_tau + torch.log(den1), -math.inf).masked_fill(poisoned, math.nan)
        if plan.count_kept:
            kept = keptp.sum(0)

    saved = (q, k, v, a, b, t, out, lse, rs, prm, consts, argmin, argmax, flags, row_list, row_count, seed)
    out_b = out.view(*batch, n, e)
    stats = [x.view(*batch, n) for x in (lse, kept, lo, hi, empty)]
    return out_b, stats, counts, saved, dims


@_launches_on(lambda plan, dims, saved, *args, **kwargs: saved[0].device)
def _launch_backward(plan: _Plan, dims, saved, mask, g_out, g_lse, needs):
    """The backward kernels: gradients of ``q, k, v, a, b, t`` (``None`` where ``needs`` is False)."""
    cfg = plan.config
    mod = kernel_module(plan.interpret)
    batch, B, B1, n, m, d, e, tm_qb, tm_kb = dims
    q, k, v, a, b, t, out, lse, rs, prm, consts, argmin, argmax, flags, row_list, row_count, seed = saved
    need_q, need_k, need_v, need_a, need_b, need_t = needs
    dev = q.device
    acc = work_dtype(q.dtype)
    tl_acc = _tl_acc(mod, q.dtype)
    prec = _precision(q.dtype, cfg)

    g = torch.zeros((B, n, e), dtype=q.dtype, device=dev) if g_out is None else g_out.reshape(B, n, e)
    g = g.to(v.dtype).contiguous()
    ld = torch.empty((2, B, n), dtype=acc, device=dev)  # lse (0 on empty rows), delta
    glse = ld if g_lse is None else g_lse.reshape(B, n).to(acc).contiguous()
    mod.bwd_rows_kernel[grid(triton_cdiv(n, 32), B)](
        lse, g, out, glse, ld, B, n, e, HAS_GLSE=g_lse is not None, BLOCK_M=32, BLOCK_E=_pow2(e), ACC=tl_acc,
        num_warps=4, **_FUSION,
    )
    q4, k4, v4 = _view4(q, batch, n, d), _view4(k, batch, m, d), _view4(v, batch, m, e)
    mask4 = _mask4(mask, batch, n, m, q4)
    BM, BN = cfg.bwd_block_m, cfg.bwd_block_n
    BD, BE = _pow2(d), _pow2(e)
    n_qb, n_kb = triton_cdiv(n, BM), triton_cdiv(m, BN)
    track_range = _tracks_range(plan.step, plan.detach_range, need_q, need_k)
    common = dict(METRIC=plan.metric, STEP=plan.step, CAUSAL=plan.causal, EXCL=plan.exclude_self,
                  HAS_MASK=mask is not None, EVEN=_even_tiles(n, m, cfg),
                  SKIP_TILES=cfg.block_skipping, TM_BM=cfg.block_m,
                  TM_BN=cfg.block_n, BLOCK_D=BD, BLOCK_E=BE, PREC=prec, ACC=tl_acc, UPCAST=plan.interpret and q.dtype != torch.float64,
                  DROPOUT=plan.dropout_threshold > 0,
                  num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages, **_FUSION)
    args = (*q4.stride(), *k4.stride(), *v4.stride(), *g.stride(), *mask4.stride())

    dk = dv = None
    need_dq = need_q or need_a or need_b or need_t or track_range
    if need_dq or need_k or need_v:  # the forward's bits: same kernel, same inputs
        qn, kn = _sq_norms(mod, plan, q4, k4, B, B1, acc, rs)
    if need_k or need_v:
        dk = torch.empty((B, m, d), dtype=acc, device=dev) if need_k else rs
        dv = torch.empty((B, m, e), dtype=acc, device=dev) if need_v else rs
        col_list, col_count = _column_lists(mod, flags) if cfg.block_skipping else (flags, flags)
        KM, KN = cfg.bwd_kv_block_m, cfg.bwd_kv_block_n
        mod.bwd_dkdv_kernel[grid(triton_cdiv(m, KN), B)](
            q4, k4, v4, qn, kn, g, mask4, prm, consts, rs, ld, col_list, col_count, dk, dv, seed, *args,
            B1, B, n, m, d, e, triton_cdiv(n, KM), tm_qb, tm_kb, plan.self_offset, plan.dropout_threshold,
            NEED_DK=need_k, NEED_DV=need_v, DV_FIRST=acc == q.dtype, BLOCK_M=KM, BLOCK_N=KN, **common,
        )
    # dq after dk/dv: the range gradient is added into both at the end.
    dq = da = db = dt = None
    if need_dq:
        S = _num_splits(cfg, B * n_qb, n_kb, dev)
        kps = triton_cdiv(n_kb, S)
        S = triton_cdiv(n_kb, kps)
        dq_p = torch.empty((S, B, n, d), dtype=acc, device=dev)
        rsum = torch.empty((5, S, B, n), dtype=acc, device=dev)
        mod.bwd_dq_kernel[grid(n_qb, B, S)](
            q4, k4, v4, qn, kn, g, mask4, prm, consts, rs, ld, row_list, row_count, dq_p, rsum, seed, *args,
            B1, B, n, m, d, e, n_kb, kps, tm_qb, tm_kb, plan.self_offset, plan.dropout_threshold,
            NEED_RANGE=track_range, NEED_PARAMS=need_a or need_b or need_t, LAST_FIRST=plan.causal and cfg.heavy_first,
            BLOCK_M=BM, BLOCK_N=BN, **common,
        )
        sums = rsum[:, 0] if S == 1 else rsum.sum(1)
        dq = dq_p[0] if S == 1 else dq_p.sum(0)
        da, db, dt = sums[2], sums[3], sums[4]
        if track_range:  # G_lo, G_hi to each row's argmin / argmax key, into dq and dk
            mod.range_grad_kernel[grid(triton_cdiv(n, 32), B)](
                q4, k4, consts, sums, argmin, argmax, dq, dk if need_k else rs,
                *q4.stride(), *k4.stride(), B1, B, n, m, d,
                METRIC=plan.metric, NEED_DQ=need_q, NEED_DK=need_k, BLOCK_M=32, BLOCK_D=BD, ACC=tl_acc,
                num_warps=4, **_FUSION,
            )
    if dq is not None:
        dq = dq.view(*batch, n, d)

    if dk is not None:
        dk = dk.view(*batch, m, d) if need_k else None
        dv = dv.view(*batch, m, e) if need_v else None

    def reduce(grad, like, need):
        if not need or grad is None:
            return None
        return grad.sum_to_size(like.shape).to(like.dtype)

    def reduce_param(grad, p, need):
        if not need or grad is None:
            return None
        grad = grad.view(*batch, n)
        grad = grad.unsqueeze(-1).sum_to_size(p.shape) if p.dim() else grad.sum()
        return grad.to(p.dtype)

    return (
        reduce(dq, q, need_q),
        reduce(dk, k, need_k),
        reduce(dv, v, need_v),
        reduce_param(da, a, need_a), reduce_param(db, b, need_b), reduce_param(dt, t, need_t),
    )


def _sq_norms(mod, plan: _Plan, q4, k4, B: int, B1: int, acc: torch.dtype, unused: torch.Tensor):
    """``(‖q‖², ‖k‖²)`` as ``(B, n)``, ``(B, m)`` tensors for the distance metrics, from one
    ``kernels.row_norms_kernel`` launch; for ``dot`` the kernels read neither: ``unused`` stands in."""
    if plan.metric == 0:
        return unused, unused
    (n, d), m = q4.shape[-2:], k4.shape[-2]
    qn = torch.empty((B, n), dtype=acc, device=q4.device)
    kn = torch.empty((B, m), dtype=acc, device=q4.device)
    rows = 32
    mod.row_norms_kernel[grid(triton_cdiv(n, rows) + triton_cdiv(m, rows), B)](
        q4, k4, qn, kn, *q4.stride(), *k4.stride(), B1, n, m, d, BLOCK_R=rows, BLOCK_D=_pow2(d),
        ACC=_tl_acc(mod, q4.dtype), num_warps=4, **_FUSION,
    )
    return qn, kn


def _precision(dtype: torch.dtype, cfg: KernelConfig) -> str:
    """``tl.dot`` input precision: exact for float64 (interpreter), else TF32 in one or three passes."""
    return "ieee" if dtype == torch.float64 else ("tf32" if cfg.allow_tf32 else "tf32x3")


def _even_tiles(n: int, m: int, cfg: KernelConfig) -> bool:
    """The forward tiles divide ``n`` and ``m`` (so do the backward's): no bounds checks needed."""
    return n % cfg.block_m == 0 and m % cfg.block_n == 0


def _column_lists(mod, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key tile, the query blocks to visit (``flags (B, n_qb, n_kb) == 0``), for the dk/dv
    kernel: ``(B, n_kb, n_qb)`` int32 lists plus counts. (The rows' lists come from
    ``row_stats_kernel``.)"""
    B, n_qb, n_kb = flags.shape
    lists = torch.empty((B, n_kb, n_qb), dtype=torch.int32, device=flags.device)
    counts = torch.empty((B, n_kb), dtype=torch.int32, device=flags.device)
    mod.compact_kernel[grid(n_kb, B)](flags, lists, counts, n_qb * n_kb, 1, n_kb, n_qb, n_kb,
                                  TILES=min(256, _pow2(n_qb)), num_warps=4, **_FUSION)
    return lists, counts


def _tracks_range(step: int, detach_range: bool, need_q: bool, need_k: bool) -> bool:
    """Whether the backward routes gradient through the row range (``lo``, ``hi``): only a step
    (kernel code ``step``, not ``none``) depends on it, and ``detach_range`` cuts it."""
    return step != 0 and not detach_range and (need_q or need_k)


def _consts(plan: _Plan, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[scale, 1/τ, 1/P(keep)]`` on the device (a tensor, not scalar kernel arguments, so that
    float64 runs in the interpreter keep full precision)."""
    return device_constants([plan.scale, plan.inv_tau, _keep_scale(plan.dropout_threshold)], dtype, device)


#: Dropout draws are 16-bit (``kernels._dropout_keep``): ``dropout_p`` is rounded to a multiple of 2^-16.
DROPOUT_LEVELS = 1 << 16


def dropout_threshold(dropout_p: float) -> int:
    """``dropout_p`` in units of 2^-16, the kernels' resolution (0 = no dropout), at most
    ``1 - 2^-15``: the survivors' factor ``1 / P(keep)`` then stays at most 32768, which float16
    weights can hold (65536, at ``1 - 2^-16``, is above float16's largest value)."""
    return min(DROPOUT_LEVELS - 2, round(dropout_p * DROPOUT_LEVELS))


def _keep_scale(threshold: int) -> float:
    """The inverted-dropout factor ``1 / P(keep)`` of the drawn mask: the expected output is
    the output without dropout, exactly."""
    return DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold)


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A Philox key for one call's dropout, drawn from torch's generator of ``device`` (so
    ``torch.manual_seed`` reproduces the masks; CUDA graphs draw a new key per replay)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


@_launches_on(lambda seed, *args, **kwargs: seed.device)
def dropout_keep_mask(seed: torch.Tensor, batch: int, n: int, m: int, dropout_p: float) -> torch.Tensor:
    """The ``(batch, n, m)`` bool mask of scores that survive dropout in a fused call with this
    ``seed`` (a 1-element int64 tensor on the call's device) and ``dropout_p``, over the call's
    flattened batch. Survivors are scaled by ``1 / P(keep)``, ``P(keep) = 1 - dropout_threshold(p) / 2^16``."""
    mod = kernel_module(seed.device.type == "cpu")
    keep = torch.empty((batch, n, m), dtype=torch.int8, device=seed.device)
    bm, bn = 64, 128
    mod.dropout_mask_kernel[grid(triton_cdiv(n, bm) * triton_cdiv(m, bn), batch)](
        seed, keep, n, m, dropout_threshold(dropout_p), BLOCK_M=bm, BLOCK_N=bn, num_warps=4, **_FUSION
    )
    return keep.bool()


#: CUDA's limits on the grid: 2^31 - 1 programs along axis 0, 65535 along axes 1 and 2.
MAX_GRID = (2**31 - 1, 65535, 65535)


def grid(tiles: int, batch: int, splits: int | None = None) -> tuple[int, ...]:
    """A launch grid of ``tiles`` tiles for each of ``batch`` entries (folded into axis 0, tiles
    fastest: ``kernels._tile_and_batch`` unfolds them) and, optionally, ``splits`` key splits
    on axis 1. ``ValueError`` if CUDA could not launch it."""
    shape = (tiles * batch,) if splits is None else (tiles * batch, splits)
    if any(x > limit for x, limit in zip(shape, MAX_GRID)):
        raise ValueError(f"a launch grid of {shape} programs exceeds CUDA's limits {MAX_GRID[: len(shape)]}")
    return shape


def triton_cdiv(x: int, y: int) -> int:
    return -(-x // y)


def _mask4(mask: torch.Tensor | None, batch, n: int, m: int, placeholder: torch.Tensor) -> torch.Tensor:
    """The mask as a ``(B0, B1, n, m)`` uint8 view; without a mask (``HAS_MASK=False``, never
    read) ``placeholder`` with zero strides stands in, so no tensor is made for it."""
    if mask is None:
        return placeholder.as_strided((1, 1, 1, 1), (0, 0, 0, 0))
    return _view4(mask.view(torch.uint8), batch, n, m)


def _buffers(dtype: torch.dtype, device: torch.device, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Uninitialised contiguous tensors of the given shapes carved from one allocation (fewer
    allocator calls on the launch path, which is host-bound at short sequences)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    return [part.view(shape) for part, shape in zip(flat.split_with_sizes(sizes), shapes)]


def make_plan(
    q: torch.Tensor, spec: WarpSpec, config: KernelConfig | None, count_kept: bool = True, dropout_p: float = 0.0
) -> _Plan:
    d = q.shape[-1]
    interpret = q.device.type == "cpu"
    cfg = _resolve_config(config or KernelConfig(), d, q.dtype, KERNEL_STEPS[spec.step.name], spec.causal)
    scale = default_scale(spec.metric, d) if spec.scale is None else spec.scale
    return _Plan(
        metric=METRIC_CODES[spec.metric], step=KERNEL_STEPS[spec.step.name], scale=float(scale),
        inv_tau=1.0 / spec.temperature, causal=spec.causal, exclude_self=spec.exclude_self,
        detach_range=spec.detach_range, interpret=interpret, self_offset=spec.self_offset, count_kept=count_kept,
        grad_enabled=torch.is_grad_enabled(), config=cfg, dropout_threshold=dropout_threshold(dropout_p),
    )


def fused_warp_attend(q, k, v, a, b, t, mask, spec: WarpSpec, config: KernelConfig | None = None,
                      count_kept: bool = True, dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """Run the kernels; returns ``(out, lse, kept, lo, hi, empty, skip_counts)`` where
    ``skip_counts`` is ``(..., 2)`` int32: (skipped, visited) key tiles per query block (zeros
    without block skipping). ``count_kept=False`` saves the per-score count (``kept`` is NaN).
    ``dropout_p > 0``: inverted dropout on the weights with the mask of :func:`dropout_keep_mask`
    for ``seed`` (default: :func:`dropout_seed`).

    Under ``torch.compile`` / ``torch.export`` (default config) the call is one of two custom
    operators, opaque to the tracer, so ``fullgraph=True`` works: ``simwarp::fused_warp_inference``
    when no gradient is needed and no dropout is asked for (export works too), else
    ``simwarp::fused_warp_train`` with ``simwarp::fused_warp_train_backward`` as its registered
    gradient. (Dynamo traced into the launch code and the interpreted kernels and failed on
    fake tensors, a hard error.) Calls with an explicit ``config`` are a graph break: they run
    eagerly. Under the operators the tile-skipping counts are zeros of shape ``(1, 2)``."""
    args = (q, k, v, a, b, t, mask, spec, config, count_kept, dropout_p, seed)
    if torch.compiler.is_compiling():
        if config is not None:
            return _opaque_fused_warp_attend(*args)
        options = (spec.metric, spec.scale, spec.step.name, spec.temperature, spec.causal, spec.exclude_self,
                   spec.self_offset, count_kept)
        needs = [torch.is_grad_enabled() and x.requires_grad for x in (q, k, v, a, b, t)]
        skip_counts = q.new_zeros((1, 2), dtype=torch.int32)
        if not any(needs) and dropout_p == 0:
            return (*fused_warp_inference(q, k, v, a, b, t, mask, *options), skip_counts)
        if dropout_p > 0 and seed is None:
            seed = dropout_seed(q.device)
        track_arg = _tracks_range(KERNEL_STEPS[spec.step.name], spec.detach_range, *needs[:2])
        q, k = _normalised_q_k(q, k, spec)  # traced (and differentiated) outside the operator
        results = fused_warp_train(q, k, v, a, b, t, mask, seed, *options, spec.detach_range, dropout_p, track_arg)
        return (*results[:6], skip_counts)
    return _fused_warp_attend(*args)


def _fused_warp_attend(q, k, v, a, b, t, mask, spec, config, count_kept, dropout_p, seed):
    plan = make_plan(q, spec, config, count_kept, dropout_p)
    if plan.dropout_threshold == 0:
        seed = None
    elif seed is None:
        seed = dropout_seed(q.device)
    q, k = _normalised_q_k(q, k, spec)
    return _TritonWarp.apply(q, k, v, a, b, t, mask, seed, plan)


_opaque_fused_warp_attend = torch.compiler.disable(_fused_warp_attend, recursive=True)


# Operator schemas spelled out: torch 2.4 cannot infer them from postponed (string)
# annotations (pytorch#105157, fixed later), and ``tuple[...]``/``list[...]`` handling changed
# between versions.
_SCHEMA_FUSED_WARP_INFERENCE = (
    "(Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor t, Tensor? mask, str metric, float? scale, str step, float temperature, bool causal, bool exclude_self, SymInt self_offset, bool count_kept) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_SCHEMA_FUSED_WARP_TRAIN = (
    "(Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor t, Tensor? mask, Tensor? seed, str metric, float? scale, str step, float temperature, bool causal, bool exclude_self, SymInt self_offset, bool count_kept, bool detach_range, float dropout_p, bool track_arg) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_SCHEMA_FUSED_WARP_TRAIN_BACKWARD = (
    "(Tensor g_out, Tensor? g_lse, Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor t, Tensor? mask, Tensor? seed, Tensor out, Tensor lse, Tensor rs, Tensor prm, Tensor consts, Tensor argmin, Tensor argmax, Tensor flags, Tensor row_list, Tensor row_count, str metric, float? scale, str step, float temperature, bool causal, bool exclude_self, SymInt self_offset, bool detach_range, float dropout_p, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("simwarp::fused_warp_inference", mutates_args=(), schema=_SCHEMA_FUSED_WARP_INFERENCE)
def fused_warp_inference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor,
    mask: torch.Tensor | None, metric: str, scale: float | None, step: str, temperature: float, causal: bool,
    exclude_self: bool, self_offset: int, count_kept: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward without autograd, as one operator for ``torch.compile`` and
    ``torch.export``: ``(out, lse, kept, lo, hi, empty)`` of :func:`fused_warp_attend`."""
    spec = make_spec(metric, scale, step, temperature, causal, exclude_self, True, self_offset)
    with torch.no_grad():
        out, lse, kept, lo, hi, empty, _ = _fused_warp_attend(q, k, v, a, b, t, mask, spec, None, count_kept, 0.0, None)
    return out, lse, kept, lo.clone(), hi.clone(), empty  # lo, hi: views of one buffer; outputs may not alias


@fused_warp_inference.register_fake
def _(q, k, v, a, b, t, mask, metric, scale, step, temperature, causal, exclude_self, self_offset, count_kept):
    batch = broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    n, e = q.shape[-2], v.shape[-1]
    rows = q.new_empty((*batch, n), dtype=work_dtype(q.dtype))
    return (
        q.new_empty((*batch, n, e)), rows, torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows),
        q.new_empty((*batch, n), dtype=torch.bool),
    )


# -- training under torch.compile: forward and backward as operators -----------------------

_TrainOutputs = tuple[(torch.Tensor,) * 14]  # out, lse, kept, lo, hi, empty, then the 8 saved for backward
_Gradients = tuple[(torch.Tensor,) * 6]  # of q, k, v, a, b, t


def _train_plan(q, metric, scale, step, temperature, causal, exclude_self, self_offset, count_kept, detach_range,
                dropout_p) -> _Plan:
    """The launch plan of an operator call (default config; the gradient is wanted)."""
    spec = make_spec(metric, scale, step, temperature, causal, exclude_self, detach_range, self_offset)
    return replace(make_plan(q, spec, None, count_kept, dropout_p), grad_enabled=True)


def _normalised_q_k(q, k, spec):
    """``cosine``: ``q`` and ``k`` as unit rows (the kernels then take dot products). ``l2`` and
    ``sqeuclidean`` in float32/float64: both minus the queries' centre (``distance_centre``: the
    kernels compute distances from norms and products, whose rounding grows with the norms);
    16-bit inputs as they are (their own rounding, at the data's distance from the origin, is
    larger than the products'). Else as they are."""
    if spec.metric == "cosine":
        acc = work_dtype(q.dtype)
        return unit_rows(q.to(acc)).to(q.dtype), unit_rows(k.to(acc)).to(k.dtype)
    if spec.metric in DISTANCE_METRICS and q.dtype in (torch.float32, torch.float64):
        centre = distance_centre(q)
        return q - centre, k - centre
    return q, k


@torch.library.custom_op("simwarp::fused_warp_train", mutates_args=(), schema=_SCHEMA_FUSED_WARP_TRAIN)
def fused_warp_train(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor,
    mask: torch.Tensor | None, seed: torch.Tensor | None, metric: str, scale: float | None, step: str,
    temperature: float, causal: bool, exclude_self: bool, self_offset: int, count_kept: bool, detach_range: bool,
    dropout_p: float, track_arg: bool,
) -> _TrainOutputs:
    """The fused forward for training under ``torch.compile``: ``(out, lse, kept, lo, hi, empty)``
    and what the backward needs (``rs, prm, consts, argmin, argmax, flags, row_list, row_count``,
    fresh tensors: operator outputs may not alias). For ``cosine``, ``q`` and ``k`` come
    normalised (:func:`fused_warp_attend` does it outside, where autograd sees it)."""
    plan = _train_plan(q, metric, scale, step, temperature, causal, exclude_self, self_offset, count_kept,
                       detach_range, dropout_p)
    with torch.no_grad():
        out, stats, _, saved, _ = _launch_forward(q, k, v, a, b, t, mask, seed, plan, track_arg)
    lse, kept, lo, hi, empty = stats
    rs, prm, consts, argmin, argmax, flags, row_list, row_count = saved[8:16]
    if not track_arg:  # placeholders (never read): one fresh empty tensor each
        argmin, argmax = (torch.empty(0, dtype=torch.int32, device=q.device) for _ in range(2))
    return (out, lse, kept, lo.clone(), hi.clone(), empty, rs, prm, consts, argmin.clone(), argmax.clone(),
            flags.clone(), row_list.clone(), row_count.clone())


@fused_warp_train.register_fake
def _(q, k, v, a, b, t, mask, seed, metric, scale, step, temperature, causal, exclude_self, self_offset, count_kept,
      detach_range, dropout_p, track_arg):
    acc = work_dtype(q.dtype)
    cfg = _resolve_config.__wrapped__(KernelConfig(), q.shape[-1], q.dtype, KERNEL_STEPS[step], causal)  # d may be symbolic
    batch, B, _, n, _, _, e, n_qb, n_kb = _dims(q, k, v, cfg)
    rows = q.new_empty((*batch, n), dtype=acc)
    int32 = dict(dtype=torch.int32)
    arg = (B, n) if track_arg else (0,)
    tiles = ((B, n_qb, n_kb), (B, n_qb, n_kb), (B, n_qb)) if cfg.block_skipping else ((1, 2),) * 3
    return (
        q.new_empty((*batch, n, e)), rows, torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows),
        q.new_empty((*batch, n), dtype=torch.bool), q.new_empty((5, B, n), dtype=acc), q.new_empty((3, B, n), dtype=acc),
        q.new_empty((3,), dtype=acc), q.new_empty(arg, **int32), q.new_empty(arg, **int32),
        q.new_empty(tiles[0], dtype=torch.int8 if cfg.block_skipping else torch.int32), q.new_empty(tiles[1], **int32),
        q.new_empty(tiles[2], **int32),
    )


@torch.library.custom_op("simwarp::fused_warp_train_backward", mutates_args=(), schema=_SCHEMA_FUSED_WARP_TRAIN_BACKWARD)
def fused_warp_train_backward(
    g_out: torch.Tensor, g_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None, seed: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, rs: torch.Tensor, prm: torch.Tensor, consts: torch.Tensor,
    argmin: torch.Tensor, argmax: torch.Tensor, flags: torch.Tensor, row_list: torch.Tensor, row_count: torch.Tensor,
    metric: str, scale: float | None, step: str, temperature: float, causal: bool, exclude_self: bool,
    self_offset: int, detach_range: bool, dropout_p: float, needs: list[bool],
) -> _Gradients:
    """Gradients of ``q, k, v, a, b, t`` for :func:`fused_warp_train` (empty where not needed)."""
    plan = _train_plan(q, metric, scale, step, temperature, causal, exclude_self, self_offset, True,
                       detach_range, dropout_p)
    dims = _dims(q, k, v, plan.config)
    n, e = dims[3], dims[6]
    saved = (q, k, v, a, b, t, out.reshape(-1, n, e), lse.reshape(-1, n), rs, prm, consts, argmin, argmax, flags,
             row_list, row_count, consts if seed is None else seed)
    with torch.no_grad():
        grads = _launch_backward(plan, dims, saved, mask, g_out, g_lse, tuple(needs))
    # fresh and contiguous, as the fake implementation says: da, db, dt can be views of one
    # buffer (per-row a, b, t), and operator outputs may not alias
    return tuple(
        x.new_empty(0) if g is None else g.clone(memory_format=torch.contiguous_format)
        if g._is_view() or not g.is_contiguous() else g
        for g, x in zip(grads, (q, k, v, a, b, t))
    )


@fused_warp_train_backward.register_fake
def _(g_out, g_lse, q, k, v, a, b, t, mask, seed, out, lse, rs, prm, consts, argmin, argmax, flags, row_list,
      row_count, metric, scale, step, temperature, causal, exclude_self, self_offset, detach_range, dropout_p, needs):
    return tuple(x.new_empty(x.shape) if need else x.new_empty(0) for x, need in zip((q, k, v, a, b, t), needs))


def _train_setup(ctx, inputs, output) -> None:
    q, k, v, a, b, t, mask, seed, *options = inputs
    ctx.options = options  # metric .. track_arg (primitives)
    ctx.save_for_backward(q, k, v, a, b, t, mask, seed, *output[:2], *output[6:])
    ctx.mark_non_differentiable(*output[2:])


def _train_backward(ctx, g_out, g_lse, *_unused):
    q, k, v, a, b, t, mask, seed, out, lse, *rest = ctx.saved_tensors
    metric, scale, step, temperature, causal, exclude_self, self_offset, _count_kept, detach_range, dropout_p, _ = (
        ctx.options
    )
    needs = list(_read_inputs(KERNEL_STEPS[step], ctx.needs_input_grad[:6]))
    if g_out is None:
        g_out = torch.zeros_like(out)
    grads = fused_warp_train_backward(
        g_out, g_lse, q, k, v, a, b, t, mask, seed, out, lse, *rest, metric, scale, step, temperature, causal,
        exclude_self, self_offset, detach_range, dropout_p, needs,
    )
    return (*(g if need else None for g, need in zip(grads, needs)), *(None,) * (len(ctx.options) + 2))


fused_warp_train.register_autograd(_train_backward, setup_context=_train_setup)
