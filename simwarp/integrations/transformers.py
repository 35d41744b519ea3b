"""SoftStep attention inside Hugging Face transformers models.

::

    import torch
    from transformers import AutoModel
    from simwarp.datasets import minilm_path
    from simwarp.integrations.transformers import register, attach_softstep

    path = minilm_path()                         # the packaged MiniLM, offline (or your own model)
    register()                                   # adds "softstep" to transformers' AttentionInterface
    model = AutoModel.from_pretrained(path, attn_implementation="softstep")
    attach_softstep(model, mode="per_head")      # learned (a, b, t) per layer and head, before the optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

How the step parameters are stored: :func:`attach_softstep` adds a
:class:`simwarp.SoftStepAttention` submodule named ``softstep`` to every attention module of
the model (the modules that dispatch through ``ALL_ATTENTION_FUNCTIONS``, e.g.
``BertSelfAttention``), so its parameters live in ``model.state_dict()`` under
``<attention module>.softstep.step.*`` (``encoder.layer.0.attention.self.softstep.step.raw``
for BERT), are returned by ``model.parameters()`` and trained with the model. The attach
options are written to ``model.config.softstep`` so that ``save_pretrained`` stores them in
``config.json`` and the parameters in the checkpoint; :func:`from_pretrained` restores both
(plain ``AutoModel.from_pretrained`` would drop the ``softstep`` keys as unexpected).

A model used with ``attn_implementation="softstep"`` before :func:`attach_softstep` creates the
per-head parameters lazily on its first forward (with a warning: build the optimizer after
that, or call :func:`attach_softstep` first), and records the options in its config as
:func:`attach_softstep` does.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simwarp._autograd import as_flag
from simwarp.attention import SoftStepAttention
from simwarp.steps import check_init

__all__ = [
    "ATTN_NAME",
    "attach_softstep",
    "attention_modules",
    "from_pretrained",
    "load_softstep_state",
    "register",
    "softstep_attention_forward",
]

ATTN_NAME = "softstep"
_CONFIG_KEY = "softstep"
_DEFAULT_ATTACH = {"mode": "per_head", "step": "sigmoidal", "init": None, "hidden": None}


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "simwarp.integrations.transformers needs the `transformers` package: pip install 'simwarp[hf]'"
        ) from err
    return transformers


# ---------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------


def _heads_and_dim(module: nn.Module) -> tuple[int, int]:
    config = getattr(module, "config", None)
    heads = None
    for attr in ("num_attention_heads", "num_heads", "n_heads"):
        if isinstance(getattr(module, attr, None), int):
            heads = getattr(module, attr)
            break
    if heads is None and config is not None:
        heads = getattr(config, "num_attention_heads", None)
    head_dim = None
    for attr in ("qk_head_dim", "attention_head_size", "head_dim"):  # qk_head_dim: MLA (DeepSeek), whose head_dim is its rope part
        if isinstance(getattr(module, attr, None), int):
            head_dim = getattr(module, attr)
            break
    if head_dim is None and config is not None:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // heads if heads and getattr(config, "hidden_size", None) else None
        )
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ValueError(
            f"cannot find the number of heads / head size of {type(module).__name__}: expected attributes "
            f"num_attention_heads|num_heads and attention_head_size|head_dim (or a config with them)"
        )
    return heads, head_dim


def _new_softstep(module: nn.Module, opts: dict) -> SoftStepAttention:
    heads, head_dim = _heads_and_dim(module)
    init = opts.get("init")
    layer = SoftStepAttention(
        heads, head_dim, mode=opts.get("mode", "per_head"), step=opts.get("step", "sigmoidal"),
        init=None if init is None else tuple(init), hidden=opts.get("hidden"),
    )
    ref = next((p for p in module.parameters() if p.is_floating_point()), None)
    if ref is not None:  # follow the model's device (the step parameters stay float32 unless it is float64)
        layer.to(device=ref.device, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
    layer.attach_options = dict(opts)  # what attach_softstep compares a later call with
    return layer


def _is_peft_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is PEFT's ``modules_to_save`` wrapper (it holds the original module and
    a trained copy per adapter, and calls the active one)."""
    return isinstance(module._modules.get("original_module"), nn.Module)


def _runs_softstep(layer: nn.Module) -> bool:
    """A :class:`SoftStepAttention`, or PEFT's wrapper around one."""
    return isinstance(layer, SoftStepAttention) or (
        _is_peft_wrapper(layer) and isinstance(layer.original_module, SoftStepAttention)
    )


