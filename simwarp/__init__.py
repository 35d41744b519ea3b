"""simwarp: learned sparse similarity (SoftStep) as a building block of deep networks.

Core API:

* :func:`warp_attend` / :func:`warp_weights` / :func:`warp_range`: the batched SoftStep backend.
* :class:`SoftStep`: learned step parameters (global, per head, or per instance).
* :mod:`simwarp.steps`: the step registry (``register_step``).
"""

from simwarp import distributed, monitoring, steps
from simwarp.attention import (
    MultiheadSoftStepAttention,
    SoftStepAttention,
    softstep_attention,
    swap_attention,
)
from simwarp.backend import WarpStats, warp_attend, warp_range, warp_weights
from simwarp.heads import (
    KNNRegressionHead,
    LinearClassificationHead,
    LinearHead,
    NeighborClassificationHead,
    NeighborRegressionHead,
    make_head,
)
from simwarp.similarity import pairwise_similarity
from simwarp.steps import SoftStep, register_step

__version__ = "0.1.0"

# The losses import pytorch-metric-learning (and through it SciPy): about half a second that
# attention and heads users need not pay, so they load on first use.
_LAZY = {"losses": None, "SoftStepContrastiveLoss": "losses", "SoftStepNCALoss": "losses",
         "SoftStepNeighborRegressionLoss": "losses"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'simwarp' has no attribute {name!r}")
    import importlib

    module = importlib.import_module("simwarp.losses")
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "MultiheadSoftStepAttention",
    "SoftStepAttention",
    "softstep_attention",
    "swap_attention",
    "KNNRegressionHead",
    "LinearClassificationHead",
    "LinearHead",
    "NeighborClassificationHead",
    "NeighborRegressionHead",
    "make_head",
    "SoftStepContrastiveLoss",
    "SoftStepNCALoss",
    "SoftStepNeighborRegressionLoss",
    "SoftStep",
    "WarpStats",
    "pairwise_similarity",
    "register_step",
    "steps",
    "distributed",
    "monitoring",
    "warp_attend",
    "warp_range",
    "warp_weights",
]
