"""Fused SoftStep kernels on a GPU: check, time and compare with SDPA (one script, one run).

1. Correctness on fresh random inputs, outputs poisoned (the CUDA caching allocator is filled
   with NaN before each run, so an unwritten output element shows up as NaN):
   * small shapes, float32 kernels vs the dense float64 reference (values and all gradients),
     metrics x steps x masks;
   * mid shapes in bfloat16 vs the float32 chunked path (relative error overall and of the
     worst row, no NaN);
   * rows with a single valid key (causal first rows) in 64 heads, float32 at d = 48 and
     bfloat16 at d = 128 (dot scales that are not powers of two), worst row of output and dq;
   * ``step="none"`` vs SDPA on the benchmark shapes (the fused path must equal softmax attention);
   * the neighbour-bank layout (few queries, many keys: key splits) vs chunked float32;
   * dropout inside the kernels vs the float64 reference with the kernels' mask
     (``dropout_keep_mask``) applied to its weights (values and all gradients);
   * ``torch.compile`` (inductor, fullgraph) of functions around the fused call (custom operators)
     vs eager, training and inference.
2. Timing (torch.cuda.Event, median of repeats after warm-up) and peak memory
   (torch.cuda.max_memory_allocated above the inputs) on B·H·N·D = 4·16·2048·64,
   2·16·8192·64, 1·16·16384·128, causal and not, forward and forward+backward, bfloat16:
   simwarp fused (steps sigmoidal, poly, none), SDPA (flash backend), the naive materialised
   SoftStep in eager mode and under torch.compile, AdaSplash (alpha = 1.5) when importable,
   plus a clustered input where most key blocks are skipped (the stretch goal).
3. Optional: ``--dropout P`` (training with attention dropout: forward+backward with
   ``dropout_p = P`` against SDPA's flash kernel with the same rate, and the chunked path that
   ran dropout before the kernels had it), ``--sweep`` (KernelConfig alternatives), ``--graphs`` (the forward replayed from
   CUDA graphs: the GPU's share without the host's launch work), ``--profile`` (CUDA time per
   kernel and the host's time per call).
4. A table of ratios to SDPA, and JSON (written after every case) to ``--out``.

Usage (on a CUDA machine; the repo does not need to be installed)::

    python benchmarks/bench_attention_gpu.py --no-compile      # about 5 minutes on an H200 (304 s)
    python benchmarks/bench_attention_gpu.py --no-compile --skip-peers --shapes 1,2 --sweep \
        --graphs --profile --repeats 20 --case-seconds 1.0     # the target shapes: about 4 minutes
    python benchmarks/bench_attention_gpu.py --quick           # first shape only, fewer repeats
    python benchmarks/bench_attention_gpu.py --checks-only --quick  # correctness alone (exit 1 on a failure)
    python benchmarks/bench_attention_gpu.py --no-compile --skip-peers --shapes 0,1 --dropout 0.1

On a machine without a GPU, ``python tools/check_kernels_sm90.py`` first checks that every kernel
compiles for sm_90.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simwarp  # noqa: E402
from simwarp._io import write_json  # noqa: E402
from simwarp.backend.common import make_spec, resolve_params  # noqa: E402
from simwarp.backend.triton import dropout_keep_mask, triton_warp_attend  # noqa: E402

SHAPES = [(4, 16, 2048, 64), (2, 16, 8192, 64), (1, 16, 16384, 128)]
A, B_, T = 0.1, 0.9, 0.5  # the SoftStep defaults
GiB = 2**30
SMALL = (77, 131, 48, 24)  # n, m, d, e of the float64 checks
# B, H, N, D of the bfloat16 checks; d = 128 makes the dot scale 1/sqrt(128), not a power of two
# (so scaled scores round: the flat first row of a causal sequence caught a contracted FMA there)
MIDS = ((1, 4, 1024, 64), (1, 4, 512, 128))
BANK = (256, 1 << 20, 64)  # queries, bank entries, d (value width 1)
CLUSTERS = 16


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


class _SavedRows(list):
    """A list of result rows that writes the results file after every row it gets."""

    def __init__(self, save) -> None:
        super().__init__()
        self._save = save

    def append(self, row) -> None:
        super().append(row)
        self._save()


def poison(device) -> None:
    """Fill the caching allocator's free memory with NaN (then free it), so outputs that a
    kernel fails to write read as NaN: the cache is emptied first (a cached block would keep
    stale finite data), then one large block for the large pool and 1 MiB blocks for the
    small pool, from which PyTorch serves every request of 1 MiB or less (most check outputs)."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    try:
        small = [torch.full((1 << 18,), float("nan"), device=device) for _ in range(256)]  # 1 MiB each
        x = torch.empty(int(free * 0.5) // 4, dtype=torch.float32, device=device)
        x.fill_(float("nan"))
        del x, small
    except torch.OutOfMemoryError:
        pass


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def fresh(shape, dtype, device, seed, requires_grad=False, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def time_call(fn, *, warmup: int, repeats: int, max_seconds: float) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + max_seconds
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < t_end):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def peak_extra(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


# ---------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------


def sdpa(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def fused(step):
    def run(q, k, v, causal):
        return simwarp.warp_attend(q, k, v, step=step, a=A, b=B_, t=T, causal=causal, impl="triton")

    return run


def naive_softstep(q, k, v, causal, a=A, b=B_, t=T):
    """The reference implementation's algorithm, materialised, in plain PyTorch."""
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    n, m = s.shape[-2:]
    if causal:
        valid = torch.ones(n, m, dtype=torch.bool, device=s.device).tril()
        lo = s.masked_fill(~valid, math.inf).amin(-1, keepdim=True)
        hi = s.masked_fill(~valid, -math.inf).amax(-1, keepdim=True)
    else:
        lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    u = (s - lo) / (hi - lo).clamp_min(1e-12)
    inside = (u > a) & (u < b)
    ui = torch.where(inside, u, (a + b) / 2)
    z = (torch.log(b - ui) - torch.log(ui - a)) / t
    phi = torch.where(inside, -F.softplus(z), torch.where(u >= b, 0.0, -math.inf))
    logits = s + phi
    if causal:
        logits = logits.masked_fill(~valid, -math.inf)
    return (torch.softmax(logits, -1) @ v.float()).to(q.dtype)


_COMPILED = {}


def naive_compiled(q, k, v, causal):
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(naive_softstep, dynamic=False)
    return _COMPILED["fn"](q, k, v, causal)


def adasplash_method():
    try:
        from adasplash import adasplash
    except Exception:  # noqa: BLE001 - optional peer
        return None

    def run(q, k, v, causal):
        return adasplash(q, k, v, alpha=1.5, is_causal=causal)  # the package's own niter default

    return run


# ---------------------------------------------------------------------------------------
# 1. correctness
# ---------------------------------------------------------------------------------------


def _loss_grads(fn, dtype, *, tensors, batch, mask, spec, device):
    leaves = [x.detach().to(dtype).requires_grad_() for x in tensors]
    n, e = leaves[0].shape[-2], leaves[2].shape[-1]
    pa, pb, pt = resolve_params(*leaves[3:], batch=torch.Size(batch), n=n, dtype=dtype, device=device)
    poison(device)
    out, st = fn(*leaves[:3], pa, pb, pt, mask, spec)
    w = torch.linspace(-1, 1, e, device=device, dtype=dtype)
    loss = (out * w).sum() + 0.3 * st.lse.masked_fill(st.empty, 0).sum()
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out.detach(), st, [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


def _bad_rows(out, st, ref, ref_st, valid_keys, log, limit: int = 6) -> list[dict]:
    """The rows whose output is off (relative to the largest reference entry), each with what
    a diagnosis needs: its number of valid keys and the row statistics of both paths."""
    err = (out.double() - ref.double()).abs().amax(-1) / ref.abs().max().clamp_min(1e-30)
    found = []
    for index in (err > 1e-4).nonzero().tolist()[:limit]:
        at = tuple(index)
        row = dict(index=index, valid_keys=int(valid_keys[at]), err=float(err[at]),
                   out_norm=float(out[at].norm()), ref_norm=float(ref[at].norm()))
        for name in ("lo", "hi", "lse"):
            row[name], row[f"ref_{name}"] = float(getattr(st, name)[at]), float(getattr(ref_st, name)[at])
        found.append(row)
        log("      bad row " + " ".join(f"{kk}={vv:.6g}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in row.items()))
    return found


def check_small(device, log) -> list[dict]:
    """float32 kernels vs dense float64 (values + gradients) on small odd shapes."""
    from simwarp.backend.dense import dense_warp_attend

    rows = []
    cases = [
        ("dot", "sigmoidal", dict()),
        ("cosine", "log", dict(causal=True)),
        ("sqeuclidean", "poly", dict(mask=True)),
        ("l2", "sigmoidal", dict(exclude_self=True)),
        ("dot", "none", dict(causal=True)),
        ("dot", "poly", dict(causal=True, detach_range=True)),
        # b = 1, t near 1: the best key (u = 1) at the band's steep upper end (session 11's fix)
        ("dot", "sigmoidal", dict(b_one=True, detach_range=True)),
        # the pins (log: u = 0 at the row minimum; sigmoidal b = 1: u = 1 at the maximum) need the
        # backward kernels to recompute pass 1's raw scores bit for bit, also for the distances
        ("l2", "log", dict()),
        ("sqeuclidean", "sigmoidal", dict(b_one=True)),
        # B·H = 69632 > 65535: the batch is folded into grid axis 0 (axes 1, 2 stop at 65535)
        ("dot", "poly", dict(big_batch=True, causal=True)),
    ]
    for i, (metric, step, o) in enumerate(cases):
        n, m, d, e = (SMALL[0], SMALL[0], *SMALL[2:]) if o.get("exclude_self") else SMALL
        shape_b = (2, 3)
        if o.get("big_batch"):
            shape_b, (n, m, d, e) = (4096, 17), (8, 8, 16, 8)
        q = fresh((*shape_b, n, d), torch.float32, device, 100 + i)
        k = fresh((*shape_b, m, d), torch.float32, device, 200 + i)
        v = fresh((*shape_b, m, e), torch.float32, device, 300 + i)
        mask = None
        if o.get("mask"):
            mask = fresh((2, 1, 1, m), torch.float32, device, 400 + i) > -0.8
        spec = make_spec(metric, None, step, 1.0, o.get("causal", False), o.get("exclude_self", False),
                         o.get("detach_range", False))
        g = torch.Generator(device=device).manual_seed(500 + i)
        a = 0.05 + 0.3 * torch.rand((*shape_b, n), generator=g, device=device)
        b = (a + 0.1 + 0.5 * torch.rand((*shape_b, n), generator=g, device=device)).clamp(max=1.0)
        t = 0.1 + 0.8 * torch.rand((*shape_b, n), generator=g, device=device)
        if o.get("b_one"):
            b, t = torch.ones_like(b), 0.9 + 0.09 * torch.rand((*shape_b, n), generator=g, device=device)

        call = dict(tensors=(q, k, v, a, b, t), batch=shape_b, mask=mask, spec=spec, device=device)
        out, st, gs = _loss_grads(triton_warp_attend, torch.float32, **call)
        ref, ref_st, rgs = _loss_grads(dense_warp_attend, torch.float64, **call)
        errs = {"out": rel_err(out, ref)} | {f"d{nm}": rel_err(x, y) for nm, x, y in zip("qkv", gs, rgs)}
        # Parameter gradients are sums over many rows (cancellation): relative to their largest entry.
        for nm, x, y in zip("abt", gs[3:], rgs[3:]):
            errs[f"d{nm}"] = float((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-12))
        finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(x).all()) for x in gs)
        ok = finite and errs["out"] < 1e-4 and max(errs["dq"], errs["dk"], errs["dv"]) < 1e-3
        if step != "none":
            ok = ok and max(errs["da"], errs["db"], errs["dt"]) < 1e-2
        row = dict(check="small_vs_dense_f64", metric=metric, step=step, opts=str(o), ok=bool(ok), **errs)
        rows.append(row)
        log(f"  [{'ok' if ok else 'FAIL'}] {metric:11s} {step:9s} {o}  " + " ".join(f"{kk}={vv:.1e}" for kk, vv in errs.items()))
        if not ok:
            row["bad_rows"] = _bad_rows(out, st, ref, ref_st, _valid_keys(shape_b, n, m, mask, spec), log)
    return rows


def _valid_keys(batch, n: int, m: int, mask, spec) -> torch.Tensor:
    """``(*batch, n)``: how many keys each query row may attend to."""
    device = mask.device if mask is not None else None
    rows, cols = torch.arange(n, device=device)[:, None], torch.arange(m, device=device)
    valid = torch.ones(n, m, dtype=torch.bool, device=device)
    if spec.causal:
        valid &= cols <= rows
    if spec.exclude_self:
        valid &= cols != rows + spec.self_offset
    if mask is not None:
        valid = valid & mask
    return valid.expand(*batch, n, m).sum(-1).cpu()


def check_dropout(device, log, p: float = 0.3) -> list[dict]:
    """float32 kernels with dropout vs dense float64 with the kernels' mask on its weights."""
    from simwarp.backend.dense import dense_weights
    from simwarp.backend.triton.launch import dropout_threshold

    rows = []
    cases = [("dot", "sigmoidal", dict(causal=True)), ("cosine", "poly", dict(mask=True)), ("dot", "none", dict())]
    n, m, d, e = SMALL
    shape_b = (2, 3)
    for i, (metric, step, o) in enumerate(cases):
        q, k, v = (fresh((*shape_b, rows_, cols), torch.float32, device, 600 + 10 * i + j)
                   for j, (rows_, cols) in enumerate(((n, d), (m, d), (m, e))))
        mask = fresh((2, 1, 1, m), torch.float32, device, 700 + i) > -0.8 if o.get("mask") else None
        spec = make_spec(metric, None, step, 1.0, o.get("causal", False), False, False)
        seed = torch.tensor([9000 + i], dtype=torch.int64, device=device)
        factor = dropout_keep_mask(seed, 6, n, m, p).view(*shape_b, n, m).double()
        factor *= 65536 / (65536 - dropout_threshold(p))

        def fused_call(q, k, v, a, b, t, mask, spec, seed=seed):
            return triton_warp_attend(q, k, v, a, b, t, mask, spec, dropout_p=p, dropout_seed=seed)

        def reference(q, k, v, a, b, t, mask, spec, factor=factor):
            w, stats = dense_weights(q, k, a, b, t, mask, spec, None)
            return (w * factor) @ v, stats

        prm = tuple(torch.tensor(x, device=device) for x in (0.2, 0.7, 0.4))
        call = dict(tensors=(q, k, v, *prm), batch=shape_b, mask=mask, spec=spec, device=device)
        out, st, gs = _loss_grads(fused_call, torch.float32, **call)
        ref, ref_st, rgs = _loss_grads(reference, torch.float64, **call)
        errs = {"out": rel_err(out, ref)} | {f"d{nm}": rel_err(x, y) for nm, x, y in zip("qkv", gs, rgs)}
        finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(x).all()) for x in gs)
        ok = finite and errs["out"] < 1e-4 and max(errs["dq"], errs["dk"], errs["dv"]) < 1e-3
        rows.append(dict(check="dropout_vs_dense_f64", metric=metric, step=step, opts=str(o), ok=bool(ok), **errs))
        log(f"  [{'ok' if ok else 'FAIL'}] dropout {p} {metric:8s} {step:9s} {o}  "
            + " ".join(f"{kk}={vv:.1e}" for kk, vv in errs.items()))
    return rows


def check_nonfinite(device, log) -> list[dict]:
    """A NaN or inf among a row's valid scores gives a NaN row (output, lse) on the GPU too,
    where pass 1 reduces with ``min.NaN``/``max.NaN`` (the interpreter takes another code path);
    rows that never see a non-finite key equal the dense float64 result on cleaned inputs."""
    from simwarp.backend.dense import dense_warp_attend

    rows = []
    n, d, e = 200, 64, 64  # self-attention shapes (keys = queries)
    for i, (metric, step, dtype, grad) in enumerate([("dot", "sigmoidal", torch.bfloat16, True),
                                                     ("l2", "poly", torch.float32, False),
                                                     ("dot", "log", torch.float32, True)]):
        q, k, v = (fresh((2, 3, n, c), torch.float32, device, 800 + 10 * i + j) for j, c in enumerate((d, d, e)))
        q[0, 0, 5, 3] = float("nan")
        q[1, 2, 9, 0] = float("inf")
        k[0, 1, 120, 7] = float("nan")
        poisoned = torch.zeros(2, 3, n, dtype=torch.bool, device=device)
        poisoned[0, 0, 5] = poisoned[1, 2, 9] = True
        poisoned[0, 1, 120:] = True  # causal: rows from the NaN key on
        spec = make_spec(metric, None, step, 1.0, True, False, False)
        prm = resolve_params(0.2, 0.7, 0.4, batch=torch.Size((2, 3)), n=n, dtype=torch.float32, device=device)
        with torch.set_grad_enabled(grad):  # grad: pass 1 with the argmin / argmax bookkeeping
            qq = q.to(dtype).requires_grad_(grad)
            out, st = triton_warp_attend(qq, k.to(dtype), v.to(dtype), *prm, None, spec)
        ref, _ = dense_warp_attend(*(x.nan_to_num(0.0, 0.0, 0.0).double() for x in (q, k, v)),
                                   *(x.double() for x in prm), None, spec)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        err = rel_err(out[~poisoned].float(), ref[~poisoned])
        ok = (bool(out[poisoned].isnan().all()) and bool(st.lse[poisoned].isnan().all())
              and not bool(out[~poisoned].isnan().any()) and not bool(st.empty.any()) and err < tol)
        rows.append(dict(check="nonfinite_rows", metric=metric, step=step, dtype=str(dtype), grad=grad, ok=ok, out=err))
        log(f"  [{'ok' if ok else 'FAIL'}] non-finite rows {metric:5s} {step:9s} {dtype} grad={grad}  out={err:.1e}")
    return rows


def check_compile(device, log) -> list[dict]:
    """torch.compile (fullgraph) of functions around the fused call, which is a custom operator
    there: equal to eager (values and gradients, dropout included: same seed draws)."""
    # q as a transposed view (a multi-head module's head split): the operators' strides matter to inductor
    q = fresh((2, 256, 4, 64), torch.float32, device, 800).transpose(1, 2).requires_grad_()
    k, v = (fresh((2, 4, 256, 64), torch.float32, device, 800 + i, requires_grad=True) for i in (1, 2))

    def loss(q, k, v):
        out = simwarp.warp_attend(torch.tanh(q), k, v, step="sigmoidal", causal=True, impl="triton", dropout_p=0.1)
        return (out * out).sum()

    torch.manual_seed(11)
    ref = loss(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    from torch._inductor import config as inductor_config

    torch.manual_seed(11)
    with inductor_config.patch(fallback_random=True):  # inductor's RNG would draw another dropout seed
        out = torch.compile(loss, fullgraph=True)(q, k, v)  # the fused call: custom operators
    grads = torch.autograd.grad(out, (q, k, v))
    errs = {"out": rel_err(out, ref)} | {f"d{nm}": rel_err(g, rg) for nm, g, rg in zip("qkv", grads, ref_grads)}

    def infer(q, k, v):  # without gradients: the operator simwarp::fused_warp_inference, one graph
        return simwarp.warp_attend(torch.tanh(q), k, v, step="sigmoidal", causal=True, impl="triton")

    with torch.no_grad():
        errs["infer_fullgraph"] = rel_err(torch.compile(infer, fullgraph=True)(q, k, v), infer(q, k, v))
    ok = all(math.isfinite(x) and x < 1e-5 for x in errs.values())  # (max() passes a NaN that is not first)
    log(f"  [{'ok' if ok else 'FAIL'}] torch.compile around the fused call  " + " ".join(f"{kk}={vv:.1e}" for kk, vv in errs.items()))
    return [dict(check="compile_vs_eager", ok=bool(ok), **errs)]


def check_mid_bf16(device, log) -> list[dict]:
    """bfloat16 kernels vs float32 chunked on mid shapes (values and q/k/v gradients)."""
    rows = []
    for shape, causal, step in itertools.product(MIDS, (False, True), ("sigmoidal", "poly")):
        q, k, v = (fresh(shape, torch.float32, device, s) for s in (11, 12, 13))
        gout = fresh(shape, torch.float32, device, 14)
        res = {}
        for impl, dtype in (("triton", torch.bfloat16), ("chunked", torch.float32)):
            leaves = [x.detach().to(torch.bfloat16).to(dtype).requires_grad_() for x in (q, k, v)]
            poison(device)
            out = simwarp.warp_attend(*leaves, step=step, a=A, b=B_, t=T, causal=causal, impl=impl)
            out.backward(gout.to(dtype))
            res[impl] = [out.detach()] + [x.grad for x in leaves]
        errs = {nm: rel_err(x, y) for nm, x, y in zip(("out", "dq", "dk", "dv"), res["triton"], res["chunked"])}
        # one wrong row among thousands hardly moves the overall error: the worst row's own error
        fused_out, ref_out = res["triton"][0].double(), res["chunked"][0].double()
        errs["worst_row"] = float(((fused_out - ref_out).norm(dim=-1) / ref_out.norm(dim=-1).clamp_min(1e-12)).max())
        finite = all(bool(torch.isfinite(x).all()) for x in res["triton"])
        ok = finite and errs["out"] < 2e-2 and max(errs["dq"], errs["dk"], errs["dv"]) < 5e-2 and errs["worst_row"] < 0.1
        rows.append(dict(check="mid_bf16_vs_chunked_f32", shape=list(shape), causal=causal, step=step, ok=bool(ok), **errs))
        log(f"  [{'ok' if ok else 'FAIL'}] bf16 {'·'.join(map(str, shape))} causal={causal} {step}: "
            + " ".join(f"{kk}={vv:.1e}" for kk, vv in errs.items()))
    return rows


def _worst_row(x: torch.Tensor, ref: torch.Tensor, per_row: bool = True) -> float:
    """The largest error of a row, relative to that row's norm (``per_row``) or to the largest
    row norm (for gradients, whose rows may be 0: a single-key row's dq is)."""
    x, ref = x.detach().double(), ref.detach().double()
    norms = ref.norm(dim=-1)
    return float(((x - ref).norm(dim=-1) / (norms if per_row else norms.max()).clamp_min(1e-12)).max())


def check_flat_rows(device, log) -> list[dict]:
    """Rows with one valid key (the first of every causal sequence), in 64 heads at a time, where
    the dot scale is not a power of two: such a row's range must be exactly 0 (2026-11-28 on an
    H100, a contracted multiply-add left the rounding error of its minimum there, and about a
    quarter of the heads got garbage in that row). Worst row of the output and of dq against
    dense float64."""
    rows = []
    cases = ((torch.float32, 48, "poly"), (torch.float32, 48, "sigmoidal"), (torch.bfloat16, 128, "poly"),
             (torch.bfloat16, 128, "log"))  # (each new case compiles its kernels: a few, on a budget)
    for dtype, d, step in cases:
        shape = (1, 64, 64, d)
        q, k, v = (fresh(shape, torch.float32, device, s).to(dtype) for s in (31, 32, 33))
        gout = fresh(shape, torch.float32, device, 34)
        res = {}
        for impl, cast in (("triton", dtype), ("dense", torch.float64)):
            leaves = [x.detach().to(cast).requires_grad_() for x in (q, k, v)]
            poison(device)
            out = simwarp.warp_attend(*leaves, step=step, a=A, b=B_, t=T, causal=True, impl=impl)
            out.backward(gout.to(cast))
            res[impl] = (out, leaves[0].grad)
        errs = {"first_row": _worst_row(res["triton"][0][..., :1, :], res["dense"][0][..., :1, :]),
                "worst_row": _worst_row(*(r[0] for r in res.values())),
                "worst_dq_row": _worst_row(*(r[1] for r in res.values()), per_row=False)}
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        ok = max(errs["first_row"], errs["worst_row"]) < tol and errs["worst_dq_row"] < 10 * tol
        rows.append(dict(check="flat_rows", dtype=str(dtype), d=d, step=step, ok=bool(ok), **errs))
        log(f"  [{'ok' if ok else 'FAIL'}] flat first rows, 64 causal heads, {dtype} d={d} {step}: "
            + " ".join(f"{kk}={vv:.1e}" for kk, vv in errs.items()))
    return rows


def check_none_vs_sdpa(device, shape, causal, log) -> dict:
    q, k, v = (fresh(shape, torch.bfloat16, device, s, requires_grad=True) for s in (21, 22, 23))
    gout = fresh(shape, torch.bfloat16, device, 24)
    res = {}
    for name, fn in (("fused", fused("none")), ("sdpa", sdpa)):
        for x in (q, k, v):
            x.grad = None
        poison(device)
        out = fn(q, k, v, causal)
        out.backward(gout)
        res[name] = [out.detach()] + [x.grad.detach() for x in (q, k, v)]
    errs = {nm: rel_err(x, y) for nm, x, y in zip(("out", "dq", "dk", "dv"), res["fused"], res["sdpa"])}
    finite = all(bool(torch.isfinite(x).all()) for x in res["fused"])
    ok = finite and errs["out"] < 2e-2 and max(errs.values()) < 3e-2
    log(f"  [{'ok' if ok else 'FAIL'}] step=none vs SDPA {shape} causal={causal}: "
        + " ".join(f"{kk}={vv:.1e}" for kk, vv in errs.items()))
    return dict(check="none_vs_sdpa", shape=list(shape), causal=causal, ok=bool(ok), **errs)


def check_bank(device, log, m: int = BANK[1]) -> dict:
    """Neighbour bank: few queries vs ``m`` keys, value width 1 (key splits), vs chunked float32."""
    q = fresh((BANK[0], BANK[2]), torch.float32, device, 31)
    k = fresh((m, BANK[2]), torch.float32, device, 32)
    v = fresh((m, 1), torch.float32, device, 33)
    kw = dict(metric="cosine", step="sigmoidal", a=0.3, b=0.9, t=0.5)
    poison(device)
    out = simwarp.warp_attend(q, k, v, impl="triton", **kw)
    ref = simwarp.warp_attend(q, k, v, impl="chunked", **kw)
    err = rel_err(out, ref)
    torch.cuda.synchronize()
    ms_f = time_call(lambda: simwarp.warp_attend(q, k, v, impl="triton", **kw), warmup=2, repeats=10, max_seconds=3)
    ms_c = time_call(lambda: simwarp.warp_attend(q, k, v, impl="chunked", **kw), warmup=1, repeats=3, max_seconds=5)
    ok = bool(torch.isfinite(out).all()) and err < 1e-4
    log(f"  [{'ok' if ok else 'FAIL'}] bank {BANK[0]} x {m} (d={BANK[2]}, e=1) vs chunked f32: rel err {err:.1e}; "
        f"fused {ms_f:.2f} ms, chunked {ms_c:.2f} ms ({ms_c / ms_f:.1f}x)")
    return dict(check="bank_vs_chunked", m=m, ok=ok, err=err, fused_ms=ms_f, chunked_ms=ms_c)


# ---------------------------------------------------------------------------------------
# 2. timing
# ---------------------------------------------------------------------------------------


SWEEP_SHAPES = SHAPES[1:]
# Launch configurations tried against the defaults (forward-only and backward-only changes),
# each as (causal, KernelConfig fields).
SWEEP_CONFIGS = {
    "fwd no skipping": (False, dict(block_skipping=False)),
    "fwd 128x128 8 warps": (False, dict(block_n=128, num_warps=8)),  # the default before 2026-11-28
    "fwd causal no skipping": (True, dict(block_skipping=False)),
    "fwd pass-1 pipelined": (False, dict(pipeline_range=True)),
    "fwd causal 128x128": (True, dict(block_n=128)),
    "fwd causal 4 warps": (True, dict(num_warps=4)),
    "fwd causal heavy first": (True, dict(heavy_first=True)),
    "fwd 4 stages": (False, dict(num_stages=4)),
    "fwd band branch off": (False, dict(band_branch=False)),
    "bwd no skipping": (False, dict(block_skipping=False)),
    "bwd fwd 128x128 8 warps": (False, dict(block_n=128, num_warps=8)),  # training, the old forward tiles
    "bwd dq 64x32": (False, dict(bwd_block_n=32)),
    "bwd dk/dv 32x64": (False, dict(bwd_kv_block_m=32)),
    "bwd causal 128x128": (True, dict(block_n=128)),
    "bwd causal heavy first": (True, dict(heavy_first=True)),
}


def _ratio_text(rec: dict, sdpa_rec: dict | None) -> str:
    """Set ``rec["ratio_sdpa"]`` when both were timed; the ratio (or the error) for the log."""
    if sdpa_rec and "ms" in sdpa_rec and "ms" in rec:
        rec["ratio_sdpa"] = rec["ms"] / sdpa_rec["ms"]
    return f"x{rec['ratio_sdpa']:.2f} SDPA" if "ratio_sdpa" in rec else rec.get("error", "")


def sweep_configs(device, args, log, rows: list | None = None) -> list[dict]:
    """Time :class:`KernelConfig` alternatives against the defaults (``step="poly"``, bf16,
    non-causal and causal) on the target shapes, with SDPA in the same loop as the yardstick."""
    from simwarp.backend.triton import KernelConfig

    rows = [] if rows is None else rows
    for shape in SWEEP_SHAPES:
        q, k, v = (fresh(shape, torch.bfloat16, device, s, requires_grad=True) for s in (41, 42, 43))
        prm = resolve_params(A, B_, T, batch=torch.Size(shape[:2]), n=shape[2], dtype=torch.float32, device=device)
        for backward, causal in itertools.product((False, True), (False, True)):
            sd = bench_case("sdpa", sdpa, q, k, v, causal, backward, args)
            spec = make_spec("dot", None, "poly", 1.0, causal, False, False)
            configs = [("causal default" if causal else "default", (causal, {}))] + list(SWEEP_CONFIGS.items())
            for name, (config_causal, kw) in configs:
                if config_causal != causal or name.startswith("fwd" if backward else "bwd"):
                    continue
                cfg = KernelConfig(**kw)

                def run(q, k, v, causal, cfg=cfg, prm=prm, spec=spec):
                    return triton_warp_attend(q, k, v, *prm, None, spec, config=cfg, count_kept=False)[0]

                rec = bench_case(f"poly {name}", run, q, k, v, causal, backward, args)
                rec.update(shape=list(shape), config=kw, sdpa_ms=sd.get("ms"))
                ratio = _ratio_text(rec, sd)
                rows.append(rec)
                log(f"  {'·'.join(map(str, shape)):16s} {'fwd+bwd' if backward else 'fwd':7s} {name:22s} "
                    f"{rec.get('ms', float('nan')):8.3f} ms  {ratio}")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def graph_timings(device, args, log, rows: list | None = None) -> list[dict]:
    """Forward (no grad) replayed from a CUDA graph: the host's launch work is gone and what is
    left is the GPU's, as in a model under ``torch.compile(mode="reduce-overhead")``. SDPA and
    the fused steps on the target shapes, non-causal and causal."""
    rows = [] if rows is None else rows
    for shape in SWEEP_SHAPES:
        q, k, v = (fresh(shape, torch.bfloat16, device, s) for s in (61, 62, 63))
        for causal in (False, True):
            base = None
            for name, fn in (("sdpa", sdpa), ("poly", fused("poly")), ("none", fused("none"))):
                rec = dict(shape=list(shape), method=name, causal=causal)
                try:
                    with torch.no_grad():
                        side = torch.cuda.Stream()
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):  # compile and warm up outside the capture
                            for _ in range(3):
                                fn(q, k, v, causal)
                        torch.cuda.current_stream().wait_stream(side)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            fn(q, k, v, causal)
                    rec["ms"] = time_call(graph.replay, warmup=args.warmup, repeats=args.repeats,
                                          max_seconds=args.case_seconds)
                except Exception as exc:  # noqa: BLE001 - recorded, the section goes on
                    rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if name == "sdpa":
                    base = rec
                ratio = _ratio_text(rec, base)
                rows.append(rec)
                log(f"  {'·'.join(map(str, shape)):16s} causal={int(causal)} fwd (graph) {name:5s} "
                    f"{rec.get('ms', float('nan')):8.3f} ms  {ratio}")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def profile_kernels(device, args, log, rows: list | None = None) -> list[dict]:
    """Where the time goes: CUDA time per kernel (torch.profiler) of one forward (no grad) and
    one forward+backward for SDPA and the fused steps on the target shapes. The kernel sum
    next to the timed milliseconds (back-to-back calls) shows the host's share (launches,
    synchronisations); ``host`` is the time the host spends in one call with an idle queue, which
    a single synchronised call (the timing table) adds before the GPU starts."""
    from torch.profiler import ProfilerActivity, profile

    rows = [] if rows is None else rows
    for shape in SWEEP_SHAPES:
        qkv = [fresh(shape, torch.bfloat16, device, s, requires_grad=True) for s in (51, 52, 53)]
        g = torch.randn_like(qkv[0])

        def step(fn, backward, qkv=qkv, g=g):
            run_once(fn, *qkv, False, g if backward else None)

        for (name, fn), backward in itertools.product(
            (("sdpa", sdpa), ("poly", fused("poly")), ("none", fused("none"))), (False, True)
        ):
            for _ in range(3):
                step(fn, backward)
            torch.cuda.synchronize()
            reps = 5
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                step(fn, backward)
            end.record()
            torch.cuda.synchronize()
            timed = start.elapsed_time(end) / reps
            host = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step(fn, backward)
                host.append((time.perf_counter() - t0) * 1000.0)
                torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    step(fn, backward)
                torch.cuda.synchronize()
            kernels = {}
            for ev in prof.key_averages():
                us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
                if us > 0 and ev.key[:1].isalpha():
                    kernels[ev.key] = us / reps / 1000.0
            top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
            total = sum(kernels.values())
            mode = "fwd+bwd" if backward else "fwd"
            rows.append(dict(shape=list(shape), method=name, mode=mode, timed_ms=timed, kernel_ms=total,
                             host_ms=statistics.median(host), kernels_ms=dict(top)))
            log(f"  {'·'.join(map(str, shape)):16s} {name:5s} {mode:7s} timed {timed:7.3f} ms, kernels {total:7.3f} ms, "
                f"host {statistics.median(host):6.3f} ms: "
                + ", ".join(f"{kname[:24]} {ms:.3f}" for kname, ms in top))
        del qkv, g
        torch.cuda.empty_cache()
    return rows


def clustered(shape, device, seed, clusters: int, noise: float = 0.5):
    """q, k, v where tokens come in contiguous clusters with orthogonal centres (like local
    structure in a sequence): for each query, keys of other clusters fall far below ``a``, so
    about ``1 - 1/clusters`` of the key blocks are skipped. Needs ``clusters <= d``."""
    bsz, h, n, d = shape
    g = torch.Generator(device=device).manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(bsz, h, d, clusters, generator=g, device=device)).Q
    centers = basis.transpose(-1, -2) * (8 * d**0.5) ** 0.5  # within-cluster score ~ 8
    base = centers[:, :, torch.arange(n, device=device) * clusters // n]
    q = base + noise * torch.randn(shape, generator=g, device=device)
    k = base + noise * torch.randn(shape, generator=g, device=device)
    v = torch.randn(shape, generator=g, device=device)
    return [x.to(torch.bfloat16) for x in (q, k, v)]


def skipped_fraction(q, k, v, step, causal, a=A, b=B_, t=T) -> float:
    """Fraction of visited key tiles that the fused forward skipped (NaN if it cannot say)."""
    try:
        spec = make_spec("dot", None, step, 1.0, causal, False, False)
        prm = resolve_params(a, b, t, batch=q.shape[:-2], n=q.shape[-2], dtype=torch.float32, device=q.device)
        with torch.no_grad():
            *_, frac = triton_warp_attend(q, k, v, *prm, None, spec, return_skipped=True)
        return float(frac)
    except Exception:  # noqa: BLE001 - a statistic, not a check
        return float("nan")


def run_once(fn, q, k, v, causal, gout) -> None:
    """One timed call: the forward under ``no_grad`` (``gout`` None), else forward+backward."""
    if gout is None:
        with torch.no_grad():
            fn(q, k, v, causal)
        return
    for x in (q, k, v):
        x.grad = None
    fn(q, k, v, causal).backward(gout)


def bench_case(name, fn, q, k, v, causal, backward, args):
    gout = torch.randn_like(q) if backward else None

    def once():
        run_once(fn, q, k, v, causal, gout)

    rec = dict(method=name, backward=backward, causal=causal)
    try:
        once()  # compile / autotune outside the timing
        rec["ms"] = time_call(once, warmup=args.warmup, repeats=args.repeats, max_seconds=args.case_seconds)
        try:
            rec["peak_gib"] = peak_extra(once)
        except torch.OutOfMemoryError:  # timed, but the peak measurement's extra copy did not fit
            rec["peak_gib"] = math.nan
    except torch.OutOfMemoryError:
        rec["error"] = "out of memory"
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        for x in (q, k, v):
            x.grad = None
        torch.cuda.empty_cache()
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_attention_gpu.json"))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--case-seconds", type=float, default=1.5, help="stop repeating a case after this long")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later optional cases are skipped")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-all", action="store_true", help="torch.compile on every shape (slow)")
    p.add_argument("--sweep", action="store_true", help="also time KernelConfig alternatives (step poly)")
    p.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    p.add_argument("--skip-peers", action="store_true", help="time only SDPA and simwarp (no naive/AdaSplash)")
    p.add_argument("--profile", action="store_true", help="also list CUDA time per kernel (torch.profiler)")
    p.add_argument("--graphs", action="store_true", help="also time the forward replayed from CUDA graphs")
    p.add_argument("--no-clustered", action="store_true",
                   help="skip the block-skipping section (clustered inputs), which otherwise runs first")
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="also time forward+backward with attention dropout P (vs SDPA with dropout P)")
    p.add_argument("--checks-only", action="store_true",
                   help="run the correctness checks (about a minute) and stop: exit status 1 if any fails")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.case_seconds = 10, 2, 0.6
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (the kernels are tested on CPU by tests/test_triton.py)")
        return 1
    device = torch.device("cuda")
    t0 = time.perf_counter()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    import triton

    result = dict(
        card=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), args=vars(args), checks=[], timings=[],
    )

    def log(msg):
        print(msg, flush=True)

    def save():
        result["seconds"] = time.perf_counter() - t0
        write_json(out_path, result, indent=1)

    log(f"# {result['card']}  torch {torch.__version__}  triton {triton.__version__}")
    log("## correctness (fresh inputs, outputs poisoned with NaN before each run)")
    for fn in (check_small, check_flat_rows, check_nonfinite, check_dropout, check_compile, check_mid_bf16):
        try:
            result["checks"] += fn(device, log)
        except Exception:  # noqa: BLE001
            result["checks"].append(dict(check=fn.__name__, ok=False, error=traceback.format_exc()[-2000:]))
            log(traceback.format_exc())
        save()
    try:
        result["checks"].append(check_bank(device, log, m=BANK[1] // 4 if args.quick else BANK[1]))
    except Exception:  # noqa: BLE001
        result["checks"].append(dict(check="bank", ok=False, error=traceback.format_exc()[-2000:]))
        log(traceback.format_exc())
    save()
    if args.checks_only:
        failed = [c for c in result["checks"] if not c.get("ok")]
        log(f"\n{len(result['checks']) - len(failed)} of {len(result['checks'])} checks passed; wrote {out_path}")
        return 1 if failed else 0

    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    ada = adasplash_method()
    log("\n## timing (bf16; ms = median; peak = GiB above the inputs)")
    for si, shape in enumerate(shapes):
        for causal in (False, True):
            try:
                result["checks"].append(check_none_vs_sdpa(device, shape, causal, log))
            except Exception:  # noqa: BLE001
                result["checks"].append(dict(check="none_vs_sdpa", shape=list(shape), ok=False,
                                             error=traceback.format_exc()[-2000:]))
                log(traceback.format_exc())
            q, k, v = (fresh(shape, torch.bfloat16, device, s, requires_grad=True) for s in (1, 2, 3))
            methods = [("sdpa", sdpa), ("fused_sigmoidal", fused("sigmoidal")), ("fused_poly", fused("poly")),
                       ("fused_none", fused("none"))]
            over = time.perf_counter() - t0 > args.budget
            if not over and not args.skip_peers:
                methods.append(("naive_eager", naive_softstep))
                if not args.no_compile and (si == 0 or args.compile_all):
                    methods.append(("naive_compile", naive_compiled))
                if ada is not None:
                    methods.append(("adasplash_1.5", ada))
            for backward in (False, True):
                sd = None
                for name, fn in methods:
                    rec = bench_case(name, fn, q, k, v, causal, backward, args)
                    rec["shape"] = list(shape)
                    if name == "sdpa":
                        sd = rec
                    if sd and "ms" in rec and "ms" in sd:
                        rec["ratio_sdpa"] = rec["ms"] / sd["ms"]
                        rec["mem_ratio_sdpa"] = rec["peak_gib"] / max(sd["peak_gib"], 1e-9)
                    if name.startswith("fused") and "ms" in rec and not backward:
                        rec["skipped"] = skipped_fraction(q, k, v, name.split("_", 1)[1], causal)
                    result["timings"].append(rec)
                    log(_fmt(rec))
                    save()
            del q, k, v
            torch.cuda.empty_cache()

    def optional_section(title, key, run):
        log(f"\n## {title}")
        if time.perf_counter() - t0 > args.budget:
            log(f"  skipped: past --budget {args.budget:.0f} s")
            return
        try:
            if key:  # rows are written to --out as they come: a run killed mid-section keeps them
                run(result.setdefault(key, _SavedRows(save)))
            else:
                run()
        except Exception:  # noqa: BLE001 - optional sections never end the run
            log(traceback.format_exc())
        save()

    # Stretch goal: clustered inputs where most key blocks are skipped.
    if not args.no_clustered:
        optional_section("block skipping (clustered inputs, step sigmoidal a=0.6, b=0.9)", None,
                         lambda: _bench_clustered(shapes[:2], device, args, result, log, save))
    if args.dropout > 0:
        optional_section(f"training with attention dropout {args.dropout} (fwd+bwd, bf16; vs SDPA flash with "
                         "the same dropout)", None, lambda: _bench_dropout(shapes, device, args, result, log, save))
    if args.sweep:
        optional_section("launch-configuration sweep (poly, non-causal, bf16; same run)", "sweep",
                         lambda rows: sweep_configs(device, args, log, rows))
    if args.graphs:
        optional_section("forward replayed from a CUDA graph (no host work; bf16, no grad)", "graphs",
                         lambda rows: graph_timings(device, args, log, rows))
    if args.profile:
        optional_section("CUDA time per kernel, forward (no grad) and forward+backward (torch.profiler; bf16, "
                         "non-causal)", "profile", lambda rows: profile_kernels(device, args, log, rows))

    _table(result["timings"], log)
    bad = [c for c in result["checks"] if not c.get("ok")]
    log(f"\nchecks: {len(result['checks']) - len(bad)} ok, {len(bad)} failed; {time.perf_counter() - t0:.0f} s; JSON: {out_path}")
    save()
    return 0 if not bad else 2


def _bench_clustered(shapes, device, args, result, log, save) -> None:
    for shape in shapes:
        q, k, v = clustered(shape, device, 7, clusters=CLUSTERS)
        for x in (q, k, v):
            x.requires_grad_()
        frac = skipped_fraction(q, k, v, "sigmoidal", False, a=0.6, b=0.9, t=0.5)

        def sparse_fused(q, k, v, causal):
            return simwarp.warp_attend(q, k, v, step="sigmoidal", a=0.6, b=0.9, t=0.5, causal=causal, impl="triton")

        for backward in (False, True):
            sd = bench_case("sdpa", sdpa, q, k, v, False, backward, args)
            rec = bench_case("fused_sigmoidal_clustered", sparse_fused, q, k, v, False, backward, args)
            for r in (sd, rec):
                r["shape"] = list(shape)
                r["input"] = "clustered"
            if "ms" in rec and "ms" in sd:
                rec["ratio_sdpa"] = rec["ms"] / sd["ms"]
                rec["mem_ratio_sdpa"] = rec["peak_gib"] / max(sd["peak_gib"], 1e-9)
            rec["skipped"] = frac
            result["timings"] += [sd, rec]
            log(_fmt(sd))
            log(_fmt(rec))
            save()
        del q, k, v
        torch.cuda.empty_cache()


def _bench_dropout(shapes, device, args, result, log, save) -> None:
    p = args.dropout

    def sdpa_dropout(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)

    def simwarp_dropout(step, impl):
        def run(q, k, v, causal):
            return simwarp.warp_attend(q, k, v, step=step, a=A, b=B_, t=T, causal=causal, impl=impl, dropout_p=p)

        return run

    methods = [("sdpa", sdpa_dropout), ("fused_sigmoidal", simwarp_dropout("sigmoidal", "triton")),
               ("fused_poly", simwarp_dropout("poly", "triton")), ("fused_none", simwarp_dropout("none", "triton")),
               ("chunked_sigmoidal", simwarp_dropout("sigmoidal", "chunked"))]
    for si, shape in enumerate(shapes):
        for causal in (False, True):
            q, k, v = (fresh(shape, torch.bfloat16, device, s, requires_grad=True) for s in (1, 2, 3))
            sd = None
            for name, fn in methods:
                if name.startswith("chunked") and (si > 0 or causal):  # the old path: one point of comparison
                    continue
                rec = bench_case(name, fn, q, k, v, causal, True, args)
                rec["shape"], rec["input"] = list(shape), f"dropout {p}"
                if name == "sdpa":
                    sd = rec
                if sd and "ms" in rec and "ms" in sd:
                    rec["ratio_sdpa"] = rec["ms"] / sd["ms"]
                    rec["mem_ratio_sdpa"] = rec["peak_gib"] / max(sd["peak_gib"], 1e-9)
                result["timings"].append(rec)
                log(_fmt(rec))
                save()
            del q, k, v
            torch.cuda.empty_cache()


def _fmt(rec) -> str:
    shape = "·".join(map(str, rec.get("shape", [])))
    mode = "fwd+bwd" if rec["backward"] else "fwd"
    if "error" in rec:
        return f"  {shape:16s} causal={int(rec['causal'])} {mode:7s} {rec['method']:26s} {rec['error']}"
    extra = f"  x{rec['ratio_sdpa']:.2f} SDPA, mem x{rec['mem_ratio_sdpa']:.2f}" if "ratio_sdpa" in rec else ""
    skip = f", skipped {rec['skipped']:.0%}" if "skipped" in rec else ""
    return (f"  {shape:16s} causal={int(rec['causal'])} {mode:7s} {rec['method']:26s} {rec['ms']:9.3f} ms "
            f"{rec['peak_gib']:7.2f} GiB{extra}{skip}")


def _table(timings, log) -> None:
    methods = []
    for r in timings:
        if r["method"] not in methods:
            methods.append(r["method"])
    keys = []
    for r in timings:
        key = (tuple(r["shape"]), r["causal"], r["backward"], r.get("input", "random"))
        if key not in keys:
            keys.append(key)
    log("\n## time ratio to SDPA (same run, same card); 'oom' = out of memory, '-' = not run")
    log("| shape | causal | mode | SDPA ms | " + " | ".join(m for m in methods if m != "sdpa") + " |")
    log("|---|---|---|---|" + "---|" * (len(methods) - 1))
    for key in keys:
        cells = {r["method"]: r for r in timings
                 if (tuple(r["shape"]), r["causal"], r["backward"], r.get("input", "random")) == key}
        sd = cells.get("sdpa", {})
        row = [
            "·".join(map(str, key[0])) + ("" if key[3] == "random" else f" ({key[3]})"), str(int(key[1])),
            "fwd+bwd" if key[2] else "fwd",
            f"{sd['ms']:.3f}" if "ms" in sd else "-",
        ]
        for m in methods:
            if m == "sdpa":
                continue
            r = cells.get(m)
            if r is None:
                row.append("-")
            elif "error" in r:
                row.append("oom" if "memory" in r["error"] else "err")
            else:
                row.append(f"{r['ratio_sdpa']:.2f}x" if "ratio_sdpa" in r else f"{r['ms']:.2f}ms")
        log("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
