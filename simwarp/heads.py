"""Neighbour heads: predict from the labels of similar rows, weighted by a learned SoftStep.

A neighbour head is a drop-in for a final ``nn.Linear``: it maps embeddings ``z (N, D)`` to
predictions, but instead of a weight matrix it averages the *labels of neighbours*:

* **training** (``module.training`` and ``y`` given): every row of the batch is predicted from
  the *other* rows of the same batch (leave-one-out through ``exclude_self``), so
  ``loss = mse(head(z, y), y)`` trains the encoder and the step parameters together;
* **inference** (eval mode, or ``y=None``): every query is predicted from a stored *bank* of
  embeddings and labels (:meth:`set_bank` / :meth:`fit_bank`), streamed by the backend with
  bounded memory when the bank is large (``impl="auto"``).

All similarity, normalisation and softmax math happens in the backend
(:func:`simwarp.warp_attend`, :func:`simwarp.warp_weights`, :func:`simwarp.pairwise_similarity`).

Classes:
    :class:`NeighborRegressionHead`, :class:`NeighborClassificationHead` (SoftStep, or plain
    neighbour attention with ``step="none"`` — the NONA baseline), :class:`KNNRegressionHead`
    (hard top-k average), :class:`LinearHead` and :class:`LinearClassificationHead` (linear
    baselines with the same call signatures), and :func:`make_head` to build the regression
    heads by name.
"""

from __future__ import annotations

import math
import operator
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from simwarp._autograd import (
    as_flag,
    as_optional_flag,
    exporting,
    outside_autocast,
    recomputing_in_backward,
    require,
    row_slices,
    without_functorch,
)
from simwarp.backend import warp_attend, warp_weights
from simwarp.backend.common import (
    as_real,
    check_backend_options,
    exact_dtype,
    resolve_params,
    work_dtype,
)
from simwarp.distributed import (
    CallKind,
    check_global_batch,
    gather_and_attend,
    global_moments,
    global_size,
    merge_moments,
    raise_together,
    resolve_group,
    sharded_explain,
    sharded_warp_attend,
)
from simwarp.similarity import METRICS, PreparedKeys, queries_centre
from simwarp.steps import SoftStep, get_step

__all__ = [
    "HEAD_KINDS",
    "KNNRegressionHead",
    "LinearClassificationHead",
    "LinearHead",
    "NeighborClassificationHead",
    "NeighborRegressionHead",
    "make_head",
]

#: scores materialised at once by :meth:`explain` and the kNN head (queries × bank entries).
EXPLAIN_BUDGET = 1 << 22
#: queries per block of the kNN head: each key block's GEMM serves this many queries (the
#: block has ``EXPLAIN_BUDGET`` scores, 16 MiB in float32, however large the bank).
KNN_ROWS = 256
#: above this many classes the classification head weighs a bank block by block
#: (:func:`simwarp.warp_weights`, ``EXPLAIN_BUDGET`` scores at a time) and adds each entry's
#: weight to its class, instead of averaging one-hot rows (``M × C`` values, ``n · M · C`` flops).
ONE_HOT_CLASSES = 64
_HEAD_MODES = ("global", "instance")


