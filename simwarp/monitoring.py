"""Monitoring SoftStep attention: per-layer, per-head kept fraction.

The *kept fraction* of a query row is the number of keys the step keeps (mask not 0) divided by the
number of keys it was allowed to attend to (mask, causal, padding); a head's value is the
mean over the non-empty rows of the batch. It is 1 for softmax attention (``step="none"``) and
falls as the learned step drops weak keys.

Usage::

    with AttentionMonitor(model) as mon:
        model(x)
    mon.kept_fraction()      # {"layers.0.self_attn.softstep": tensor([0.41, 0.37, ...]), ...}
    print(mon.summary())

Every :class:`simwarp.SoftStepAttention` (inside :class:`simwarp.MultiheadSoftStepAttention`,
or attached to a transformers model by :func:`simwarp.integrations.transformers.attach_softstep`)
records :class:`simwarp.attention.AttentionStats` of its last forward while ``track_stats`` is
set; the monitor sets it on entry, collects each call's statistics with a stats hook
(:meth:`simwarp.SoftStepAttention.register_stats_hook`; nested monitors do not disturb each other) and restores the flag on exit. Recording costs one
extra reduction of the mask per call. ``AttentionMonitor(model, accumulate=True)`` averages
over every call in the block (gradient accumulation, evaluation over a data loader) instead of
reporting the last one. A forward that activation checkpointing recomputes during backward is
not a new call: it is not recorded again.
"""

from __future__ import annotations

import torch
from torch import nn

from simwarp._autograd import as_flag, is_int
from simwarp.attention import AttentionStats, SoftStepAttention

__all__ = ["AttentionMonitor", "attention_modules"]


def attention_modules(model: nn.Module) -> dict[str, SoftStepAttention]:
    """All :class:`SoftStepAttention` submodules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SoftStepAttention)}


class AttentionMonitor:
    """Context manager recording the statistics of every SoftStep attention layer of ``model``.

    Args:
        model: any module tree. The layers are those present on entry: a transformers model
            switched to ``"softstep"`` without :func:`attach_softstep` creates its layers at its
            first call, which is then not recorded (later calls in a new ``with`` block are).
            Call ``attach_softstep(model)`` first, as for training.
        accumulate: :meth:`kept_fraction` averages over all rows of all calls in the block
            (default: the last call of each layer).
    """

    def __init__(self, model: nn.Module, accumulate: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.accumulate = as_flag("accumulate", accumulate)
        self._previous: dict[str, bool] = {}
        self._hooks: list = []
        self._last: dict[str, AttentionStats] = {}
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: (Σ fraction, rows) per head

    def __enter__(self) -> AttentionMonitor:
        self._last, self._sums = {}, {}
        for name, m in attention_modules(self.model).items():
            self._previous[name] = m.track_stats
            m.track_stats = True
            self._hooks.append(m.register_stats_hook(lambda module, stats, name=name: self._record(name, stats)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, m in attention_modules(self.model).items():
            m.track_stats = self._previous.get(name, False)
        self._previous = {}

    def _record(self, name: str, stats: AttentionStats) -> None:
        self._last[name] = stats
        if self.accumulate:
            total, rows = stats.head_kept_sums()
            if name in self._sums:
                total, rows = total + self._sums[name][0], rows + self._sums[name][1]
            self._sums[name] = (total, rows)

    def stats(self) -> dict[str, AttentionStats]:
        """The last recorded :class:`AttentionStats` per layer (``(B, H, L)`` fields)."""
        return dict(self._last)

    def kept_fraction(self) -> dict[str, torch.Tensor]:
        """Per layer, the ``(H,)`` mean kept fraction of each head over non-empty rows: of the
        last call, or (``accumulate``) of every call in the block. NaN for a head without any
        row to count (every row empty, or NaN from NaN inputs)."""
        if self.accumulate:
            return {n: total / rows for n, (total, rows) in self._sums.items()}
        return {n: s.head_kept_fraction() for n, s in self._last.items()}

    def summary(self, digits: int = 3) -> str:
        """A plain-text table: one line per layer, the kept fraction of each head."""
        if not is_int(digits, 0):
            raise ValueError(f"digits must be a non-negative int, got {digits!r}")
        lines = []
        for name, frac in self.kept_fraction().items():
            heads = " ".join(f"{x:.{digits}f}" for x in frac.tolist())
            lines.append(f"{name}: mean {frac.nanmean().item():.{digits}f} | heads {heads}")  # (NaN: no row counted)
        return "\n".join(lines) if lines else "(no SoftStep attention call recorded)"
