"""Autograd, autocast and tracing helpers shared by the backends and front ends."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import numpy
import torch


def _batched(grads: tuple) -> bool:
    """Whether a backward runs under vmap (``is_grads_batched``, ``jacobian(vectorize=True)``);
    ``False`` while tracing, and where this torch cannot tell (private predicates)."""
    if torch.compiler.is_compiling():
        return False
    functorch = getattr(torch._C, "_functorch", None)
    predicates = [getattr(functorch, name, None) for name in ("is_legacy_batchedtensor", "is_batchedtensor")]
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
    return transforms_active() or any(
        isinstance(g, torch.Tensor) and any(p is not None and p(g) for p in predicates) for g in grads
    )


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # (torch.OutOfMemoryError: 2.5+)

#: torch 2.11's compiler gives an autograd.Function output that its forward wrote in place (an
#: ``add_``, a ``div_``) the gradient slot of another output: silently wrong gradients
#: (pytorch/pytorch#180642; 2.10 and 2.12 are right).
_INPLACE_OUTPUT_BUG = torch.__version__.startswith("2.11.")


def unaliased(outputs):
    """An autograd.Function's ``forward`` result (a tensor or a tuple), as it is, or copies of its
    tensors while torch 2.11 compiles (``_INPLACE_OUTPUT_BUG``): a copy was never written in
    place. Call it before ``ctx.mark_non_differentiable``, on what ``forward`` returns."""
    if not (_INPLACE_OUTPUT_BUG and torch.compiler.is_compiling()):
        return outputs
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in outputs)


def first_order(backward: Callable) -> Callable:
    """``torch.autograd.function.once_differentiable`` that also refuses ``create_graph=True``.

    ``once_differentiable`` raises only when the incoming gradients require grad; for
    ``torch.autograd.grad(y.sum(), x, create_graph=True)`` they do not, so the gradient comes
    back detached and a second derivative (a gradient penalty, a Hessian-vector product) would
    silently miss every term through this function. Here that is an error instead. A backward
    that vmap cannot batch (``is_grads_batched=True``, ``jacobian(vectorize=True)``) raises
    ``NotImplementedError`` naming the cause, instead of PyTorch's batching-rule error.
    """
    inner = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # the engine runs backward in grad mode only for create_graph=True
            raise RuntimeError(
                "simwarp's similarity kernels have first-order gradients only: backward with "
                "create_graph=True (double backward, gradient penalties, Hessian-vector products) "
                "through them is not supported"
            )
        try:
            return inner(ctx, *grads)
        except RuntimeError as error:
            if isinstance(error, _OUT_OF_MEMORY) or not _batched(grads):
                raise
            raise NotImplementedError(
                f"simwarp's {type(ctx).__name__.removesuffix('Backward')} does not support batched gradients "
                "(torch.autograd.grad with is_grads_batched=True, torch.autograd.functional.jacobian/hessian with "
                "vectorize=True): its hand-written backward cannot be vmapped; use vectorize=False or one "
                "backward per output"
            ) from error

    return wrapper


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # an older signature, or a device type autocast does not know
        return False


def autocast_like_sdpa(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` as autocast hands them to SDPA, which is on its lower-precision list: where
    autocast is on for their device, floating-point tensors other than float64 become its dtype.
    Under mixed precision a rotary embedding (float32 ``cos``/``sin``) returns float32 ``q``,
    ``k`` beside a half-precision ``v``; SDPA gets all three in half precision."""
    device = tensors[0].device.type
    if not autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in tensors)