def _shape(x: Any) -> tuple:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _int_arg(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum`` (NumPy integers accepted, bools not)."""
    try:
        as_int = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        as_int = None
    if as_int is None or as_int < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return as_int


def _device(z: Any, module: nn.Module) -> torch.device:
    """Where a call's collectives run: the inputs' device (the backend's, e.g. CUDA for
    nccl), else the module's (``z`` is not a tensor: its checks are about to fail)."""
    if isinstance(z, torch.Tensor):
        return z.device
    return next(module.buffers()).device


def _check_z(z: Any, in_features: int, name: str = "z") -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2 or z.shape[-1] != in_features:
        raise ValueError(f"{name} must have shape (N, in_features={in_features}), got {_shape(z)}")
    if not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")


def _check_class_label_shape(y: Any, n: int, name: str = "y") -> None:
    """A tensor ``y`` must be ``(N,)`` class indices (anything else is ignored where labels are optional)."""
    if isinstance(y, torch.Tensor) and (y.dim() != 1 or y.shape[0] != n):
        raise ValueError(f"{name} must have shape (N={n},) of class indices, got {_shape(y)}")


def _class_labels(y: Any, n: int, num_classes: int, name: str = "y") -> torch.Tensor:
    """``y`` as ``(N,)`` int64 class indices in ``[0, num_classes)`` (whole-number floats are
    accepted), or the error that says what is wrong with it."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.is_complex():
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if y.is_floating_point():
        require(torch.isfinite(y), f"{name} contains NaN or inf labels")
        require(y == y.round(), f"{name} must hold class labels: floating-point labels must be whole numbers")
    _check_class_label_shape(y, n, name)
    y = y.long()
    if n:
        require(
            (y >= 0) & (y < num_classes),
            f"{name} labels must lie in [0, num_classes={num_classes})",
            lambda: f", got range [{int(y.min())}, {int(y.max())}]",
        )
    return y


def _to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor (also inside dicts, lists and tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # namedtuples too
    return batch


#: Samplers that draw rows in a random order (with ``replacement``: some twice, some never).
_RANDOM_SAMPLERS = (
    torch.utils.data.RandomSampler,
    torch.utils.data.SubsetRandomSampler,
    torch.utils.data.WeightedRandomSampler,
)


def _drops_rows(loader: Any) -> bool:
    """Whether a ``DataLoader`` leaves rows out: its batch sampler drops a last incomplete batch."""
    batches = getattr(loader, "batch_sampler", None)
    if not isinstance(batches, torch.utils.data.BatchSampler) or not batches.drop_last:
        return False
    try:
        return len(batches.sampler) % batches.batch_size != 0
    except TypeError:  # a sampler without a length: it may drop rows
        return True


def _progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional (extra "data")
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


@outside_autocast
def streaming_topk(queries: torch.Tensor, keys: torch.Tensor, metric: str, k: int, exclude_self: bool = False) -> torch.Tensor:
    """Indices ``(N, k)`` of each query's ``k`` most similar keys ``(M, d)`` (any order on ties).

    Streams blocks of ``KNN_ROWS`` queries × ``EXPLAIN_BUDGET / KNN_ROWS`` keys (one GEMM each,
    :class:`~simwarp.similarity.PreparedKeys`) and merges each block's top-k into a running one,
    so memory is bounded however large the bank. ``exclude_self``: query ``i`` never picks key
    ``i`` (leave-one-out over a batch). Needs ``k <= M`` (``M - 1`` with ``exclude_self``).
    Scores in the backend's working precision (float16 and bfloat16 inputs in float32: in
    their own precision the ranking picks wrong neighbours), with autocast off."""
    dtype = work_dtype(torch.promote_types(queries.dtype, keys.dtype))
    queries, keys = queries.to(dtype), keys.to(dtype)
    prepared = PreparedKeys(keys, metric, centre=queries_centre(queries, metric))
    per_score = queries.shape[-1] if metric == "l1" else 1  # l1's scores hold (rows, keys, d) differences
    width = max(k, EXPLAIN_BUDGET // (KNN_ROWS * per_score))
    out = torch.empty((queries.shape[0], k), dtype=torch.long, device=queries.device)
    for rows in row_slices(queries.shape[0], KNN_ROWS):
        zq = queries[rows]
        start = rows.start or 0
        best_s = best_i = None
        for key_start in range(0, keys.shape[0], width):
            s = prepared.scores(zq, key_start, key_start + width)
            if exclude_self:  # each query's own key, where this block holds it
                own = torch.arange(start, start + zq.shape[0], device=zq.device) - key_start
                inside = (own >= 0) & (own < s.shape[1])
                s[torch.arange(zq.shape[0], device=zq.device)[inside], own[inside]] = -math.inf
            s = s.nan_to_num_(nan=-math.inf)  # a NaN key is nobody's neighbour (topk ranks NaN first)
            top_s, top_i = torch.topk(s, min(k, s.shape[1]), dim=-1)
            if best_s is not None:
                top_s, top_i = torch.cat([best_s, top_s], -1), torch.cat([best_i, top_i + key_start], -1)
                top_s, pick = torch.topk(top_s, k, dim=-1)
                top_i = top_i.gather(-1, pick)
            best_s, best_i = top_s, top_i
        out[rows] = best_i
    return out


class _BankMixin(nn.Module):
    """Bank of stored embeddings ``bank_z (M, D)`` and labels ``bank_y`` held as buffers.

    An empty bank has ``M = 0``. Loading a state dict resizes the bank buffers to the stored
    shapes (keeping the head's dtype and device, as for any buffer), so a trained head
    round-trips with its bank through ``state_dict`` / ``torch.save``.
    """

    in_features: int
    _BANK_KEYS = ("bank_z", "bank_y")
    #: Floating-point buffers kept at least float32 under ``.half()`` / ``.to(torch.bfloat16)``:
    #: regression targets (prices, counts) and their running sums overflow float16 (65504).
    _WIDE_BUFFERS: tuple[str, ...] = ()
    #: ``(local entries, entries over all ranks)`` of the current bank under ``gather``, so that
    #: predictions do not pay a collective each to learn the union's size; reset with the bank.
    _bank_union: tuple[int, int] | None = None

    def _init_bank(self, y_shape: tuple[int, ...], y_dtype: torch.dtype) -> None:
        self.register_buffer("bank_z", torch.zeros(0, self.in_features))
        self.register_buffer("bank_y", torch.zeros((0, *y_shape), dtype=y_dtype))

    @property
    def bank_size(self) -> int:
        """Number of stored bank entries ``M`` (0 = no bank)."""
        return int(self.bank_z.shape[0])

    @property
    def has_bank(self) -> bool:
        return self.bank_size > 0

    def _check_labels(self, y: Any, z: torch.Tensor, name: str = "y") -> torch.Tensor:  # pragma: no cover - abstract
        """``y`` checked as the labels of the rows of ``z`` (and converted for the backend)."""
        raise NotImplementedError

    def set_bank(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Store ``z (M, in_features)`` and their labels as the inference bank (detached).

        The bank follows the inputs' device and dtype; embeddings and labels are checked
        (shapes, NaN and inf). With ``gather``, this rank's shard may be empty (the bank is
        the union of the shards).
        """
        self._store_bank(z, y)

    def _config_fingerprint(self) -> int:
        """See :meth:`_WarpHeadBase._config_fingerprint` (heads without ``gather`` need none)."""
        return 0

    def _store_bank(self, z: Any, y: Any, failure: Exception | None = None, device=None) -> None:
        """:meth:`set_bank`; ``failure``: an error met before it on this rank (``fit_bank``'s
        encoder), raised on every rank by the agreement under ``gather`` as the checks' own,
        whose collective then runs on ``device`` (where the other ranks' embeddings are) if given."""
        enabled, group = resolve_group(getattr(self, "gather", False))

        def check() -> torch.Tensor:
            if failure is not None:
                raise failure
            _check_z(z, self.in_features)
            labels = self._check_labels(y, z)
            if z.shape[0] == 0 and not enabled:
                raise ValueError(f"set_bank needs at least one entry, got z of shape {_shape(z)}")
            if not bool(torch.isfinite(z).all()):
                bad = int((~torch.isfinite(z)).any(dim=-1).sum())
                raise ValueError(f"z (bank embeddings, shape {_shape(z)}) has NaN or inf in {bad} row(s); drop or fix them first")
            return labels

        union = None
        if enabled:  # the checks agreed over ranks, and every shard's size learnt with them
            rows = z.shape[0] if isinstance(z, torch.Tensor) and z.dim() == 2 else 0
            where = torch.device(device) if device is not None and not isinstance(z, torch.Tensor) else _device(z, self)
            y, shares = raise_together(check, group, where, same=(CallKind.HEAD_SET_BANK, self._config_fingerprint()), share=(rows,))
            union = sum(size for (size,) in shares)
        else:
            y = check()
        with torch.inference_mode(False):  # copies usable with gradients, also of tensors made in inference mode
            self.bank_z = z.detach().clone()
            self.bank_y = y.detach().clone()
        self._bank_union = None if union is None else (self.bank_size, union)
        if union == 0:  # on every rank alike
            self.clear_bank()
            raise ValueError("set_bank got no entry on any rank (every shard of the bank is empty)")
        self._on_bank_set()

    def _on_bank_set(self) -> None:
        pass

    def clear_bank(self) -> None:
        """Drop the bank (keeps the learned parameters)."""
        self.bank_z = self.bank_z.new_zeros((0, self.in_features))
        self.bank_y = self.bank_y.new_zeros((0, *self.bank_y.shape[1:]))
        self._bank_union = None

    @torch.no_grad()
    def fit_bank(
        self,
        encoder: Callable[..., torch.Tensor] | None,
        loader: Iterable,
        device: torch.device | str | None = None,
        progress: bool = True,
        label_key: str = "labels",
    ) -> None:
        """Encode a data set and store it as the bank.

        Use a loader over the whole data set in a fixed order (``shuffle=False``, no
        ``drop_last``): every row becomes a bank entry, and :meth:`explain`'s indices are
        positions in that order. A ``DataLoader`` with ``drop_last=True`` or a random sampler
        (``shuffle=True``, ``SubsetRandomSampler``, ``WeightedRandomSampler``) gets a warning,
        and so does a ``DistributedSampler`` that pads the data set with repeated rows: under
        ``gather`` give each rank a contiguous shard (``Subset(dataset, range(start, stop))``).
        Under ``gather`` each rank encodes its own shard; an error on one rank while encoding
        is raised there and, naming it, on every other rank (none waits in a collective).

        Args:
            encoder: a module or any callable (a function, ``model.encode``) that maps a batch
                ``x`` to ``z (B, in_features)``; ``None`` = ``x`` already is ``z``. Run without
                gradients, a module (or the module of a method) in eval mode (its mode is
                restored afterwards).
            loader: iterable of ``(x, y)`` batches (e.g. a ``DataLoader``), or of dicts in the
                Hugging Face style: ``y = batch[label_key]`` and the encoder is called as
                ``encoder(**rest)``. Batches bound the memory.
            device: where to move each batch's tensors (also inside dicts, lists and tuples)
                before encoding (``None``: leave them).
            progress: show a progress bar (needs ``tqdm``).
            label_key: the labels' key in dict batches.
        """
        if encoder is not None and not callable(encoder):
            raise TypeError(f"encoder must be callable (a module, model.encode, a function) or None, got {type(encoder).__name__}")
        if not hasattr(loader, "__iter__"):
            raise TypeError(f"loader must be an iterable of batches (a DataLoader), got {type(loader).__name__}")
        progress = as_optional_flag("progress", progress)
        if _drops_rows(loader):
            warnings.warn(
                "fit_bank: the loader has drop_last=True, so the rows of its last incomplete batch are "
                "left out of the bank; use a loader without drop_last (and without shuffle)",
                UserWarning,
                stacklevel=3,
            )
        # the loader's sampler, or that of its batch sampler (a DistributedSampler shuffles by default too)
        samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
        drawn = [x for x in samplers if isinstance(x, _RANDOM_SAMPLERS) or getattr(x, "shuffle", False) is True]
        if drawn:
            what = (
                "draws rows with replacement, so the bank repeats some rows and misses others"
                if any(getattr(x, "replacement", False) is True for x in drawn)
                else "shuffles, so the bank holds the rows in a random order and explain()'s indices are not "
                "positions in the data set"
            )
            warnings.warn(
                f"fit_bank: the loader's sampler ({type(drawn[0]).__name__}) {what}; use a sampler in a fixed order "
                "over every row (shuffle=False on the DataLoader; under gather, a contiguous shard per rank)",
                UserWarning,
                stacklevel=3,
            )
        uneven = [
            x for x in samplers
            if isinstance(x, torch.utils.data.DistributedSampler) and x.total_size != len(x.dataset)  # type: ignore[arg-type]
        ]
        if uneven:
            rows, total = len(uneven[0].dataset), uneven[0].total_size  # type: ignore[arg-type]
            what = (
                f"pads the data set's {rows} rows to {total} with repeats of its first rows, so the union of the "
                "ranks' shards holds those rows twice and the predictions weigh them twice"
                if total > rows else
                f"drops the last {rows - total} of the data set's {rows} rows (drop_last=True), so the bank misses them"
            )
            warnings.warn(
                f"fit_bank: the loader's DistributedSampler {what}; give each rank a contiguous shard instead "
                "(torch.utils.data.Subset(dataset, range(start, stop)))",
                UserWarning,
                stacklevel=3,
            )
        z = y = failure = None
        try:
            z, y = self._encode(encoder, loader, device, progress, label_key)
        except Exception as error:
            if not resolve_group(getattr(self, "gather", False))[0]:
                raise
            failure = error  # raised on every rank by set_bank's agreement, where the others would wait
        self._store_bank(z, y, failure, device)

    def _encode(
        self, encoder: Callable[..., torch.Tensor] | None, loader: Iterable, device, progress: bool, label_key: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fit_bank``'s embeddings and labels of the loader's rows."""
        # any callable is an encoder; a module's method (model.encode) runs with the module in eval mode
        module = encoder if isinstance(encoder, nn.Module) else getattr(encoder, "__self__", None)
        module = module if isinstance(module, nn.Module) else None
        modes = {id(m): m.training for m in module.modules()} if module is not None else {}  # each, as frozen BatchNorms are
        if module is not None:
            module.eval()
        zs, ys = [], []
        try:
            total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
            for batch in _progress(loader, progress, "simwarp: encoding bank", total):
                if device is not None:
                    batch = _to_device(batch, device)
                if isinstance(batch, Mapping):
                    if label_key not in batch:
                        raise KeyError(f"fit_bank: a dict batch needs its labels under label_key={label_key!r}, got keys {list(batch)}")
                    y = batch[label_key]
                    inputs = {k: v for k, v in batch.items() if k != label_key}
                    z = encoder(**inputs) if encoder is not None else None
                    if z is None:
                        raise TypeError("fit_bank: dict batches need an encoder (called as encoder(**inputs))")
                elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
                    x, y = batch[0], batch[1]
                    z = encoder(x) if encoder is not None else x
                else:
                    raise TypeError(
                        f"fit_bank expects the loader to yield (x, y) batches or dicts with a {label_key!r} key, "
                        f"got {type(batch).__name__}"
                    )
                if not isinstance(z, torch.Tensor) and encoder is None:
                    raise TypeError(
                        f"fit_bank: without an encoder each batch's x is used as the embeddings z (B, in_features) "
                        f"and must be a tensor, got {type(z).__name__} (convert it, e.g. with torch.as_tensor, or pass an encoder)"
                    )
                if not isinstance(z, torch.Tensor):
                    raise TypeError(
                        f"fit_bank: the encoder must return the embeddings z (B, in_features) as a tensor, got "
                        f"{type(z).__name__} (wrap a model that returns an output object)"
                    )
                y = torch.as_tensor(y)
                if z.dim() != 2 or y.dim() == 0:
                    raise ValueError(
                        f"fit_bank: each batch must hold rows: z (B, in_features) and labels (B,) or (B, E), got z of "
                        f"shape {_shape(z)} and labels of shape {_shape(y)} (a DataLoader with batch_size=None "
                        "yields single samples: give it a batch size)"
                    )
                if ys and (z.shape[1:] != zs[0].shape[1:] or y.shape[1:] != ys[0].shape[1:]):
                    raise ValueError(
                        f"fit_bank: batch {len(ys) + 1} has z of shape {_shape(z)} and labels of shape {_shape(y)}, "
                        f"batch 1 z {_shape(zs[0])} and labels {_shape(ys[0])}: every batch needs the same row shape"
                    )
                zs.append(z.detach())
                ys.append(y.detach())
        finally:
            if module is not None:  # (submodules built while encoding, lazily: the module's own mode)
                for submodule in module.modules():
                    submodule.training = modes.get(id(submodule), modes[id(module)])
        if not zs:
            if not resolve_group(getattr(self, "gather", False))[0]:
                raise ValueError("fit_bank got an empty loader")
            # an empty shard of a gathered bank: still join set_bank's collectives
            zs, ys = [self.bank_z.new_zeros((0, self.in_features))], [self.bank_y[:0]]
        return torch.cat(zs), torch.cat(ys)

    def _check_bank_shapes(self) -> None:
        problem = self._bank_shape_problem(self.bank_z, self.bank_y)  # shapes only: no read-back under export
        if problem is not None:  # e.g. load_state_dict(..., strict=False) with only one of the two
            raise ValueError(f"{type(self).__name__}: {problem}; store a bank with set_bank(z, y) or fit_bank")

    def _require_bank(self, device: torch.device) -> None:
        self._check_bank_shapes()
        enabled, group = resolve_group(getattr(self, "gather", False))
        # a sharded bank may be empty on this rank: every rank asks about the union (a
        # collective, so that all of them raise together or none does)
        size = self._bank_union_size(group, device) if enabled else self.bank_size
        if size == 0:
            raise RuntimeError(
                f"{type(self).__name__} has no bank: call set_bank(z, y) or fit_bank(encoder, loader) "
                "before predicting in eval mode (or pass y in training mode)"
            )

    def _bank_union_size(self, group, device: torch.device) -> int:
        """Entries of the bank over all ranks (``gather``): a collective once per bank, then cached."""
        if self._bank_union is None or self._bank_union[0] != self.bank_size:
            self._bank_union = (self.bank_size, global_size(self.bank_size, group, device))
        return self._bank_union[1]

    def _bank_problem(self, z: torch.Tensor | None, y: torch.Tensor | None) -> str | None:
        """Why a stored bank ``z`` and/or ``y`` does not fit this head's configuration (None: it fits)."""
        return self._bank_shape_problem(z, y)

    def _bank_shape_problem(self, z: torch.Tensor | None, y: torch.Tensor | None) -> str | None:
        """:meth:`_bank_problem` for the shapes alone (reads no values)."""
        if z is not None and (z.dim() != 2 or z.shape[1] != self.in_features):
            return f"bank_z has shape {_shape(z)}, the head expects (M, in_features={self.in_features})"
        expected = tuple(self.bank_y.shape[1:])
        if y is not None and (y.dim() != 1 + len(expected) or tuple(y.shape[1:]) != expected):
            layout = f"(M, {', '.join(map(str, expected))})" if expected else "(M,)"
            return f"bank_y has shape {_shape(y)}, the head expects {layout}"
        if z is not None and y is not None and z.shape[0] != y.shape[0]:
            return f"bank_z {_shape(z)} and bank_y {_shape(y)} hold different numbers of entries"
        return None

    def _keep_buffers_wide(self, before: dict[str, torch.Tensor] | None = None) -> None:
        """Cast narrowed ``_WIDE_BUFFERS`` back to float32, from their values ``before`` the cast
        where known (a float16 copy has already lost what did not fit)."""
        for name in self._WIDE_BUFFERS:
            buf = getattr(self, name)
            if buf.dtype in (torch.float16, torch.bfloat16):
                source = buf if before is None else before[name]
                setattr(self, name, source.to(device=buf.device, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # .half(), .to(torch.bfloat16)
        before = {name: getattr(self, name) for name in self._WIDE_BUFFERS}
        super()._apply(fn, recurse)
        self._keep_buffers_wide(before)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._load_bank_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._keep_buffers_wide()  # load_state_dict(..., assign=True) takes the stored dtypes

    def _load_bank_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        stored = {key: state_dict.get(prefix + key) for key in self._BANK_KEYS}
        stored = {key: x if isinstance(x, torch.Tensor) else None for key, x in stored.items()}
        problem = self._bank_problem(stored["bank_z"], stored["bank_y"])
        if problem is not None:
            error_msgs.append(f"{type(self).__name__}: {problem} (was the state dict saved from another configuration?)")
            return
        self._bank_union = None
        for key, x in stored.items():  # the bank's size is data, not configuration: follow the stored bank
            if x is not None:  # (its dtype and device stay the head's, as for every other buffer)
                current = getattr(self, key)
                setattr(self, key, torch.empty(x.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class _WarpHeadBase(_BankMixin):
    """Shared machinery of the SoftStep neighbour heads (regression and classification)."""

    def __init__(
        self,
        in_features: int,
        *,
        metric: str,
        step: str,
        mode: str,
        temperature: float,
        scale: float | None,
        hidden: int | None,
        init: tuple[float, float, float] | None,
        detach_range: bool,
        impl: str,
        chunk_size: int | None,
        gather: Any = False,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        resolve_group(gather)  # validates; gather=True needs an initialised process group
        in_features = _int_arg("in_features", in_features)
        scale, temperature = check_backend_options(metric, impl, chunk_size, scale, temperature)
        get_step(step)
        self.in_features, self.metric, self.step_name = in_features, metric, step
        self.temperature, self.scale = temperature, scale
        self.detach_range = as_flag("detach_range", detach_range)
        self.impl, self.chunk_size = impl, chunk_size
        self.gather = gather
        if as_flag("learn_scale", learn_scale):
            if metric == "cosine":
                raise ValueError("learn_scale needs a metric whose similarity grows with the embeddings' scale "
                                 "(l2, sqeuclidean, dot, l1); cosine ignores it: scale it with temperature instead")
            #: log of the learned factor on the embeddings (queries and bank alike): the bandwidth
            self.log_scale = nn.Parameter(torch.zeros(()))
        else:
            self.register_parameter("log_scale", None)
        if mode not in _HEAD_MODES and not (step == "none" and mode == "none"):  # ("none": what such a head reports)
            raise ValueError(f"mode must be one of {_HEAD_MODES}, got {mode!r}")
        if step == "none":
            self.softstep: SoftStep | None = None
            self.mode = "none"
        else:
            self.mode = mode
            self.softstep = SoftStep(
                mode=mode, in_features=in_features if mode == "instance" else None, hidden=hidden, step=step, init=init
            )
        self._last_kept: torch.Tensor | None = None
        self._last_keys: int = 0

    # -- backend calls ----------------------------------------------------------------------

    def _config_fingerprint(self) -> int:
        """A number equal on ranks whose heads are configured alike: under ``gather`` their
        collectives (the labels' width above all) and results depend on it."""
        config = (
            type(self).__name__, self.in_features, self._outputs_repr(), self.metric, self.step_name, self.mode,
            self.temperature, self.scale, self.detach_range, self.log_scale is not None,
        )
        return zlib.crc32(repr(config).encode())

    def _checked(self, z: Any, check: Callable[[], Any], call: CallKind, arguments: tuple[int, ...] = ()) -> Any:
        """``check()``, a call's local input checks. With ``gather`` they are agreed over the
        ranks before the call's first collective, together with the step parameters of ``z``
        (NaN or inf there, under ``mode="instance"``, would raise in the backend after the
        gathers), the kind of ``call`` (train or predict), the head's configuration and the
        call's integer ``arguments``: an input that fails on one rank raises on every rank,
        none waits. Calls that read the bank also check its shapes and learn the union's size
        (no collective of their own for it then)."""
        enabled, group = resolve_group(self.gather)
        reads_bank = call != CallKind.HEAD_TRAIN

        def local_checks():
            out = check()
            if reads_bank:
                self._check_bank_shapes()
            return out

        if not enabled:
            return local_checks()

        def all_checks():
            out = local_checks()
            with torch.no_grad():
                self._check_step_params(z, self._step_kwargs(z))
            return out

        rows = z.shape[0] if isinstance(z, torch.Tensor) and z.dim() == 2 else 0
        out, shares = raise_together(
            all_checks, group, _device(z, self), same=(call, self._config_fingerprint(), *arguments), share=(self.bank_size, rows)
        )
        if reads_bank:
            self._bank_union = (self.bank_size, sum(bank for bank, _ in shares))
        else:  # before the target statistics see the batch: a failing call leaves them as they were
            check_global_batch([batch for _, batch in shares])
        return out

    @staticmethod
    def _check_step_params(z: torch.Tensor, step_kwargs: dict) -> None:
        """The step parameters of ``z``, checked as the backend will (NaN or inf embeddings
        make them NaN under ``mode="instance"``)."""
        resolve_params(step_kwargs.get("a"), step_kwargs.get("b"), step_kwargs.get("t"), batch=torch.Size(),
                       n=z.shape[0], dtype=work_dtype(z.dtype), device=z.device)

    def _step_kwargs(self, z: torch.Tensor) -> dict:
        if self.softstep is None:
            return {"step": "none"}
        return self.softstep.kwargs(z if self.mode == "instance" else None)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings as the similarity sees them: times the learned scale (``learn_scale``)."""
        return x if self.log_scale is None else x * self.log_scale.exp().to(x.dtype)

    def _attend(
        self, z: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, loo: bool, step_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, Any]:
        if step_kwargs is None:
            step_kwargs = self._step_kwargs(z)  # the instance network sees the embeddings as they come
        z, keys = self._scaled(z), self._scaled(keys)
        enabled, group = resolve_group(self.gather)
        if enabled:  # batch (training) or sharded bank across ranks: simwarp.distributed
            if loo:
                (out, stats), sizes = gather_and_attend(  # (the inputs were agreed on in _checked)
                    z, values, group, True, metric=self.metric, scale=self.scale, temperature=self.temperature,
                    detach_range=self.detach_range, impl=self.impl, chunk_size=self.chunk_size,
                    return_stats=True, **step_kwargs,
                )
                keys_seen = sum(sizes) - 1
            else:
                out, stats = sharded_warp_attend(
                    z, keys, values, group=group, queries="local", metric=self.metric, scale=self.scale,
                    temperature=self.temperature, chunk_size=self.chunk_size, return_stats=True,
                    **step_kwargs,
                )
                keys_seen = self._bank_union_size(group, z.device)
            self._record_kept(stats.kept, keys_seen)
            return out, stats
        out, stats = warp_attend(
            z, keys, values, metric=self.metric, scale=self.scale, temperature=self.temperature,
            exclude_self=loo, detach_range=self.detach_range, impl=self.impl, chunk_size=self.chunk_size,
            return_stats=True, **step_kwargs,
        )
        self._record_kept(stats.kept, keys.shape[0] - (1 if loo else 0))
        return out, stats

    def _record_kept(self, kept: torch.Tensor, keys: int) -> None:
        """Keep the kept counts for :attr:`sparsity`; not in an exported program, whose
        modules hold only registered state (monitoring has no meaning there)."""
        if not exporting():
            self._last_kept, self._last_keys = kept.detach(), keys

    def _check_training_batch(self, z: torch.Tensor) -> None:
        if resolve_group(self.gather)[0]:
            return  # the neighbours are every rank's rows: simwarp.distributed checks the global batch
        if z.shape[0] < 2:
            raise ValueError(
                f"training a neighbour head needs at least 2 rows per batch (each row is predicted from the "
                f"others), got z of shape {_shape(z)}; use drop_last=True in the DataLoader"
            )

    # -- monitoring and analysis ------------------------------------------------------------

    @property
    def sparsity(self) -> dict[str, float]:
        """Kept-neighbour statistics of the last forward pass: ``kept_fraction`` (mean share of
        valid neighbours with non-zero weight), its ``min``/``max`` over rows, ``kept_mean``
        (mean count) and ``neighbours`` (valid neighbours per row), over the rows with a count
        (a NaN query has none). Empty before the first call and after a call without rows,
        neighbours or counts."""
        if self._last_kept is None or self._last_keys == 0:
            return {}
        kept = self._last_kept.float()
        kept = kept[~kept.isnan()]
        if kept.numel() == 0:
            return {}
        frac = kept / self._last_keys
        return {
            "kept_fraction": float(frac.mean()),
            "kept_fraction_min": float(frac.min()),
            "kept_fraction_max": float(frac.max()),
            "kept_mean": float(kept.mean()),
            "neighbours": float(self._last_keys),
        }

    def step_params(self, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Current ``a, b, t`` (global: scalars; instance: one per row of ``z``), detached."""
        if self.softstep is None:
            return {}
        if self.mode == "instance":
            if z is None:
                raise ValueError("step_params needs z (N, in_features) in instance mode: each row has its own (a, b, t)")
            _check_z(z, self.in_features)
        a, b, t = self.softstep(z if self.mode == "instance" else None)
        return {"a": a.detach(), "b": b.detach(), "t": t.detach()}

    @without_functorch
    @torch.no_grad()
    def explain(self, z: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most influential bank entries per query.

        Weights come from :func:`simwarp.warp_weights` on blocks of queries (each block sees the
        whole bank, so weights are exact); memory is bounded by ``EXPLAIN_BUDGET`` scores.

        Args:
            z: queries ``(N, in_features)``.
            k: number of entries (clipped to the bank size).

        Returns:
            ``indices (N, k)`` into the bank (long) and their ``weights (N, k)``, largest first
            (with ``gather``: indices into the concatenation of all ranks' shards, rank order).
            Entries that the step dropped have weight exactly 0.
        """
        try:  # (the same on every rank, or their top-k merge would not match; _int_arg says what a bad k is)
            given_k = (min(operator.index(k), 1 << 62),)
        except TypeError:
            given_k = ()
        k = self._checked(z, lambda: (_check_z(z, self.in_features), _int_arg("k", k))[1], CallKind.HEAD_EXPLAIN, given_k)
        self._require_bank(z.device)
        enabled, group = resolve_group(self.gather)
        if enabled:  # per-shard top-k merged over ranks; indices into the rank-ordered bank
            return sharded_explain(
                self._scaled(z), self._scaled(self.bank_z.to(z.dtype)), k, group=group, queries="local",
                metric=self.metric, scale=self.scale, temperature=self.temperature, chunk_size=self.chunk_size,
                **self._step_kwargs(z),
            )
        k = min(k, self.bank_size)
        idx_out, w_out = [], []
        for w, _ in self._bank_weight_blocks(z):
            top = torch.topk(w, k, dim=-1)
            idx_out.append(top.indices)
            w_out.append(top.values)
        if not idx_out:
            empty = z.new_zeros((0, k), dtype=work_dtype(z.dtype))
            return empty.long(), empty
        return torch.cat(idx_out), torch.cat(w_out)

    def _bank_weight_blocks(self, z: torch.Tensor):
        """The weights ``(rows, M)`` of the bank for blocks of queries ``z`` (and their
        :class:`~simwarp.WarpStats`), from :func:`simwarp.warp_weights`; each block holds about
        ``EXPLAIN_BUDGET`` scores and sees the whole bank, so the weights are exact."""
        bank = self.bank_z.to(z.dtype)
        for rows in row_slices(z.shape[0], max(1, EXPLAIN_BUDGET // self.bank_size)):
            zq = z[rows]
            yield warp_weights(
                self._scaled(zq), self._scaled(bank), metric=self.metric, scale=self.scale,
                temperature=self.temperature, detach_range=self.detach_range, return_stats=True,
                **self._step_kwargs(zq),
            )

    def reset_parameters(self) -> None:
        """The learned parameters back to their start: the step at ``init``, ``log_scale`` at 0
        (also what ``to_empty`` after building on the meta device needs). The bank is data, set
        by :meth:`set_bank`, and stays."""
        if self.softstep is not None:
            self.softstep.reset_parameters()
        if self.log_scale is not None:
            nn.init.zeros_(self.log_scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, {self._outputs_repr()}, metric={self.metric!r}, step={self.step_name!r}, "
            f"mode={self.mode!r}, temperature={self.temperature}, learn_scale={self.log_scale is not None}, "
            f"bank={self.bank_size}"
        )

    def _outputs_repr(self) -> str:
        raise NotImplementedError


class NeighborRegressionHead(_WarpHeadBase):
    """SoftStep neighbour regression: predict the SoftStep-weighted mean of neighbours' labels.

    Args:
        in_features: embedding size ``D`` of ``z``.
        out_features: number of targets ``E``.
        metric: similarity (``"l2"``, ``"cosine"``, ``"dot"``, ``"sqeuclidean"``, ``"l1"``).
        step: registered step (``"sigmoidal"``, ``"log"``, ``"poly"``, or ``"none"`` = plain
            neighbour attention without warping, the NONA baseline).
        mode: ``"global"`` (3 learned scalars) or ``"instance"`` (a linear map of each query to
            its own ``(a, b, t)``). Unused with ``step="none"`` (the head then reports ``"none"``).
        temperature: softmax temperature.
        standardize_targets: feed the backend ``(y - mean) / std`` and map back. The mean/std
            are exact running statistics of all training targets seen (``target_mean``,
            ``target_std`` buffers, reset to the bank's statistics by :meth:`set_bank`; a
            forward that activation checkpointing recomputes in backward counts nothing again). The
            prediction is a convex combination of labels, so this does not change it
            mathematically; it keeps the values the backend averages ``O(1)`` (low-precision
            compute, and ``E[y²] − E[y]²`` in :meth:`predict_with_uncertainty`). No clipping.
        scale, hidden, init, detach_range, impl, chunk_size: passed to
            :class:`simwarp.SoftStep` / :func:`simwarp.warp_attend`.
        gather: ``False`` (default), ``True`` (default process group) or a
            ``torch.distributed.ProcessGroup``: training attends over all ranks' batches
            (leave-one-out by global index, exact gradients), and the bank is *sharded*: each
            rank's ``set_bank`` holds its shard and eval predictions/:meth:`explain` cover the
            union (exactly the single-process result, no gradients: the sharded prediction
            streams the bank in ``chunk_size`` blocks, so ``impl`` and ``detach_range`` apply to
            training only). Forward, ``set_bank`` and ``explain`` then are collectives (see
            :mod:`simwarp.distributed`, docs/distributed.md).
        learn_scale: learn one factor ``e^s`` (``log_scale``, 0 at first) on the embeddings
            before the similarity: for ``l2`` the softmax bandwidth (``dot``, ``sqeuclidean``: its
            square). Use it on fixed features (no encoder), where nothing else sets the
            bandwidth; not for ``cosine``.

    Shapes:
        ``forward(z (N, D), y (N, E) or (N,) if E == 1) -> (N, E)`` (or ``(N,)`` when ``y`` was 1-D);
        float32 for float16/bfloat16 ``z`` (targets overflow half precision).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        metric: str = "l2",
        step: str = "sigmoidal",
        mode: str = "instance",
        temperature: float = 1.0,
        standardize_targets: bool = True,
        *,
        scale: float | None = None,
        hidden: int | None = None,
        init: tuple[float, float, float] | None = None,
        detach_range: bool = False,
        impl: str = "auto",
        chunk_size: int | None = None,
        gather: Any = False,
        learn_scale: bool = False,
    ) -> None:
        super().__init__(
            in_features, metric=metric, step=step, mode=mode, temperature=temperature, scale=scale,
            hidden=hidden, init=init, detach_range=detach_range, impl=impl, chunk_size=chunk_size,
            gather=gather, learn_scale=learn_scale,
        )
        self.out_features = out_features = _int_arg("out_features", out_features)
        self.standardize_targets = as_flag("standardize_targets", standardize_targets)
        self._init_bank((out_features,), torch.get_default_dtype())
        self.register_buffer("target_mean", torch.zeros(out_features))
        self.register_buffer("target_std", torch.ones(out_features))
        self.register_buffer("targets_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("_target_m2", torch.zeros(out_features))

    _WIDE_BUFFERS = ("bank_y", "target_mean", "target_std", "_target_m2")

    def reset_parameters(self) -> None:
        """As :meth:`_WarpHeadBase.reset_parameters`, and the running target statistics start
        again (as ``BatchNorm``'s do; they never change a prediction, see ``standardize_targets``)."""
        super().reset_parameters()
        self.target_mean.zero_()
        self.target_std.fill_(1.0)
        self.targets_seen.zero_()
        self._target_m2.zero_()

    def _outputs_repr(self) -> str:
        return f"out_features={self.out_features}, standardize_targets={self.standardize_targets}"

    # -- labels and standardisation ---------------------------------------------------------

    def _check_label_shape(self, y: Any, n: int, name: str = "y") -> bool:
        """Check that ``y`` has shape ``(n, out_features)`` (or ``(n,)`` for one target);
        returns whether it is 1-D."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.is_complex():
            raise TypeError(f"{name} must hold real targets, got dtype {y.dtype}")
        one_d = y.dim() == 1 and self.out_features == 1
        if (y.dim() != 2 and not one_d) or y.shape[0] != n:
            raise ValueError(
                f"{name} must have shape (N={n}, out_features={self.out_features})"
                + (" or (N,)" if self.out_features == 1 else "") + f", got {_shape(y)}"
            )
        if not one_d and y.shape[1] != self.out_features:
            raise ValueError(f"{name} has {y.shape[1]} targets but the head has out_features={self.out_features} (shape {_shape(y)})")
        return one_d

    def _check_labels(self, y: Any, z: torch.Tensor, name: str = "y") -> torch.Tensor:
        if self._check_label_shape(y, z.shape[0], name):
            y = y.unsqueeze(-1)
        if not y.is_floating_point():  # integer targets: as exact as z's dtype (the default dtype at least)
            default = torch.get_default_dtype()
            y = y.to(torch.promote_types(z.dtype, default) if z.is_floating_point() else default)
        require(torch.isfinite(y), f"{name} contains NaN or inf labels; drop or impute them first")
        return y

    @torch.no_grad()
    def _update_running_stats(self, y: torch.Tensor) -> None:
        """Chan et al.'s parallel update of the exact mean and variance of all targets seen.

        Computed in float64 (float32 on MPS, which has none) and stored in the buffers' dtype:
        in float32, squared deviations overflow once the targets reach about 1e19. The sum of
        squared deviations ``_target_m2`` (``n`` times the variance) then saturates at inf in
        its buffer, and the next update takes it back from ``target_std`` (to that buffer's
        rounding); so the statistics stay right wherever the mean and std are representable.
        """
        exact = exact_dtype(y.device)
        y = y.to(exact)
        enabled, group = resolve_group(getattr(self, "gather", False))
        if enabled:  # moments of all ranks' rows (global batch / sharded bank)
            nb, mb, m2b = global_moments(y, group)
            mb, m2b = mb.to(exact), m2b.to(exact)
        else:
            nb = y.shape[0]
            mb = y.mean(0)
            m2b = ((y - mb) ** 2).sum(0)
        # counts as tensors: no host read-back (torch.compile traces this without a graph break)
        na = self.targets_seen.to(exact)
        mean, m2 = self.target_mean.to(exact), self._target_m2.to(exact)
        m2 = torch.where(torch.isfinite(m2), m2, na * self.target_std.to(exact) ** 2)
        n, mean, m2 = merge_moments(na, mean, m2, nb, mb, m2b)
        self.target_mean.copy_(mean)
        self._target_m2.copy_(m2)
        self.targets_seen.add_(nb)  # in place (a rebinding is a side effect torch.compile cannot checkpoint)
        std = (m2 / n.clamp_min(1)).sqrt()
        # a constant target keeps std 1 (no division by ~0): a spread below 1e-12 of the mean is
        # rounding (the mean of equal float values need not be exact); small targets keep theirs
        floor = (mean.abs() * 1e-12).clamp_min_(torch.finfo(torch.float32).tiny)
        self.target_std.copy_(torch.where(std > floor, std, torch.ones_like(std)))

    def _on_bank_set(self) -> None:
        with torch.no_grad():
            y = self.bank_y.to(self.target_mean.device)
            self.targets_seen.zero_()
            self.target_mean.zero_()
            self._target_m2.zero_()
            self._update_running_stats(y)

    def _target_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Copies: autograd keeps them for the backward, and the next training forward updates
        # the buffers in place (two forwards before one backward must work).
        return self.target_mean.to(like, copy=True), self.target_std.to(like, copy=True)

    def _standardize(self, y: torch.Tensor) -> torch.Tensor:
        if not self.standardize_targets:
            return y
        mean, std = self._target_stats(y)
        return (y - mean) / std

    def _unstandardize(self, y: torch.Tensor) -> torch.Tensor:
        if not self.standardize_targets:
            return y
        mean, std = self._target_stats(y)
        return y * std + mean

    # -- forward ----------------------------------------------------------------------------

    def _raw_forward(self, z: torch.Tensor, y: torch.Tensor | None, values_fn) -> tuple[torch.Tensor, bool]:
        """Returns the backend output for ``values_fn(standardised labels)`` and the 1-D flag."""
        training = self.training and y is not None

        def check() -> tuple[bool, torch.Tensor | None]:
            _check_z(z, self.in_features)
            if training:
                self._check_training_batch(z)
                return (y.dim() == 1 if isinstance(y, torch.Tensor) else False), self._check_labels(y, z)
            return (self._check_label_shape(y, z.shape[0]) if isinstance(y, torch.Tensor) else False), None

        squeeze, y2 = self._checked(z, check, CallKind.HEAD_TRAIN if training else CallKind.HEAD_PREDICT)
        if training:
            step_kwargs = self._step_kwargs(z)
            if not resolve_group(self.gather)[0]:  # (under gather _checked has agreed on them)
                self._check_step_params(z, step_kwargs)  # before the target statistics see the batch
            if not recomputing_in_backward():  # activation checkpointing: the batch was counted
                self._update_running_stats(y2)
            # float16 in float32: the gradient that reaches the backend's output is the loss's times
            # the targets' std, which overflows float16 (targets in the thousands)
            zw = z.float() if z.dtype == torch.float16 else z
            ys = self._standardize(y2.to(work_dtype(z.dtype))).to(zw.dtype)
            out, _ = self._attend(zw, zw, values_fn(ys), loo=True, step_kwargs=step_kwargs)
        else:
            self._require_bank(z.device)
            ys = self._standardize(self.bank_y.to(work_dtype(z.dtype))).to(z.dtype)
            out, _ = self._attend(z, self.bank_z.to(z.dtype), values_fn(ys), loo=False)
        return out, squeeze

    @without_functorch
    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict targets ``(N, out_features)``.

        Training mode with ``y``: leave-one-out over the batch (needs ``N >= 2``; with ``gather``,
        over every rank's rows, and a rank may hold fewer). Otherwise:
        from the bank (``y`` is then only checked for its shape, and a 1-D ``y`` gives ``(N,)``).
        """
        out, squeeze = self._raw_forward(z, y, lambda ys: ys)
        # the targets are standardised and mapped back in float32 at least, so that targets
        # beyond float16's range (prices, counts) survive a float16 encoder
        out = self._unstandardize(out.to(work_dtype(z.dtype)))
        return out.squeeze(-1) if squeeze else out

    @without_functorch
    def predict_with_uncertainty(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank prediction and the weighted variance of the neighbours' labels.

        Returns:
            ``mean (N, E)`` and ``var (N, E)`` in the targets' units:
            ``var = Σ_j w_ij (y_j − mean_i)²`` with the head's SoftStep weights.
        """
        e = self.out_features
        # centred on the targets' mean (the bank's, on every rank alike when it is sharded), so
        # that E[y²] − E[y]² does not cancel when |mean| >> std; 0 once standardised
        def centre(like: torch.Tensor) -> torch.Tensor:  # read z only once it is checked
            return self._standardize(self.target_mean.to(like.device, work_dtype(like.dtype)))

        def moments(ys: torch.Tensor) -> torch.Tensor:
            d = ys - centre(ys).to(ys.dtype)
            return torch.cat([d, d * d], dim=-1)

        out, _ = self._raw_forward(z, None, moments)
        wide, centre = work_dtype(z.dtype), centre(z)
        m1, m2 = out[..., :e].to(wide), out[..., e:].to(wide)
        var = (m2 - m1 * m1).clamp_min(0.0)
        if self.standardize_targets:
            var = var * self.target_std.to(z.device, wide) ** 2
        return self._unstandardize(m1 + centre), var


class NeighborClassificationHead(_WarpHeadBase):
    """SoftStep neighbour classification: log of the SoftStep-weighted class mass of neighbours.

    ``log p_c = log((1 − ε) · Σ_j w_j [y_j = c] + ε / C)`` with ``ε = smoothing``: the mass of
    the neighbours' one-hot labels, mixed with a tiny uniform share so that a class no kept
    neighbour carries gets a finite log-probability (no ``log 0 = −inf`` and NaN gradients).
    Rows are normalised (``exp`` sums to 1). Train with ``F.nll_loss(head(z, y), y)``.

    Args:
        in_features: embedding size ``D``.
        num_classes: ``C``; labels are ints in ``[0, C)``.
        smoothing: ``ε`` above (``0 < ε < 1``).
        metric, step, mode, temperature, scale, hidden, init, detach_range, impl, chunk_size, gather, learn_scale:
            as in :class:`NeighborRegressionHead`; except that a prediction from a bank of more
            than :data:`ONE_HOT_CLASSES` classes on one process weighs the bank in blocks of
            dense weights (``EXPLAIN_BUDGET`` scores each, :func:`simwarp.warp_weights`), whatever
            ``impl`` and ``chunk_size`` say.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        metric: str = "l2",
        step: str = "sigmoidal",
        mode: str = "instance",
        temperature: float = 1.0,
        smoothing: float = 1e-4,
        *,
        scale: float | None = None,
        hidden: int | None = None,
        init: tuple[float, float, float] | None = None,
        detach_range: bool = False,
        impl: str = "auto",
        chunk_size: int | None = None,
        gather: Any = False,
        learn_scale: bool = False,
    ) -> None:
        super().__init__(
            in_features, metric=metric, step=step, mode=mode, temperature=temperature, scale=scale,
            hidden=hidden, init=init, detach_range=detach_range, impl=impl, chunk_size=chunk_size,
            gather=gather, learn_scale=learn_scale,
        )
        num_classes = _int_arg("num_classes", num_classes, minimum=2)
        smoothing = as_real("smoothing", smoothing, "a float in (0, 1)")
        if not 0.0 < smoothing < 1.0:
            raise ValueError(f"smoothing must lie in (0, 1), got {smoothing!r}")
        self.num_classes, self.smoothing = num_classes, smoothing
        self._init_bank((), torch.long)

    def _outputs_repr(self) -> str:
        return f"num_classes={self.num_classes}, smoothing={self.smoothing}"

    def _check_labels(self, y: Any, z: torch.Tensor, name: str = "y") -> torch.Tensor:
        return _class_labels(y, z.shape[0], self.num_classes, name)

    def _bank_problem(self, z: torch.Tensor | None, y: torch.Tensor | None) -> str | None:
        problem = super()._bank_problem(z, y)
        if problem is None and y is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            problem = f"bank_y holds labels in [{int(y.min())}, {int(y.max())}], outside [0, num_classes={self.num_classes})"
        return problem

    def _log_probs(self, mass: torch.Tensor) -> torch.Tensor:
        eps = self.smoothing
        return torch.log(mass.clamp_min(0.0) * (1.0 - eps) + eps / self.num_classes)

    def _one_hot(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(M, C)`` one-hot rows in ``dtype`` (no int64 ``M × C`` intermediate)."""
        out = torch.zeros((labels.shape[0], self.num_classes), dtype=dtype, device=labels.device)
        return out.scatter_(1, labels.unsqueeze(1), 1.0)

    @without_functorch
    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities ``(N, num_classes)``: leave-one-out over the batch in training mode
        with ``y`` (needs ``N >= 2``; with ``gather``, over every rank's rows), else from the bank.

        In ``z``'s dtype or float32, whichever is wider: in float16, ``ε / C`` underflows above
        ~3400 classes and the gradient of a class's log-probability, up to ``C / ε``, overflows."""
        training = self.training and y is not None

        def check() -> torch.Tensor | None:
            _check_z(z, self.in_features)
            if training:
                self._check_training_batch(z)
                return self._check_labels(y, z)
            _check_class_label_shape(y, z.shape[0])
            return None

        labels = self._checked(z, check, CallKind.HEAD_TRAIN if training else CallKind.HEAD_PREDICT)
        zw = z.to(work_dtype(z.dtype))
        if training:
            mass, _ = self._attend(zw, zw, self._one_hot(labels, zw.dtype), loo=True)
        else:
            self._require_bank(z.device)
            mass = self._bank_mass(zw)
        return self._log_probs(mass)

    def _bank_mass(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` class masses of queries ``z`` over the bank."""
        if self.num_classes <= ONE_HOT_CLASSES or resolve_group(self.gather)[0]:
            return self._attend(z, self.bank_z.to(z.dtype), self._one_hot(self.bank_y, z.dtype), loo=False)[0]
        masses, kept = [z.new_zeros((0, self.num_classes))], [z.new_zeros((0,))]
        for w, stats in self._bank_weight_blocks(z):
            classes = self.bank_y.expand(w.shape[0], -1)
            masses.append(w.new_zeros((w.shape[0], self.num_classes)).scatter_add(1, classes, w))
            kept.append(stats.kept.to(z.dtype))
        self._record_kept(torch.cat(kept), self.bank_size)
        return torch.cat(masses)

    @without_functorch
    @torch.no_grad()
    def predict_proba(self, z: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, num_classes)`` from the bank (``forward(z)`` without labels
        reads the bank in either mode)."""
        return self(z).exp()


class KNNRegressionHead(_BankMixin):
    """Hard top-``k`` neighbour average (baseline): ``ŷ_i = mean of the labels of the k most
    similar rows`` (leave-one-out over the batch in training, the bank at inference).

    Neighbours are ranked by the metric's similarity, streamed in blocks of ``KNN_ROWS``
    queries × key blocks (one GEMM each, the key norms prepared once per call) with a running
    top-k, so memory stays bounded (``EXPLAIN_BUDGET`` scores) however large the bank. The
    average has no gradient with respect to ``z`` (top-k is piecewise constant): use it on
    embeddings learned with another head.

    Args:
        in_features: embedding size ``D``.
        out_features: number of targets ``E``.
        k: number of neighbours averaged (fewer where the bank or batch has fewer rows).
        metric: the similarity that ranks them (``"l2"``, ``"cosine"``, ``"dot"``,
            ``"sqeuclidean"``, ``"l1"``).
    """

    def __init__(self, in_features: int, out_features: int = 1, k: int = 10, metric: str = "l2") -> None:
        super().__init__()
        in_features, out_features, k = (
            _int_arg("in_features", in_features), _int_arg("out_features", out_features), _int_arg("k", k)
        )
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.in_features, self.out_features, self.k, self.metric = in_features, out_features, k, metric
        self._init_bank((out_features,), torch.get_default_dtype())

    _WIDE_BUFFERS = ("bank_y",)
    _check_label_shape = NeighborRegressionHead._check_label_shape
    _check_labels = NeighborRegressionHead._check_labels

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, metric={self.metric!r}, bank={self.bank_size}"

    def _topk_mean(self, z: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, loo: bool) -> torch.Tensor:
        m = keys.shape[0] - (1 if loo else 0)
        if m < 1:
            hint = "; a training batch needs N >= 2 rows (use drop_last=True)" if loo else ""
            raise ValueError(f"the kNN head needs at least one neighbour per row, got {keys.shape[0]} keys (loo={loo}){hint}")
        k = min(self.k, m)
        top = streaming_topk(z, keys, self.metric, k, exclude_self=loo)
        if not z.shape[0]:
            return values.new_zeros((0, values.shape[-1]))
        out = values[top].mean(dim=1)
        return out.masked_fill(_non_finite_rows(z), math.nan)  # no neighbours: NaN, as the SoftStep heads give

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, out_features)`` (``(N,)`` when ``y`` is 1-D)."""
        _check_z(z, self.in_features)
        squeeze = isinstance(y, torch.Tensor) and y.dim() == 1
        if self.training and y is not None:
            if z.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                warnings.warn(
                    "KNNRegressionHead's prediction has no gradient with respect to z (a top-k average is "
                    "piecewise constant), so a loss on it cannot train the encoder: train with another head "
                    "(a SoftStep, 'nona' or linear head) and use this one on the embeddings it learns",
                    stacklevel=4,
                )
            y2 = self._check_labels(y, z)
            out = self._topk_mean(z.detach(), z.detach(), y2.to(work_dtype(z.dtype)), loo=True)
        else:
            self._require_bank(z.device)
            if isinstance(y, torch.Tensor):
                self._check_label_shape(y, z.shape[0])
            out = self._topk_mean(z.detach(), self.bank_z, self.bank_y.to(work_dtype(z.dtype)), loo=False)
        return out.squeeze(-1) if squeeze else out

    @torch.no_grad()
    def explain(self, z: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank entries behind each prediction, as the SoftStep heads' ``explain``:
        ``indices (N, k)`` of the ``k`` most similar entries, nearest first, and their
        ``weights (N, k)``: ``1 / min(self.k, bank_size)`` for the neighbours the prediction
        averages (the very entries it picks, also among ties), 0 beyond them (NaN for a query
        with NaN or inf)."""
        _check_z(z, self.in_features)
        k = _int_arg("k", k)
        self._require_bank(z.device)
        k, used = min(k, self.bank_size), min(self.k, self.bank_size)
        indices = streaming_topk(z, self.bank_z, self.metric, used)  # forward's call
        if k < used:
            indices = indices[:, :k]
        elif k > used:  # the next nearest after them: a wider search, less the entries already named
            wider = streaming_topk(z, self.bank_z, self.metric, k)
            named = (wider.unsqueeze(-1) == indices.unsqueeze(-2)).any(-1)
            rest = wider.gather(-1, torch.sort(named.to(torch.uint8), dim=-1, stable=True).indices)[:, : k - used]
            indices = torch.cat([indices, rest], -1)
        weights = torch.where(torch.arange(k, device=z.device) < used, 1.0 / used, 0.0).to(work_dtype(z.dtype)).expand(z.shape[0], k)
        return indices, weights.masked_fill(_non_finite_rows(z), math.nan)


def _non_finite_rows(z: torch.Tensor) -> torch.Tensor:
    """``(N, 1)``: the queries with a NaN or inf feature (all their scores are NaN: no neighbour)."""
    return ~torch.isfinite(z).all(-1, keepdim=True)


class _NoBank:
    """The neighbour heads' bank methods as no-ops, so that the linear baselines swap with them."""

    @property
    def bank_size(self) -> int:
        """0: a linear head holds no bank."""
        return 0

    @property
    def has_bank(self) -> bool:
        return False

    def set_bank(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """No-op: a linear head needs no bank (kept so heads are interchangeable)."""

    def fit_bank(self, encoder, loader, device=None, progress: bool = True, label_key: str = "labels") -> None:
        """No-op: a linear head needs no bank."""

    def clear_bank(self) -> None:
        """No-op."""


class LinearHead(_NoBank, nn.Linear):
    """``nn.Linear(in_features, out_features)`` with the neighbour regression heads' signature
    ``forward(z (..., in_features), y=None)``, so heads are swapped with one argument
    (:class:`LinearClassificationHead` is the classification head's baseline): ``y`` is
    only checked against ``z`` and the output (a 1-D ``y`` gives a 1-D output when
    ``out_features == 1``), never used."""

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[-1] != self.in_features:
            raise ValueError(f"z must have shape (..., in_features={self.in_features}), got {_shape(z)}")
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype}")
        if isinstance(y, torch.Tensor) and y.dim() >= 1 and z.dim() >= 2 and y.shape[0] != z.shape[0]:
            raise ValueError(f"y must have {z.shape[0]} rows like z (shape {_shape(z)}), got shape {_shape(y)}")
        if isinstance(y, torch.Tensor) and y.dim() == z.dim() and y.shape[-1] != self.out_features:
            raise ValueError(f"y has {y.shape[-1]} targets but the head has out_features={self.out_features} (shape {_shape(y)})")
        if isinstance(y, torch.Tensor) and y.dim() == z.dim() - 1 and self.out_features != 1:
            raise ValueError(f"y of shape {_shape(y)} holds one target per row; the head has out_features={self.out_features}")
        out = super().forward(z)
        if isinstance(y, torch.Tensor) and y.dim() == out.dim() - 1 and self.out_features == 1:
            out = out.squeeze(-1)
        return out


class LinearClassificationHead(_NoBank, nn.Linear):
    """Log-probabilities of a linear layer, ``log_softmax(z Wᵀ + b)`` ``(N, num_classes)``, with
    :class:`NeighborClassificationHead`'s signature: ``forward(z (N, in_features), y=None)``,
    ``predict_proba`` and no-op bank methods. It is the linear baseline that head swaps with:
    both train with ``F.nll_loss(head(z, y), y)``. ``y`` (class indices ``(N,)``) is only checked
    (fully in training mode, its shape otherwise), never used. ``z`` must have the layer's
    dtype (as for ``nn.Linear``); the log-probabilities are computed in float32 at least (a
    float16 layer gives float32, as the neighbour head does).

    Args:
        in_features: embedding size ``D``.
        num_classes: ``C``; labels are ints in ``[0, C)``.
        bias, device, dtype: as :class:`torch.nn.Linear`'s.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, device=None, dtype=None) -> None:
        num_classes = _int_arg("num_classes", num_classes, minimum=2)
        super().__init__(_int_arg("in_features", in_features), num_classes, bias=bias, device=device, dtype=dtype)
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}"

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        _check_z(z, self.in_features)
        if self.training and y is not None:
            _class_labels(y, z.shape[0], self.num_classes)
        else:
            _check_class_label_shape(y, z.shape[0])
        logits = super().forward(z)
        return torch.log_softmax(logits.to(work_dtype(logits.dtype)), dim=-1)

    @torch.no_grad()
    def predict_proba(self, z: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, num_classes)``."""
        return self(z).exp()


HEAD_KINDS = ("linear", "nona", "softstep-global", "softstep-instance", "knn")


def make_head(kind: str, in_features: int, out_features: int = 1, **kwargs: Any) -> nn.Module:
    """Build a regression head by name: ``"linear"``, ``"nona"`` (``step="none"``),
    ``"softstep-global"``, ``"softstep-instance"`` or ``"knn"``; ``kwargs`` go to the class
    (except the arguments that ``kind`` fixes: ``step`` for ``"nona"``, ``mode`` for the
    ``softstep-*`` kinds)."""
    if not isinstance(kind, str) or kind not in HEAD_KINDS:
        raise ValueError(f"kind must be one of {HEAD_KINDS}, got {kind!r}")
    fixed = {"nona": "step", "softstep-global": "mode", "softstep-instance": "mode"}.get(kind)
    if fixed in kwargs:
        raise ValueError(f"kind={kind!r} fixes {fixed}; pass {fixed}= to NeighborRegressionHead instead, got {fixed}={kwargs[fixed]!r}")
    if kind == "nona" and "mode" in kwargs:
        raise ValueError(f"kind='nona' has no step, so no mode: got mode={kwargs['mode']!r}")
    if kind.startswith("softstep-") and kwargs.get("step") == "none":
        raise ValueError(f"kind={kind!r} is a SoftStep head: step='none' (no step) is kind='nona'")
    if kind == "linear":
        return LinearHead(in_features, out_features, **kwargs)
    if kind == "nona":
        return NeighborRegressionHead(in_features, out_features, step="none", **kwargs)
    if kind == "softstep-global":
        return NeighborRegressionHead(in_features, out_features, mode="global", **kwargs)
    if kind == "softstep-instance":
        return NeighborRegressionHead(in_features, out_features, mode="instance", **kwargs)
    return KNNRegressionHead(in_features, out_features, **kwargs)  # kind == "knn"
