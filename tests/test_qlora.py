"""QLoRA on CPU: a 4-bit NF4 base trains under a recipe, its adapter merges onto the full-precision base, and S2-Attn
over 4-bit weights equals the reference over the same weights dequantized."""

import copy
import json

import pytest
import torch
from peft import get_peft_model
from tests.helpers.compare import logits_and_grads
from tests.helpers.families import tiny_config
from tests.test_model_families import REFERENCE, padded_batch
from transformers import AutoModelForCausalLM

from longlora_plugin import LongLoraConfig, S2_ATTENTION, configure_s2, load_longlora, read_longlora_settings
from longlora_plugin.cli import main as cli
from longlora_plugin.quantization import QuantizationSettings, quantization_from_recipe
from longlora_plugin.recipe import recipe_from_dict
from longlora_plugin.train import train

bnb = pytest.importorskip("bitsandbytes")

# compute in float32 so that the only difference from the full-precision model is the 4-bit rounding of the weights
NF4 = QuantizationSettings(bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=259, max_position_embeddings=64, intermediate_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def load_4bit(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4.bnb_config(), dtype=torch.float32, **kwargs)


def test_qlora_recipe_trains_on_4_bit_saves_and_merges_onto_the_full_precision_base(tiny_base, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Echo {i}.", "output": f"echo {i} " * 3}) + "\n" for i in range(8)))
    raw = {
        "model": {"name_or_path": str(tiny_base), "tokenizer": "bytes", "dtype": "float32",
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}},
        "context": {"original": 64, "target": 256},
        "s2": {"group_size": 64},
        "data": {"format": "longalpaca", "path": str(data), "too_long": "truncate"},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-2, "bf16": False, "use_cpu": True, "save_strategy": "no", "report_to": "none"},
    }
    trainer = train(recipe_from_dict(raw))
    base = trainer.model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(base.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    full = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert any("embed_tokens" in n for n in full) and any("norm" in n for n in full)
    assert set(full.values()) == {torch.float32}, full  # TRL made them bfloat16; the embeddings and norms stay fp32

    adapter = tmp_path / "run" / "adapter"
    assert read_longlora_settings(adapter)["trained_on_quantized_base"]["bnb_4bit_quant_type"] == "nf4"
    cli(["merge", "--base", str(tiny_base), "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    assert "merged onto the full-precision base" in capsys.readouterr().out

    ids = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        adapted_4bit = load_longlora(load_4bit(tiny_base), adapter).eval()
        with_adapter_4bit = adapted_4bit(input_ids=ids).logits
        full_base = load_longlora(AutoModelForCausalLM.from_pretrained(tiny_base), adapter).eval()
        with full_base.disable_adapter():  # the full-precision base with the same rope, without the adapter
            without_adapter = full_base(input_ids=ids).logits
        with adapted_4bit.disable_adapter():
            base_gap = adapted_4bit(input_ids=ids).logits - without_adapter
    # The bound. The 4-bit model with the adapter and the merged model run the same adapter (LoRA, embeddings,
    # norms, rope); they differ only in the frozen projections: NF4-rounded weights there, the original ones here.
    # To first order their gap is therefore the bare bases' gap (4-bit base minus full-precision base, same inputs),
    # element by element; what is left is second order, a product of the rounding error and the adapter's change,
    # bounded here by a quarter of the bases' gap. A merge onto the wrong base, or one that lost the adapter, its
    # embeddings or norms, would leave the adapter's whole effect in that residual, which is checked to be larger.
    gap = with_adapter_4bit - merged
    residual = (gap - base_gap).abs().max()
    bound = 0.25 * base_gap.abs().max()
    adapter_effect = (merged - without_adapter).abs().max()
    assert gap.abs().max() > 0 and residual <= bound, (residual, bound)
    assert adapter_effect > 2 * bound, (adapter_effect, bound)


def test_merging_onto_a_quantized_base_is_refused(tiny_base, tmp_path):
    from longlora_plugin import get_longlora_model, merge_longlora

    model = get_longlora_model(load_4bit(tiny_base), LongLoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="merge_longlora needs the full-precision base: this one is quantized"):
        merge_longlora(model, tmp_path / "merged")


def dequantized_copy(model_4bit, folder, attention):
    """The full-precision model with every 4-bit weight replaced by its dequantized value."""
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
    configure_s2(reference, group_size=model_4bit.config.s2_group_size)
    modules = dict(reference.named_modules())
    count = 0
    for name, module in model_4bit.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            modules[name].weight.data.copy_(weight)
            count += 1
    assert count == 7 * model_4bit.config.num_hidden_layers
    return reference


def test_s2_attention_on_a_4_bit_base_with_lora_equals_the_reference_on_the_dequantized_weights(tiny_base):
    quantized = load_4bit(tiny_base, attn_implementation=S2_ATTENTION)
    configure_s2(quantized, group_size=6)
    reference = dequantized_copy(quantized, tiny_base, REFERENCE)
    assert not torch.equal(reference.model.layers[0].self_attn.q_proj.weight,
                           AutoModelForCausalLM.from_pretrained(tiny_base).model.layers[0].self_attn.q_proj.weight)
    config = LongLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            modules_to_save=["embed_tokens", "norm"], init_lora_weights=False)
    results = []
    for model in (quantized, reference):
        torch.manual_seed(1)  # the same LoRA initialisation on both
        model = get_peft_model(model, copy.deepcopy(config))
        input_ids, mask, labels = padded_batch(259)
        results.append(logits_and_grads(model, input_ids, mask, labels))
    (logits, grads), (ref_logits, ref_grads) = results
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads) and any("embed" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"bits": 8}, "model.quantization.bits must be 4, got 8"),
        ({"quant_type": "int4"}, "model.quantization.quant_type must be one of \\('nf4', 'fp4'\\), got 'int4'"),
        ({"compute_dtype": "float64"}, "model.quantization.compute_dtype must be one of"),
        ({"double_quant": "yes"}, "model.quantization.double_quant must be true or false"),
        ({"bitz": 4}, "unknown keys in model.quantization: \\['bitz'\\]"),
        ("nf4", "model.quantization must be a mapping"),
    ],
)
def test_bad_quantization_settings_name_the_value(value, message):
    with pytest.raises(ValueError, match=message):
        quantization_from_recipe(value, "r.yaml")
