"""Autograd and autocast helpers shared by the backends."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def first_order(backward: Callable) -> Callable:
    """``torch.autograd.function.once_differentiable`` that also refuses ``create_graph=True``.

    ``once_differentiable`` raises only when the incoming gradients require grad; for
    ``torch.autograd.grad(y.sum(), x, create_graph=True)`` they do not, so the gradient comes
    back detached and a second derivative (a gradient penalty, a Hessian-vector product) would
    silently miss every term through this function. Here that is an error instead.
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
        return inner(ctx, *grads)

    return wrapper


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # an older signature, or a device type autocast does not know
        return False


def outside_autocast(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off on the device of its first tensor argument.

    The backend chooses its own precision (float32 arithmetic for half inputs, the fused kernels'
    tensor-core products); under autocast, its custom autograd functions would otherwise see a
    product autocast to half precision in forward and the inputs' float32 in backward, a dtype
    mismatch. Autocast still applies to the layers that produce the inputs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is not None and _autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