def _attached_layer(module: nn.Module, foreign_ok: bool = False) -> nn.Module | None:
    """What runs ``module``'s SoftStep attention: its ``softstep`` submodule, a
    :class:`SoftStepAttention` or a PEFT wrapper around one; ``None`` when there is none yet.
    Anything else there is a ``TypeError`` (returned as it is with ``foreign_ok``)."""
    layer = module._modules.get("softstep")
    if layer is None or _runs_softstep(layer) or foreign_ok:
        return layer
    raise TypeError(
        f"{type(module).__name__}.softstep is a {type(layer).__name__}, not a simwarp SoftStepAttention "
        "(or PEFT's modules_to_save wrapper around one)"
    )


def softstep_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"softstep"`` entry of transformers' ``AttentionInterface``.

    Mirrors ``transformers.integrations.sdpa_attention.sdpa_attention_forward``: ``query``
    ``(B, H, L, D)``, ``key``/``value`` ``(B, H_kv, S, D)``, ``attention_mask`` bool
    ``(B, 1, L, S)`` (True = attend; the mask interface registered with it is transformers'
    ``sdpa_mask``) or an additive float mask, or ``None``. Returns ``(attn_output (B, L, H, D),
    attn_weights)``; the weights are returned (``(B, H, L, S)``) only with
    ``output_attentions=True``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("softstep attention does not support `softcap`")
    if kwargs.get("position_bias") is not None:
        raise ValueError(
            "softstep attention cannot apply `position_bias` (an additive score bias, e.g. T5 relative positions); "
            "use a model without score biases"
        )
    for sink in ("s_aux", "sinks"):
        if kwargs.get(sink) is not None:
            raise ValueError(
                f"softstep attention cannot apply attention sinks (`{sink}`, e.g. GPT-OSS: a learned extra "
                "logit in every softmax row); use a model without sinks"
            )
    if kwargs.get("block_indices") is not None:
        raise ValueError(
            "softstep attention cannot apply a block-sparse key selection (`block_indices`, e.g. MiniMax-M3); "
            "use a model without an attention indexer"
        )
    layer = _attached_layer(module)
    if layer is None:
        if torch.compiler.is_compiling():  # (dynamo cannot create parameters inside a graph)
            raise RuntimeError(
                "softstep attention has no step parameters yet: call "
                "simwarp.integrations.transformers.attach_softstep(model) before torch.compile"
            )
        config = getattr(module, "config", None)
        opts = dict(_DEFAULT_ATTACH)
        opts.update(getattr(config, _CONFIG_KEY, None) or {})
        with torch.inference_mode(False), torch.enable_grad():
            layer = _new_softstep(module, opts)
        module.softstep = layer
        if config is not None and getattr(config, _CONFIG_KEY, None) is None:
            # recorded as attach_softstep records it: save_pretrained keeps the options, and
            # from_pretrained then loads these (trained) steps instead of attaching fresh ones
            setattr(config, _CONFIG_KEY, opts)
        warnings.warn(
            f"simwarp: created SoftStep parameters lazily on {type(module).__name__}; call "
            "simwarp.integrations.transformers.attach_softstep(model) before building the optimizer so that "
            "they are trained",
            stacklevel=2,
        )
    groups = getattr(module, "num_key_value_groups", 1) or 1
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:  # empty static-cache prefill, as sdpa_attention_forward
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if kwargs.get("indices") is not None:  # a top-k key selection per query (DeepSeek-V3.2's indexer)
        attention_mask, is_causal = _selected_keys_mask(kwargs["indices"], attention_mask, is_causal, key.shape[2])
    need_weights = bool(kwargs.get("output_attentions", False))
    result = layer(  # through the module's __call__: its hooks see the call
        query, key, value, attn_mask=attention_mask, dropout_p=float(dropout or 0.0), is_causal=is_causal,
        scale=scaling, enable_gqa=groups > 1, need_weights=need_weights,
    )
    out, weights = result if need_weights else (result, None)
    return out.transpose(1, 2).contiguous(), weights


