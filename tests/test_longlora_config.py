"""LongLoraConfig: defaults, validation, module detection per family, tied embeddings, the trainable report."""

import pytest
import torch
from tests.helpers.families import FAMILIES, tiny_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from longlora_plugin import LongLoraConfig, get_longlora_model, find_longlora_modules, format_trainable_report, trainable_parameter_report
from longlora_plugin.builtin_plugin import is_norm_module


def test_paper_defaults():
    config = LongLoraConfig()
    assert isinstance(config, LoraConfig) and config.peft_type.value == "LORA"
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    assert config.trainable_embeddings and config.trainable_norms
    assert config.__dataclass_fields__["trainable_norms"].metadata["help"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_trainable_set_is_found_from_the_model(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    found = find_longlora_modules(model)
    named = dict(model.named_modules())
    assert found.embeddings == (next(n for n, m in named.items() if m is model.get_input_embeddings()),)
    norms = {n for n, m in named.items() if n and is_norm_module(m)}
    assert set(found.norms) == norms and len(norms) >= model.config.num_hidden_layers + 1
    assert all(isinstance(named[n], torch.nn.Linear) for n in found.attention_projections)
    assert all(".mlp." not in n for n in found.attention_projections)

    peft_model = get_peft_model(model, LongLoraConfig.for_model(model))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora_parents = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable if ".lora_" in n}
    assert lora_parents == set(found.attention_projections)
    for module_name in (*found.embeddings, *found.norms):
        assert any(n.startswith(f"base_model.model.{module_name}.modules_to_save.") for n in trainable), module_name
    other = [n for n in trainable if ".lora_" not in n and ".modules_to_save." not in n]
    assert other == []


def test_qwen3_q_and_k_norms_are_trained():
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3"))
    norms = find_longlora_modules(model).norms
    assert any(n.endswith("self_attn.q_norm") for n in norms) and any(n.endswith("self_attn.k_norm") for n in norms)


def test_tied_embeddings_stay_tied():
    model = AutoModelForCausalLM.from_config(tiny_config("gemma"))
    assert model.config.tie_word_embeddings
    config = LongLoraConfig.for_model(model)
    assert config.ensure_weight_tying
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        peft_model.get_input_embeddings().weight.add_(1.0)
    base = peft_model.get_base_model()
    assert base.lm_head.weight.data_ptr() == base.get_input_embeddings().weight.data_ptr() or torch.equal(
        base.lm_head.weight, base.get_input_embeddings().weight
    )


def test_switches_turn_off_embeddings_and_norms():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    config = LongLoraConfig.for_model(model, trainable_embeddings=False, trainable_norms=False)
    assert config.modules_to_save is None
    report = trainable_parameter_report(get_peft_model(model, config))
    assert report["embeddings"]["count"] == 0 and report["norms"]["count"] == 0 and report["lora"]["count"] > 0


def test_trainable_report_splits_and_counts():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    report = trainable_parameter_report(get_peft_model(model, LongLoraConfig.for_model(model)))
    cfg = model.config
    assert report["embeddings"]["count"] == cfg.vocab_size * cfg.hidden_size
    assert report["norms"]["count"] == (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_o = 2 * 8 * (cfg.hidden_size + cfg.num_attention_heads * head_dim)
    k_v = 2 * 8 * (cfg.hidden_size + cfg.num_key_value_heads * head_dim)
    assert report["lora"]["count"] == cfg.num_hidden_layers * (q_o + k_v)
    assert report["other"]["count"] == 0
    assert report["trainable"]["count"] == sum(report[k]["count"] for k in ("lora", "embeddings", "norms", "other"))
    assert 0 < report["trainable"]["percent"] < 100
    text = format_trainable_report(report)
    assert "lora" in text and "embeddings" in text and "norms" in text


def test_config_without_a_model_covers_builtin_names():
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neox"))
    peft_model = get_peft_model(model, LongLoraConfig())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("query_key_value.lora_A" in n for n in trainable) and any("attention.dense.lora_A" in n for n in trainable)
    assert any("embed_in.modules_to_save" in n for n in trainable)
    assert any("final_layer_norm.modules_to_save" in n for n in trainable)


def test_saved_config_keeps_longlora_fields(tmp_path):
    config = LongLoraConfig(original_context=4096, target_context=32768, s2_group_size=8192, rope_rounding="ceil")
    config.save_pretrained(tmp_path)
    loaded = LongLoraConfig.from_pretrained(tmp_path)
    assert (loaded.original_context, loaded.target_context, loaded.s2_group_size, loaded.rope_rounding) == (
        4096,
        32768,
        8192,
        "ceil",
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(trainable_norms="yes"), "trainable_norms must be True or False, got 'yes'"),
        (dict(original_context=0, target_context=10), "original_context must be a positive int or None, got 0"),
        (dict(original_context=4096), r"target_context must be set together with original_context \(4096\)"),
        (dict(original_context=4096, target_context=2048), r"target_context must be larger than original_context \(4096\), got 2048"),
        (dict(rope_type="ntk"), "rope_type must be one of .* got 'ntk'"),
        (dict(rope_rounding="floor"), r"rope_rounding must be one of \('exact', 'ceil'\), got 'floor'"),
        (dict(s2_group_size=-1), "s2_group_size must be a positive int or None, got -1"),
        (dict(rope_type="yarn"), "target_context must be set for rope_type to have any effect"),
        (dict(rope_options={"attention_factor": 1.1}), "target_context must be set for rope_options"),
        (dict(s2_group_size_ratio=2.0), r"s2_group_size_ratio must be a number in \(0, 1\], got 2.0"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LongLoraConfig(**kwargs)


def test_naming_modules_that_do_not_exist_fails():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match=r"model_type 'llama' does not have: \['layer_norm_x', 'nonexistent_proj'\]"):
        get_longlora_model(model, LongLoraConfig(target_modules=["q_proj", "nonexistent_proj"], modules_to_save=["layer_norm_x"]))


def test_a_config_built_without_a_model_applies_to_any_family():
    """Its modules_to_save are name patterns for several families; the ones a model lacks are not an error."""
    model = get_longlora_model(AutoModelForCausalLM.from_config(tiny_config("llama")), LongLoraConfig())
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert any("embed_tokens.modules_to_save" in name for name in trainable)
    assert any("q_proj.lora_A" in name for name in trainable)


def test_a_config_built_without_a_model_keeps_tied_embeddings_tied_through_training_and_merge():
    """The path of SFTTrainer(peft_config=LongLoraConfig(...)): no for_model, a model with tied embeddings."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma"))
    before = model.get_input_embeddings().weight.detach().clone()
    assert model.config.tie_word_embeddings
    peft_model = get_peft_model(model, LongLoraConfig(original_context=64, target_context=256))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    merged = peft_model.merge_and_unload()
    embedding, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert not torch.equal(embedding, before)  # trained
    assert torch.equal(head, embedding) and merged.config.tie_word_embeddings
