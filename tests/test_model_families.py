"""attn_implementation="s2_attention" on real transformers model families, built tiny from configs.

Train mode is checked against the slow reference S2-Attn (registered below under another name) at the level of
whole models: logits and every parameter gradient, with padding and with packing. Eval mode must equal the full
attention transformers itself uses for the family.
"""

import copy

import pytest
import torch
from tests.helpers.compare import logits_and_grads
from tests.helpers.families import REFUSED_HERE, SUPPORTED_HERE, tiny_config
from tests.helpers.reference import reference_s2_attention
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import longlora_plugin
from longlora_plugin import S2_ATTENTION, S2Settings

REFERENCE = "s2_reference_for_tests"


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    assert module.training and dropout == 0.0
    settings = S2Settings.from_config(module.config)
    out = reference_s2_attention(
        query,
        key,
        value,
        group_size=settings.group_size_for(query.shape[2]),
        shift=settings.shift,
        padding_mask=attention_mask,
        position_ids=kwargs.get("position_ids"),
        cu_seqlens=kwargs.get("cu_seq_lens_q"),
        scaling=scaling,
        softcap=kwargs.get("softcap"),
        sliding_window=kwargs.get("sliding_window"),
    )
    return out, None


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, flash_attention_mask)

GROUP_SIZE = 6


def build_pair(model_type, other_attention, **overrides):
    config = tiny_config(model_type, s2_group_size=GROUP_SIZE, **overrides)
    torch.manual_seed(0)
    # from_config writes the attention name into the config it gets: each model needs its own copy.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=S2_ATTENTION)
    other = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=other_attention)
    other.load_state_dict(model.state_dict())
    assert (model.config._attn_implementation, other.config._attn_implementation) == (S2_ATTENTION, other_attention)
    return model, other


def padded_batch(vocab_size, seq_len=23):
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (3, seq_len), generator=gen)
    mask = torch.ones(3, seq_len, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, seq_len - 9 :] = 0  # right padding
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


@pytest.mark.parametrize("model_type", SUPPORTED_HERE)
def test_train_mode_matches_reference_with_padding(model_type):
    model, reference = build_pair(model_type, REFERENCE)
    input_ids, mask, labels = padded_batch(model.config.vocab_size)
    (logits, grads), (ref_logits, ref_grads) = (logits_and_grads(m, input_ids, mask, labels) for m in (model, reference))
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_type", SUPPORTED_HERE)
def test_eval_mode_equals_the_default_full_attention(model_type):
    config = tiny_config(model_type)
    default = AutoModelForCausalLM.from_config(config).config._attn_implementation  # sdpa, or eager for gemma2
    if getattr(config, "attn_logit_softcapping", None) is not None:
        default = "eager"  # transformers < 5.22 defaulted gemma2 to SDPA, which drops the softcap; s2 keeps it
    model, baseline = build_pair(model_type, default)
    input_ids, mask, _ = padded_batch(model.config.vocab_size)
    model.eval()
    baseline.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=input_ids, attention_mask=mask).logits,
            baseline(input_ids=input_ids, attention_mask=mask).logits,
            atol=1e-6,
            rtol=1e-6,
        )
        generated = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
        expected = baseline.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("model_type", SUPPORTED_HERE)
def test_packed_batch_equals_each_document_alone(model_type):
    """TRL's padding-free collator: one row, restarting position_ids, cu_seq_lens_q/k."""
    config = tiny_config(model_type, s2_group_size=GROUP_SIZE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=S2_ATTENTION).train()
    lengths = [7, 13, 3]
    docs = [torch.randint(3, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    cu = torch.tensor([0, 7, 20, 23], dtype=torch.int32)
    packed = model(
        input_ids=torch.cat(docs, dim=1),
        position_ids=torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(lengths),
        max_length_k=max(lengths),
        use_cache=False,
    ).logits
    for doc, a, b in zip(docs, cu[:-1].tolist(), cu[1:].tolist()):
        alone = model(input_ids=doc, use_cache=False).logits
        torch.testing.assert_close(packed[:, a:b], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", REFUSED_HERE)
def test_models_outside_the_attention_interface_fail_at_load(model_type):
    with pytest.raises(ValueError, match=f"model_type '{model_type}'.*generic attention interface"):
        AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=S2_ATTENTION)


def test_bad_settings_fail_at_load_and_name_the_value():
    with pytest.raises(ValueError, match="s2_group_size must be a positive int or None, got 0"):
        AutoModelForCausalLM.from_config(tiny_config("llama", s2_group_size=0), attn_implementation=S2_ATTENTION)
    with pytest.raises(ValueError, match=r"s2_group_size_ratio .* got 1.5"):
        AutoModelForCausalLM.from_config(tiny_config("llama", s2_group_size_ratio=1.5), attn_implementation=S2_ATTENTION)
    with pytest.raises(ValueError, match="s2_backend must be one of"):
        AutoModelForCausalLM.from_config(tiny_config("llama", s2_backend="xformers"), attn_implementation=S2_ATTENTION)


def test_set_attn_implementation_switches_an_existing_model():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.set_attn_implementation(S2_ATTENTION)
    assert model.config._attn_implementation == S2_ATTENTION


def test_a_custom_4d_mask_in_training_is_refused_not_ignored():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=S2_ATTENTION).train()
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"attention mask of shape \(1, 1, 8, 8\)"):
        model(input_ids=torch.randint(3, 90, (1, 8)), attention_mask=mask, use_cache=False)


def test_configure_s2_validates_and_sets():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=S2_ATTENTION)
    settings = longlora_plugin.configure_s2(model, group_size=128, shift=False)
    assert (model.config.s2_group_size, model.config.s2_shift) == (128, False)
    assert settings.group_size_for(10_000) == 128
    with pytest.raises(ValueError, match="s2_shift must be True or False, got 'no'"):
        longlora_plugin.configure_s2(model, shift="no")
    assert model.config.s2_shift is False  # a refused change leaves the config as it was


def test_head_sets_that_cut_through_kv_groups_match_reference():
    """6 query heads over 3 KV heads: the unshifted half (heads 0-2) ends inside KV group 1."""
    model, reference = build_pair(
        "llama", REFERENCE, hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16
    )
    input_ids, mask, labels = padded_batch(model.config.vocab_size)
    model.train()
    reference.train()
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    expected = reference(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config("llama", s2_group_size=GROUP_SIZE)
    input_ids, mask, labels = padded_batch(config.vocab_size)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=S2_ATTENTION).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_training_with_the_default_kv_cache_still_uses_s2(monkeypatch):
    """A model in train mode defaults to use_cache=True; the first forward's query and keys are equally long."""
    import longlora_plugin.hf_attention as attention

    calls = []
    real = attention.s2_attention
    monkeypatch.setattr(attention, "s2_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = AutoModelForCausalLM.from_config(tiny_config("llama", s2_group_size=4), attn_implementation=S2_ATTENTION)
    model.train()(input_ids=torch.randint(3, 90, (2, 12)))
    assert len(calls) == model.config.num_hidden_layers
