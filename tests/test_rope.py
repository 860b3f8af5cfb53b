"""Position interpolation on transformers 5 rope_parameters."""

import math

import pytest
import torch
from tests.helpers.families import tiny_config
from transformers import AutoModelForCausalLM

from longlora_plugin import extend_rope
from longlora_plugin.rope import rope_parameters_for


def test_linear_extension_keeps_theta_and_sets_factor():
    config = tiny_config("llama", max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    factor = extend_rope(config, 16384)
    assert factor == 4.0
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    assert config.max_position_embeddings == 16384


def test_ceil_rounding_matches_the_paper():
    config = tiny_config("llama", max_position_embeddings=4096)
    assert rope_parameters_for(config, 100_000, rounding="ceil")[1] == 25.0  # Llama-2 4k -> 100k
    assert rope_parameters_for(config, 100_000)[1] == pytest.approx(24.4140625)


def test_composes_with_an_existing_linear_factor():
    config = tiny_config("llama", max_position_embeddings=8192, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    assert extend_rope(config, 32768) == 4.0
    assert config.rope_parameters["factor"] == 8.0 and config.rope_parameters["rope_theta"] == 1e4


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "llama3"])
def test_other_rope_types(rope_type):
    config = tiny_config("llama", max_position_embeddings=1024)
    extend_rope(config, 4096, rope_type=rope_type)
    params = config.rope_parameters
    assert params["rope_type"] == rope_type and params["factor"] == 4.0 and "rope_theta" in params
    if rope_type in ("yarn", "llama3"):
        assert params["original_max_position_embeddings"] == 1024
    model = AutoModelForCausalLM.from_config(config)  # transformers accepts and uses it
    assert torch.isfinite(model(input_ids=torch.randint(3, 90, (1, 16))).logits).all()


def test_live_model_rotary_embeddings_are_rebuilt():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=256)).eval()
    ids = torch.randint(3, 90, (1, 32))
    before = model(input_ids=ids).logits
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    extend_rope(model, 1024)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq / 4)
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert not torch.allclose(model(input_ids=ids).logits, before)


def test_model_without_rope_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type 'gpt2' has no rope_parameters"):
        extend_rope(GPT2Config(n_embd=32, n_layer=1, n_head=2), 2048)


@pytest.mark.parametrize("target", [256, 100, 0, 512.0])
def test_target_at_or_below_the_original_is_refused(target):
    config = tiny_config("llama", max_position_embeddings=256)
    with pytest.raises(ValueError, match=f"above the original context of 256 tokens, got {target!r}"):
        extend_rope(config, target)


def test_bad_rope_type_and_incompatible_existing_type():
    config = tiny_config("llama", max_position_embeddings=256)
    with pytest.raises(ValueError, match="rope_type must be one of .* got 'ntk'"):
        extend_rope(config, 1024, rope_type="ntk")
    extend_rope(config, 1024, rope_type="yarn")
    with pytest.raises(ValueError, match="rope_type is 'yarn' with 'linear'"):
        extend_rope(config, 4096)


def test_rope_options_reach_transformers_rotary_module():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=256))
    extend_rope(model, 1024, rope_type="yarn", rope_options={"beta_fast": 4, "beta_slow": 1, "attention_factor": 1.25})
    params = model.config.rope_parameters
    assert (params["beta_fast"], params["beta_slow"], params["attention_factor"]) == (4, 1, 1.25)
    assert model.model.rotary_emb.attention_scaling == 1.25
    # beta_fast=4 keeps every frequency that turns more than 4 times in the original 256 tokens, as llama3-style does
    base = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=256))
    base_inv_freq = base.model.rotary_emb.inv_freq
    kept = base_inv_freq * 256 / (2 * math.pi) > 4
    torch.testing.assert_close(model.model.rotary_emb.inv_freq[kept], base_inv_freq[kept])
    assert (model.model.rotary_emb.inv_freq[~kept] < base_inv_freq[~kept]).all()


def test_attention_factor_multiplies_the_attention_logits_by_its_square():
    ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=256)).eval()
    scaled = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=256)).eval()
    scaled.load_state_dict(plain.state_dict())
    extend_rope(plain, 1024, rope_type="yarn", rope_options={"attention_factor": 1.0})
    extend_rope(scaled, 1024, rope_type="yarn", rope_options={"attention_factor": 1.5})
    position_ids = torch.arange(40)[None]
    x = torch.randn(1, 40, 8)
    cos_plain, sin_plain = plain.model.rotary_emb(x, position_ids)
    cos_scaled, sin_scaled = scaled.model.rotary_emb(x, position_ids)
    torch.testing.assert_close(cos_scaled, 1.5 * cos_plain)
    torch.testing.assert_close(sin_scaled, 1.5 * sin_plain)
    assert not torch.allclose(plain(input_ids=ids).logits, scaled(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("rope_type", "options", "message"),
    [
        ("yarn", {"low_freq_factor": 1.0}, r"rope_options must be 'yarn' parameters \(\['attention_factor', .*\]\); 'low_freq_factor' is not one"),
        ("linear", {"attention_factor": 2.0}, r"rope_options must be 'linear' parameters \(none\); 'attention_factor' is not one"),
        ("yarn", {"attention_factor": 0}, r"rope_options\['attention_factor'\] must be a positive number, got 0"),
        ("yarn", {"truncate": "no"}, r"rope_options\['truncate'\] must be true or false, got 'no'"),
        ("llama3", [("low_freq_factor", 1.0)], "rope_options must be a mapping"),
    ],
)
def test_bad_rope_options_are_refused_with_the_value(rope_type, options, message):
    config = tiny_config("llama", max_position_embeddings=256)
    with pytest.raises(ValueError, match=message):
        extend_rope(config, 1024, rope_type=rope_type, rope_options=options)
    assert config.rope_parameters.get("rope_type", "default") == "default"  # nothing half-applied