def outside_autocast(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off on the device of its first tensor argument.

    The backend chooses its own precision (float32 arithmetic for half inputs, the fused kernels'
    tensor-core products); under autocast, its custom autograd functions would otherwise see a
    product autocast to half precision in forward and the inputs' float32 in backward, a dtype
    mismatch. Autocast still applies to the layers that produce the inputs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = _first_tensor((*args, *kwargs.values()))
        if x is not None and autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _first_tensor(values) -> torch.Tensor | None:
    # a loop, not next() over a generator with a default, which torch.compile before 2.7 cannot trace
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


def without_functorch(fn: Callable) -> Callable:
    """Refuse ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``) with an error
    that says why: the backend's autograd functions stream over key blocks with data-dependent
    control flow and hand-written backward passes, which functorch cannot transform (its own
    error names neither simwarp nor the reason). Ordinary autograd, ``torch.compile`` and
    ``torch.export`` work."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch._C._are_functorch_transforms_active():
            raise NotImplementedError(
                f"simwarp.{fn.__qualname__} does not support torch.func transforms (grad, vmap, jacrev, jvp): "
                "its autograd functions stream over key blocks with hand-written backward passes (and the "
                "heads update running statistics and check labels on the host). Use "
                "ordinary autograd (loss.backward() or torch.autograd.grad); per-sample gradients need "
                "one backward per sample"
            )
        return fn(*args, **kwargs)

    return wrapper


def as_flag(name: str, value) -> bool:
    """``value`` as a bool: Python and NumPy bools, and the ints 0 and 1; anything else (a string,
    None, a tensor) is a ``TypeError`` that names ``name``."""
    if isinstance(value, (bool, numpy.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def as_optional_flag(name: str, value) -> bool:
    """:func:`as_flag`, with ``None`` read as ``False`` (as tqdm's ``disable=None``)."""
    return value is not None and as_flag(name, value)


def is_finite_real(x) -> bool:
    """``math.isfinite`` for a real number, written as comparisons so that ``torch.compile`` can
    trace it on the symbolic floats of ``dynamic=True`` (``math.isfinite`` breaks the graph)."""
    return -math.inf < x < math.inf


def is_int(x, minimum: int) -> bool:
    """Whether ``x`` is an integer (Python or NumPy; not a bool) of at least ``minimum``."""
    return not isinstance(x, bool) and isinstance(x, numbers.Integral) and x >= minimum


def require(
    condition: torch.Tensor, message: str, detail: Callable[[], str] | None = None, error: type[Exception] = ValueError
) -> None:
    """Raise ``error(message)`` unless the boolean tensor ``condition`` holds everywhere.

    Eager: read back on the host, and ``detail()`` (if given) is appended, e.g. the offending
    values. Under ``torch.compile`` / ``torch.export``: an assertion inside the graph with
    ``message`` alone, raised as a ``RuntimeError`` when the compiled code runs, so a data check
    costs no graph break."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition.all(), message)
    elif not bool(condition.all()):
        raise error(message if detail is None else f"{message}{detail()}")


def exporting() -> bool:
    """Whether ``torch.export`` is tracing (``False`` on torch < 2.5, which cannot tell).

    An exported program must run at every size its dynamic dimensions allow, so size-dependent
    choices that are free under ``torch.compile`` (a guard, then a recompile) are made once for
    all sizes there: one block of rows, the dense backend."""
    return getattr(torch.compiler, "is_exporting", lambda: False)()


def recomputing_in_backward() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not; Hugging Face's gradient checkpointing)
    recomputing it. Statistics recorded in forward are left alone then, so that each call
    counts once. ``False`` while tracing (a graph has no such state)."""
    if torch.compiler.is_compiling():
        return False
    current = getattr(torch._C, "_current_graph_task_id", None)  # private, present since torch 2.0
    return current is not None and current() != -1


def zeros_linked_to(zeros: torch.Tensor, *inputs) -> torch.Tensor:
    """``zeros`` that autograd links to every input that requires grad, so that a backward through
    an empty call still runs each input's graph: its parameters get (zero) gradients, as DDP
    expects, and collectives in it (the gathers of :mod:`simwarp.distributed`) run on every rank.
    The link is the sum of an empty slice: exactly 0 whatever the inputs hold (inf or NaN in a
    query row must not reach the other rows)."""
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            empty = x.narrow(-1, 0, 0) if x.dim() else x.reshape(1)[:0]  # views: nothing copied
            zeros = zeros + empty.sum().to(zeros.dtype)
    return zeros


def row_slices(n: int, block: int) -> list[slice]:
    """Slices of ``block`` rows covering ``n`` rows; under ``torch.export`` one slice of all of
    them (a loop over ``range(0, n, block)`` would fix the exported program's batch size)."""
    if exporting():
        return [slice(None)]
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]
