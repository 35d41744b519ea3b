"""Autograd helpers shared by the backends."""

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