def _selected_keys_mask(indices: torch.Tensor, attention_mask, is_causal: bool, kv_length: int):
    """``(mask, is_causal)`` that also drops the keys ``indices (B, L, k)`` does not select, as
    transformers folds them into the mask for its own eager and sdpa paths (it passes them
    as ``indices`` to every other implementation)."""
    b, q_len = indices.shape[0], indices.shape[1]
    keep = torch.zeros((b, q_len, kv_length), dtype=torch.bool, device=indices.device)
    keep = keep.scatter_(-1, indices.long(), True).unsqueeze(1)  # (B, 1, L, S)
    if attention_mask is None:
        if is_causal:  # upper-left, as SDPA's is_causal
            keep = keep & torch.ones(q_len, kv_length, dtype=torch.bool, device=keep.device).tril()
        return keep, False
    if attention_mask.dtype == torch.bool:
        return attention_mask & keep, is_causal
    return attention_mask.masked_fill(~keep, -torch.inf), is_causal


#: ``model_type`` prefixes of the models that slice their queries after building the masks
#: unless the attention implementation is named ``"sdpa"`` (transformers 5; :func:`_mask_interface`).
_SLICE_QUERIES_BY_NAME = ("gemma4",)


def _mask_interface(*args: Any, config: Any = None, **kwargs: Any):
    """transformers' ``sdpa_mask``, but never skipped (``None`` for "use is_causal") for
    models that, unless the implementation is named ``"sdpa"``, slice their queries after
    building the masks (Gemma 4's KV-shared layers with ``logits_to_keep``, static caches):
    the attention would see fewer queries than keys, no mask and ``is_causal``, and align
    them at the wrong end."""
    from transformers.masking_utils import sdpa_mask

    if str(getattr(config, "model_type", "")).startswith(_SLICE_QUERIES_BY_NAME):
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, config=config, **kwargs)


def register(model: nn.Module | None = None, **attach_kwargs: Any) -> nn.Module | None:
    """Register ``"softstep"`` with transformers (attention function + mask builder). Idempotent.

    After this, ``AutoModel.from_pretrained(path, attn_implementation="softstep")`` works. With
    ``model``, also :func:`attach_softstep` to it (``attach_kwargs``) and switch it to SoftStep
    attention; returns the model.
    """
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, softstep_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _mask_interface)
    if model is not None:
        attach_softstep(model, **attach_kwargs)
        return model
    return None


# ---------------------------------------------------------------------------------------
# Per-layer parameters
# ---------------------------------------------------------------------------------------


_DISPATCH_CACHE: dict[type, bool] = {}


