"""Plain-autograd statements of the built-in steps: the old, slow but obviously correct forms.

The closed-form steps (log and mask forms) must agree with them in value and in every
gradient; registered as user steps they also give the backend an independent path.
"""

import math

import torch


def _select(phi, dropped, above):
    return phi.masked_fill(above, 0.0).masked_fill(dropped, -math.inf)


def sigmoidal_reference(u, a, b, t):
    below, above = u <= a, u >= b
    u_in = torch.where(below | above, (a + b) * 0.5, u)
    z = torch.log((b - u_in) / (u_in - a)) / t
    # exact (F.softplus switches to z above 20), and its gradient is right at z = 0 (where
    # z.clamp_min(0) + log1p(exp(-|z|)) passes 1 through the clamp instead of 1/2)
    softplus = torch.logaddexp(z, torch.zeros_like(z))
    return _select(-softplus, below, above)


def log_reference(u, a, b, t):
    dropped, above = u <= 0, u >= b
    u_in = torch.where(dropped | above, b * 0.5, u)
    return _select(t / (1 - t) * (b - u_in) * torch.log(u_in / b), dropped, above)


def poly_reference(u, a, b, t):
    y = (u - (a + b) * 0.5) / (t * (b - a)) + 0.5
    dropped, above = y <= 0, y >= 1
    y_in = torch.where(dropped | above, 0.5, y)
    return _select(torch.log(y_in * y_in * (3 - 2 * y_in)), dropped, above)


