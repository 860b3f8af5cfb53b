"""Save -> reload -> same logits; merge -> vanilla from_pretrained -> same logits; atomic saves; wrong bases."""

import json

import pytest
import torch
from tests.helpers.families import tiny_config
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from longlora_plugin import (
    LongLoraConfig,
    extend_rope,
    get_longlora_model,
    load_longlora,
    merge_longlora,
    read_longlora_settings,
    save_longlora,
)

ORIGINAL, TARGET = 64, 256
FAMILIES = ["llama", "gpt_neox", "gemma"]  # gemma: tied input/output embeddings


def base_model(model_type, **overrides):
    torch.manual_seed(0)
    config = tiny_config(model_type, max_position_embeddings=ORIGINAL, **overrides)
    return AutoModelForCausalLM.from_config(config)


def tiny_tokenizer():
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, 96)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]")


def trained_longlora(model_type):
    model = get_longlora_model(
        base_model(model_type),
        LongLoraConfig.for_model(
            base_model(model_type), original_context=ORIGINAL, target_context=TARGET, s2_group_size=24
        ),
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):  # a few S2-Attn steps beyond the original context move LoRA, embeddings and norms
        ids = torch.randint(3, 96, (2, 100), generator=generator)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


EVAL_IDS = torch.randint(3, 96, (2, 150), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(input_ids=EVAL_IDS).logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_then_load_gives_identical_logits(model_type, tmp_path):
    model = trained_longlora(model_type)
    expected = logits(model)
    save_longlora(model, tmp_path / "adapter")
    settings = read_longlora_settings(tmp_path / "adapter")
    assert settings["rope_parameters"]["rope_type"] == "linear" and settings["rope_parameters"]["factor"] == 4.0
    assert (settings["original_context"], settings["target_context"], settings["s2"]["group_size"]) == (64, 256, 24)
    reloaded = load_longlora(base_model(model_type), tmp_path / "adapter").eval()
    assert isinstance(reloaded.peft_config["default"], LongLoraConfig)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_plain_peft_load_works_once_the_base_has_the_rope_parameters(model_type, tmp_path):
    model = trained_longlora(model_type)
    expected = logits(model)
    save_longlora(model, tmp_path / "adapter")
    base = base_model(model_type)
    extend_rope(base, TARGET)  # the documented step: give the base the recorded rope parameters
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_writes_a_plain_model_that_vanilla_transformers_loads(model_type, tmp_path):
    model = trained_longlora(model_type)
    expected = logits(model)
    merge_longlora(model, tmp_path / "merged", tokenizer=tiny_tokenizer())
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
    assert config["max_position_embeddings"] == TARGET
    assert not any(key.startswith("s2_") for key in config)
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert vanilla.config._attn_implementation in ("sdpa", "eager")
    torch.testing.assert_close(logits(vanilla), expected, atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer("w3 w4")["input_ids"] == [3, 4]


def test_tokenizer_travels_with_the_adapter(tmp_path):
    save_longlora(trained_longlora("llama"), tmp_path / "adapter", tokenizer=tiny_tokenizer())
    assert AutoTokenizer.from_pretrained(tmp_path / "adapter").pad_token == "[PAD]"


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = trained_longlora("llama")
    save_longlora(model, tmp_path / "adapter")
    before = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    first_settings = read_longlora_settings(tmp_path / "adapter")

    def crash_midway(self, folder, **kwargs):
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("simulated kill during save")

    monkeypatch.setattr(PeftModel, "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_longlora(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == before
    assert read_longlora_settings(tmp_path / "adapter") == first_settings
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no partial folder left behind


def test_interrupted_first_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    monkeypatch.setattr(PeftModel, "save_pretrained", lambda self, folder, **kw: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_longlora(trained_longlora("llama"), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_folder_without_the_settings_file_is_not_loaded(tmp_path):
    model = trained_longlora("llama")
    model.save_pretrained(tmp_path / "peft-only")  # plain peft save: no longlora.json
    with pytest.raises(ValueError, match="not a complete LongLoRA adapter folder: longlora.json is missing"):
        load_longlora(base_model("llama"), tmp_path / "peft-only")


def test_loading_onto_another_base_is_refused(tmp_path):
    save_longlora(trained_longlora("llama"), tmp_path / "adapter")
    with pytest.raises(ValueError, match="hidden_size=64, but this base has hidden_size=96"):
        load_longlora(base_model("llama", hidden_size=96), tmp_path / "adapter")
    with pytest.raises(ValueError, match="model_type='llama', but this base has model_type='gpt_neox'"):
        load_longlora(base_model("gpt_neox"), tmp_path / "adapter")


def test_the_training_logit_scale_travels_with_the_adapter_and_not_into_a_merged_model(tmp_path):
    model = get_longlora_model(
        base_model("llama"),
        LongLoraConfig.for_model(base_model("llama"), original_context=ORIGINAL, target_context=TARGET,
                                 s2_group_size=24, s2_logit_scale=0.75),
    )
    save_longlora(model, tmp_path / "adapter")
    assert read_longlora_settings(tmp_path / "adapter")["s2"]["logit_scale"] == 0.75
    reloaded = load_longlora(base_model("llama"), tmp_path / "adapter", is_trainable=True)
    assert reloaded.get_base_model().config.s2_logit_scale == 0.75
    merge_longlora(reloaded, tmp_path / "merged")
    assert "s2_logit_scale" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_rope_options_travel_with_the_adapter_and_into_a_merged_model(tmp_path):
    options = {"beta_fast": 4, "beta_slow": 1, "attention_factor": 1.2}
    config = LongLoraConfig.for_model(base_model("llama"), original_context=ORIGINAL, target_context=TARGET,
                                      s2_group_size=24, rope_type="yarn", rope_options=options)
    model = get_longlora_model(base_model("llama"), config).eval()
    assert model.get_base_model().model.rotary_emb.attention_scaling == 1.2
    save_longlora(model, tmp_path / "adapter")
    assert read_longlora_settings(tmp_path / "adapter")["rope_parameters"]["attention_factor"] == 1.2
    reloaded = load_longlora(base_model("llama"), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=1e-5)
    merge_longlora(reloaded, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.rope_parameters["attention_factor"] == 1.2
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=1e-5)