def _dispatches_attention(cls: type) -> bool:
    """True when ``cls.forward`` calls transformers' attention interface (the modules whose
    attention ``"softstep"`` replaces); the same source heuristic transformers itself uses."""
    if cls not in _DISPATCH_CACHE:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _DISPATCH_CACHE[cls] = "ALL_ATTENTION_FUNCTIONS" in src
    return _DISPATCH_CACHE[cls]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of a transformers model (those dispatching through
    ``ALL_ATTENTION_FUNCTIONS``), by qualified name."""
    return {n: m for n, m in model.named_modules() if _dispatches_attention(type(m))}


def attach_softstep(
    model: nn.Module,
    mode: str = "per_head",
    step: str = "sigmoidal",
    init: tuple[float, float, float] | None = None,
    hidden: int | None = None,
    *,
    set_implementation: bool = True,
    overwrite: bool = False,
) -> dict[str, SoftStepAttention]:
    """Give every attention module of ``model`` its own learned step (a ``softstep`` submodule).

    Args:
        model: a transformers ``PreTrainedModel``, or any module tree containing one (your
            classifier around a backbone). Bare layers without their model need
            ``set_implementation=False``.
        mode: ``"per_head"`` (H × 3 values per layer), ``"instance"`` (a Linear per layer maps each
            query vector to its ``(a, b, t)``) or ``"global"`` (3 values per layer).
        step: registered step; ``"none"`` reproduces softmax attention.
        init, hidden: see :class:`simwarp.SoftStep`.
        set_implementation: also register ``"softstep"`` and switch the model to it
            (``set_attn_implementation("softstep")`` on ``model`` or, for a wrapper module, on
            each transformers model inside it).
        overwrite: replace existing ``softstep`` submodules (default: keep them; attaching
            again with other options then raises, since the kept modules have the old ones).

    Returns:
        ``{attention module name: SoftStepAttention}`` (where PEFT's ``modules_to_save`` wraps
        one, the wrapper: it forwards calls and attributes to its active copy). The options
        are recorded in the ``config.softstep`` of each transformers model (saved by
        ``save_pretrained``).

    Raises:
        ValueError: no supported attention module, a score modifier SoftStep cannot apply,
            other options than those already attached (without ``overwrite``), or (with
            ``set_implementation``) no transformers model to switch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    overwrite, set_implementation = as_flag("overwrite", overwrite), as_flag("set_implementation", set_implementation)
    opts = {"mode": mode, "step": step, "init": None if init is None else list(check_init(init)), "hidden": hidden}
    found = attention_modules(model)
    if not found:
        raise ValueError(
            f"no attention module dispatching through transformers' ALL_ATTENTION_FUNCTIONS found in "
            f"{type(model).__name__}"
        )
    problem = _score_modifier(model, found)
    if problem is not None:
        raise ValueError(f"{type(model).__name__} {problem}, which SoftStep attention cannot apply")
    models = _outermost_pretrained(model)
    if set_implementation and not models:
        raise ValueError(
            f"{type(model).__name__} contains no transformers PreTrainedModel to switch to SoftStep attention; "
            "pass set_implementation=False and switch it yourself"
        )
    layers = {name: _attached_layer(module, foreign_ok=overwrite) for name, module in found.items()}
    for name, layer in layers.items():
        if overwrite and layer is not None and _runs_softstep(layer) and any(map(_is_peft_wrapper, layer.modules())):
            raise ValueError(
                f"{name}.softstep is wrapped by PEFT (modules_to_save), which trains and saves that wrapper: "
                "attach_softstep with other options before get_peft_model"
            )
        existing = getattr(layer, "attach_options", None)
        if not overwrite and existing is not None and existing != opts:
            raise ValueError(
                f"{name} already has SoftStep attention with {existing}, not {opts}; "
                "pass overwrite=True to replace its step parameters"
            )
    attached, created = {}, []
    for name, module in found.items():
        if overwrite or layers[name] is None:
            module.softstep = _new_softstep(module, opts)
            created.append(name)
        attached[name] = module.softstep
    if created and hasattr(model, "peft_config"):
        warnings.warn(
            f"simwarp: attached new SoftStep parameters to a PEFT model ({len(created)} layers). PEFT saves only its "
            "adapters and modules_to_save, so save_pretrained would drop these steps: call attach_softstep before "
            "get_peft_model and pass modules_to_save=['softstep.step'] (docs/attention.md, PEFT)",
            UserWarning,
            stacklevel=2,
        )
    for pretrained in models:
        setattr(pretrained.config, _CONFIG_KEY, opts)
    if set_implementation:
        register()
        for pretrained in models:
            if hasattr(pretrained, "set_attn_implementation"):
                pretrained.set_attn_implementation(ATTN_NAME)
            else:  # transformers before set_attn_implementation existed
                pretrained.config._attn_implementation = ATTN_NAME
    return attached


def _outermost_pretrained(model: nn.Module) -> list[nn.Module]:
    """The transformers models (``PreTrainedModel``) in ``model``'s tree that no other one
    contains: ``[model]`` itself for a ``PreTrainedModel``, the backbones of a wrapper module (a
    classifier around a ``BertModel``, a ``SentenceTransformer``)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return [model]
    outer: list[nn.Module] = []
    for _, child in model.named_children():
        outer += _outermost_pretrained(child)
    return outer


#: Parameter names of score modifiers that transformers passes around the attention mask:
#: relative-position biases (T5 and its descendants, BEiT, Swin) and attention sinks (GPT-OSS).
_SCORE_MODIFIER_PARAMETERS = ("relative_attention_bias", "relative_position_bias", "sinks")


def _score_modifier(model: nn.Module, found: dict[str, nn.Module]) -> str | None:
    """Why the scores of ``model``'s attention modules ``found`` are more than ``q·k`` under a
    key mask (None: they are not). Only the parameters of those modules and of the layers
    holding them count (a tower with its own eager attention, e.g. CLAP's Swin audio encoder,
    is not SoftStep's concern); biases kept elsewhere and passed through the mask are refused
    at run time."""
    for owner in (model, *found.values()):  # a wrapper's backbone, a text_config: the modules' own configs
        softcap = getattr(getattr(owner, "config", None), "attn_logit_softcapping", None)
        if softcap is not None:
            return f"caps its attention logits (config.attn_logit_softcapping={softcap})"
    # each attention module and the layer around it (BEiT keeps its table on the layer)
    owners = dict(found)
    for name in found:
        parent = name.rpartition(".")[0]
        owners.setdefault(parent, model.get_submodule(parent))
    for owner_name, owner in owners.items():
        for name, _ in owner.named_parameters():
            if any(part.startswith(_SCORE_MODIFIER_PARAMETERS) for part in name.split(".")):
                return f"adds a learned score bias or sink to its attention scores ({owner_name}.{name})"
    return None


def _saved_options(config: Any) -> tuple[dict | None, bool]:
    """The SoftStep options a checkpoint's config records, and whether they come from its
    sub-configs (a composite model's text/vision parts record them where steps were created
    lazily, perhaps in one part only) rather than from the config itself."""
    from transformers import PretrainedConfig

    own = getattr(config, _CONFIG_KEY, None)
    if own:
        return own, False
    found = [getattr(sub, _CONFIG_KEY) for sub in vars(config).values()
             if isinstance(sub, PretrainedConfig) and getattr(sub, _CONFIG_KEY, None)]
    distinct = [f for i, f in enumerate(found) if f not in found[:i]]
    if len(distinct) > 1:
        raise ValueError(f"the checkpoint's sub-configs record different SoftStep options {distinct}; "
                         "load it with transformers and attach_softstep the parts yourself")
    return (distinct[0], True) if distinct else (None, False)


def _as_saved(value: Any) -> Any:
    """An option as ``config.json`` stores it (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


#: ``from_pretrained`` arguments that say where a checkpoint's files are (passed on to
#: transformers' file lookup by :func:`load_softstep_state`).
_CHECKPOINT_KWARGS = ("subfolder", "variant", "revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


def load_softstep_state(
    model: nn.Module, source: str | os.PathLike | dict, *, strict: bool = True, **checkpoint: Any
) -> list[str]:
    """Load the ``softstep`` parameters into an attached model from a checkpoint or a state dict.

    Args:
        model: a model after :func:`attach_softstep` (or any module holding its ``softstep``
            layers), also inside a PEFT model (where ``modules_to_save`` wraps a step, its
            adapter copies load the entry; the original copy, PEFT's ``disable_adapter``
            state, keeps its values unless the source is a PEFT model that holds one).
        source: a ``save_pretrained`` directory or a Hub model id (its weights in one file or
            in shards, safetensors or ``.bin``, found as transformers finds them: from the
            local cache, or downloaded; or a PEFT adapter's ``adapter_model`` file), or a
            state dict (a PEFT model's too).
        strict: raise when the model has SoftStep parameters the source lacks (``False``: load
            what it holds, warn, and leave the others as they are).
        checkpoint: where in it, as for ``from_pretrained`` (``subfolder``, ``variant``,
            ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``,
            ``proxies``).

    Returns:
        The loaded keys, sorted.

    Raises:
        KeyError: the model expects softstep parameters the source lacks (with ``strict``).
        FileNotFoundError: no weights at ``source``.
        TypeError: other keyword arguments.
    """
    if not isinstance(source, (str, os.PathLike, dict)):
        raise TypeError(
            f"source must be a checkpoint directory, a Hub model id or a state dict, got {type(source).__name__}"
        )
    unknown = sorted(set(checkpoint) - set(_CHECKPOINT_KWARGS))
    if unknown:
        raise TypeError(f"load_softstep_state got unexpected arguments {unknown}; it takes {list(_CHECKPOINT_KWARGS)}")
    state = source if isinstance(source, dict) else _checkpoint_softstep_state(source, **checkpoint)
    own = {k: v for k, v in model.state_dict().items() if _is_softstep_key(k)}
    copies: dict[str | None, dict[str, torch.Tensor]] = {}  # PEFT copy ("original", an adapter, None) -> entries
    for key, value in state.items():
        if _is_softstep_key(key):
            plain, copy = _peft_copy(key)
            copies.setdefault(copy, {})[plain] = value
    # a copy loads its own entries, else the plain ones, else (a PEFT source) its "default"
    # adapter's or its only adapter's; several others are ambiguous
    adapters = sorted(c for c in copies if c not in (None, "original"))
    fallback = [None, "default", *(adapters if len(adapters) == 1 else [])]
    picked, skipped = {}, set()
    for key in own:
        plain, copy = _peft_copy(key)
        if copy == "original" and "original" not in copies:
            skipped.add(key)  # the base model's copy (PEFT's disable_adapter) keeps its values
            continue
        order = ["original"] if copy == "original" else list(dict.fromkeys([copy, *fallback]))
        renamed = functools.cache(lambda plain=plain, key=key: _checkpoint_name(model, plain, own[key]))  # on a miss, once
        for table in (copies.get(c) for c in order):
            hit = table and (_stored_key(plain, table) or _stored_key(renamed(), table))
            if hit:
                picked[key] = table[hit]
                break
    stored = {k: v for table in copies.values() for k, v in table.items()}
    missing = sorted(key for key in set(own) - set(picked) - skipped if not _held_by_old_constant_step(model, key, stored))
    if missing:
        what = (f"the checkpoint has no SoftStep parameters for {missing[:3]}{'…' if len(missing) > 3 else ''} "
                f"(it holds {len(stored)} SoftStep entries, e.g. {sorted(stored)[:2]})")
        if as_flag("strict", strict):
            raise KeyError(what)
        warnings.warn(f"{what}; those keep their current (fresh) values", UserWarning, stacklevel=2)
    model.load_state_dict(picked, strict=False)
    return sorted(picked)


#: The path segment PEFT's ``modules_to_save`` adds inside a wrapped module: the original, or
#: an adapter's trained copy (``...softstep.step.modules_to_save.default.raw``).
_PEFT_COPY = re.compile(r"\.(?:(original_module)|modules_to_save\.([^.]+))(?=\.)")


_PEFT_PREFIX = "base_model.model."  # where a PeftModel holds the model it wraps


def _peft_copy(key: str) -> tuple[str, str | None]:
    """``(key without PEFT's modules_to_save segment, which copy)``: ``"original"``, the
    adapter's name, or ``None`` for a key outside any wrapper."""
    found = _PEFT_COPY.search(key)
    if found is None:
        return key, None
    return key[: found.start()] + key[found.end():], "original" if found.group(1) else found.group(2)


def _is_softstep_key(key: str) -> bool:
    """Whether a state-dict key names a parameter of an attached ``softstep`` module."""
    return ".softstep." in f".{key}"


def _checkpoint_softstep_state(source: str | os.PathLike, variant: str | None = None, **where: Any) -> dict:
    """The ``softstep`` entries of a checkpoint's weights: one file or the shards that hold them
    (an index's ``weight_map``), safetensors first, as ``from_pretrained`` looks for them."""
    from transformers.utils import (
        ADAPTER_SAFE_WEIGHTS_NAME,
        ADAPTER_WEIGHTS_NAME,
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
        cached_file,
    )

    def locate(name: str) -> str | None:
        try:
            return cached_file(str(source), name, _raise_exceptions_for_missing_entries=False, **where)
        except (OSError, ValueError) as err:  # neither a directory nor a Hub model id it could reach
            raise FileNotFoundError(f"no model weights in {source}: {err}") from err

    def with_variant(name: str) -> str:  # as transformers names them: model.v1.safetensors, ....index.v1.json
        stem, _, ext = name.rpartition(".")
        return name if variant is None else f"{stem}.{variant}.{ext}"

    def softstep_entries(file: str) -> dict:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if _is_softstep_key(k)}

    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
             ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)  # (a PEFT adapter: its modules_to_save)
    for name in names:
        file = locate(with_variant(name))
        if file is None:
            continue
        if not name.endswith(".json"):
            return softstep_entries(file)
        with open(file) as index:
            weight_map = json.load(index)["weight_map"]
        state = {}
        for shard in sorted({f for k, f in weight_map.items() if _is_softstep_key(k)}):
            found = locate(shard)
            if found is None:
                raise FileNotFoundError(f"{source}: the index {Path(file).name} names the shard {shard}, which is missing")
            state.update(softstep_entries(found))
        return state
    detail = "".join(f", {k}={v!r}" for k, v in (("variant", variant), *where.items()) if v)
    raise FileNotFoundError(f"no model weights ({', '.join(with_variant(n) for n in names)}) in {source}{detail}")


def _held_by_old_constant_step(model: nn.Module, key: str, stored: dict) -> bool:
    """Whether ``key`` is the constant ``raw`` of a step that does not warp (``step="none"``)
    and the checkpoint holds that module's network from before such steps kept constants
    (``SoftStep(mode="instance")``): its values never reach an output, so nothing is missing."""
    module_name, _, leaf = key.rpartition(".")
    if leaf != "raw" or "raw" not in model.get_submodule(module_name)._buffers:
        return False
    module_name = _peft_copy(module_name + ".")[0][:-1]
    return _stored_key(f"{module_name}.net.weight", stored) is not None or any(
        _stored_key(f"{module_name}.net.{i}.weight", stored) is not None for i in (0, 2)
    )


def _stored_key(key: str | None, stored: dict) -> str | None:
    """The checkpoint entry for the model's ``key``: the same name, or one that differs by a
    leading prefix on either side (a base model saved from a head model carries ``"bert."``; a
    head model loaded from a base checkpoint lacks it). Ambiguous prefixes match nothing. A
    PEFT model's own prefix (``"base_model.model."``) may be there besides (a PEFT-wrapped base
    model loading a head model's checkpoint)."""
    if key is None:
        return None
    for name in dict.fromkeys((key, key.removeprefix(_PEFT_PREFIX))):
        if name in stored:
            return name
        hits = [sk for sk in stored if sk.endswith("." + name) or name.endswith("." + sk)]
        if len(hits) == 1:
            return hits[0]
    return None


def _checkpoint_name(model: nn.Module, key: str, tensor: torch.Tensor) -> str | None:
    """The name ``save_pretrained`` gives the model's ``key`` in a checkpoint, where transformers
    renames weights between its model and checkpoint layouts (transformers 5: ViT, LLaVA, ...);
    ``None`` where it has no renaming for this model or this transformers has no such step."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    try:
        renamed = revert_weight_conversion(model, {key: tensor})
    except Exception:  # noqa: BLE001 - transformers internals: no renaming known for this model
        return None
    return next(iter(renamed)) if len(renamed) == 1 else None


def from_pretrained(path: str | os.PathLike, auto_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model with SoftStep attention from ``path`` (offline-friendly).

    A checkpoint saved after :func:`attach_softstep` gets its step parameters back (options from
    ``config.json``); a plain checkpoint gets fresh ones (``kwargs`` ``mode``, ``step``, ``init``,
    ``hidden``, default per head). Other ``kwargs`` go to ``auto_class.from_pretrained``
    (``auto_class`` defaults to ``transformers.AutoModel``). A PEFT adapter directory is
    refused (its steps need a base with SoftStep attention: see ``docs/attention.md``).
    """
    _require_transformers()
    if auto_class is None:
        from transformers import AutoModel as auto_class
    if kwargs.get("attn_implementation", ATTN_NAME) != ATTN_NAME:
        raise ValueError(
            f"from_pretrained loads with attn_implementation={ATTN_NAME!r}, got "
            f"{kwargs['attn_implementation']!r}; for another attention load with transformers' own from_pretrained"
        )
    kwargs.pop("attn_implementation", None)
    where = Path(path, kwargs.get("subfolder") or "")
    if (where / "adapter_config.json").is_file() and not (where / "config.json").is_file():
        raise ValueError(
            f"{path} is a PEFT adapter: load its base with from_pretrained (or attach_softstep with the options "
            "you trained with), then peft.PeftModel.from_pretrained(base, adapter_dir) (docs/attention.md, PEFT)"
        )
    register()
    attach = {k: kwargs.pop(k) for k in list(kwargs) if k in _DEFAULT_ATTACH}
    if attach.get("init") is not None:  # as config.json stores it (a NumPy array compares elementwise)
        attach["init"] = list(check_init(attach["init"]))
    model = auto_class.from_pretrained(path, attn_implementation=ATTN_NAME, **kwargs)
    saved, in_parts = _saved_options(model.config)
    conflicts = {k: v for k, v in attach.items() if saved and k in saved and _as_saved(v) != saved[k]}
    if conflicts:
        raise ValueError(
            f"{path} holds SoftStep parameters saved with {dict(saved)}; {conflicts} conflicts with them. "
            "Leave those options out to load the saved steps, or load the model with transformers and call "
            "attach_softstep(model, ..., overwrite=True) for fresh ones"
        )
    opts = dict(_DEFAULT_ATTACH)
    opts.update(saved or {})
    opts.update(attach)
    attach_softstep(model, **opts)
    if saved:  # (options from a composite model's parts: a part may never have made its steps)
        load_softstep_state(model, path, strict=not in_parts, **{k: v for k, v in kwargs.items() if k in _CHECKPOINT_KWARGS})
    return model
