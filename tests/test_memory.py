"""The memory options: tiled MLP is exact, checkpointing is non-reentrant, offload and bad values are refused clearly,
and the recipes get TRL's fused LM-head loss."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tests.helpers.families import tiny_config
from tests.helpers.tiny import byte_corpus, tiny_llama
from transformers import AutoModelForCausalLM

from longlora_plugin import LongLoraConfig
from longlora_plugin.memory import MemorySection, apply_memory_options, memory_training_arguments
from longlora_plugin.recipe import recipe_from_dict
from longlora_plugin.train import build_trainer

pytest.importorskip("deepspeed")


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_tiled_mlp_gives_the_loss_and_gradients_of_the_plain_model(shards):
    plain = tiny_llama(hidden_size=64, s2_group_size=32).train()
    tiled = copy.deepcopy(plain)
    names = apply_memory_options(tiled, MemorySection(tiled_mlp=shards))
    assert names == [f"model.layers.{i}.mlp" for i in range(plain.config.num_hidden_layers)]
    batch = byte_corpus(2 * 96).view(2, 96)  # 96 tokens: 7 slices are uneven
    want_loss, want = loss_and_grads(plain, batch)
    got_loss, got = loss_and_grads(tiled, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tiled_mlp_with_lora_on_the_mlp_and_checkpointing_matches_the_plain_model():
    config = LongLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                            modules_to_save=["embed_tokens", "norm"], init_lora_weights=False)
    plain = tiny_llama(hidden_size=64, s2_group_size=32).train()
    tiled = copy.deepcopy(plain)
    apply_memory_options(tiled, MemorySection(tiled_mlp=4))
    plain, tiled = get_peft_model(plain, copy.deepcopy(config)), get_peft_model(tiled, copy.deepcopy(config))
    tiled.load_state_dict(plain.state_dict())
    tiled.gradient_checkpointing_enable({"use_reentrant": False})
    tiled.enable_input_require_grads()
    batch = byte_corpus(128).view(1, 128)
    want_loss, want = loss_and_grads(plain, batch)
    got_loss, got = loss_and_grads(tiled, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert any("gate_proj.lora_A" in name for name in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tiled_mlp_leaves_inference_unchanged():
    model = tiny_llama(hidden_size=64, s2_group_size=32).eval()
    batch = byte_corpus(64).view(1, 64)
    with torch.no_grad():
        want = model(input_ids=batch).logits
        apply_memory_options(model, MemorySection(tiled_mlp=4))
        torch.testing.assert_close(model(input_ids=batch).logits, want)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (dict(tiled_mlp=1), "memory.tiled_mlp must be null or an int >= 2"),
        (dict(tiled_mlp=True), "memory.tiled_mlp must be null or an int >= 2"),
        (dict(tiled_mlp="4"), "memory.tiled_mlp must be null or an int >= 2"),
        (dict(offload="yes"), "memory.offload must be true or false"),
        (dict(gradient_checkpointing=1), "memory.gradient_checkpointing must be true or false"),
        (dict(offload=True, gradient_checkpointing=False), "offloads the checkpoints"),
    ],
)
def test_bad_memory_options_name_the_value(section, message):
    with pytest.raises(ValueError, match=message):
        MemorySection(**section).validate("r.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, where offload is allowed")
def test_offload_is_refused_on_cpu():
    with pytest.raises(ValueError, match="memory.offload: true moves the per-layer checkpoints.*Set memory.offload: false"):
        memory_training_arguments(MemorySection(offload=True), {})


def test_checkpointing_defaults_to_non_reentrant_and_the_recipe_keeps_its_own_kwargs():
    from longlora_plugin.compat import activation_checkpointing_name

    name = activation_checkpointing_name()  # activation_checkpointing from transformers 5.23 on
    assert memory_training_arguments(MemorySection(), {}) == {name: True, f"{name}_kwargs": {"use_reentrant": False}}
    assert memory_training_arguments(MemorySection(gradient_checkpointing=False), {}) == {name: False}
    for spelling in ("gradient_checkpointing", "activation_checkpointing"):  # a recipe may use either
        kept = {spelling: True, f"{spelling}_kwargs": {"use_reentrant": True}}
        assert memory_training_arguments(MemorySection(), kept)[f"{name}_kwargs"] == {"use_reentrant": True}


def test_a_family_without_mlp_modules_is_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no plugin knows how the MLP of model_type 'Sequential' tiles"):
        apply_memory_options(model, MemorySection(tiled_mlp=2))


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_long_context_recipes_checkpoint_without_reentrancy(path):
    import yaml

    training = yaml.safe_load(path.read_text())["training"]
    assert training["activation_checkpointing"] is True  # the current name; compat.py renames it where older
    assert training["activation_checkpointing_kwargs"] == {"use_reentrant": False}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=259, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_a_recipe_trains_with_tiled_mlp_checkpointing_and_trls_fused_lm_head(tiny_base, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Echo {i}.", "output": f"echo {i}"}) + "\n" for i in range(4)))
    raw = {
        "model": {"name_or_path": str(tiny_base), "tokenizer": "bytes", "dtype": "float32"},
        "context": {"original": 64, "target": 256},
        "s2": {"group_size": 64},
        "data": {"format": "longalpaca", "path": str(data), "too_long": "truncate"},
        "memory": {"tiled_mlp": 2},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 2,
                     "bf16": False, "use_cpu": True, "save_strategy": "no", "report_to": "none"},
    }
    trainer = build_trainer(recipe_from_dict(raw))
    assert trainer.args.gradient_checkpointing and trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    # What SFTTrainer.compute_loss needs to take the fused, chunked LM-head path (no N x vocab logits):
    assert trainer.args.loss_type == "nll" and trainer.compute_loss_func is None and trainer.label_smoother is None
    seen = []
    forward = trainer.model.get_base_model().forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("fused_lm_head"))
        output = forward(*args, **kwargs)
        seen.append(type(output).__name__)
        return output

    trainer.model.get_base_model().forward = spy
    tiled = trainer.model.get_base_model().model.layers[0].mlp
    assert tiled._longlora_tiled_shards == 2
    trainer.train()
    assert seen[:2] == [True, "FusedCausalLMOutput"]


# --- the memory model -------------------------------------------------------------------------------------------

LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)


def test_weight_and_state_terms_count_the_parameters_of_a_real_longlora_model():
    from longlora_plugin import get_longlora_model
    from longlora_plugin.memory import estimate_step_memory

    model = tiny_llama(hidden_size=64)
    config = model.config
    model = get_longlora_model(model, LongLoraConfig.for_model(model, r=8))
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # modules_to_save copies included
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    estimate = estimate_step_memory(config, 128, dtype="float32", lora_r=8, device="cpu")
    assert estimate.terms["weights"] == held
    assert estimate.terms["trainable_state"] == 3 * trainable  # gradient + AdamW's two moments


def test_memory_model_terms_follow_the_options():
    from transformers import LlamaConfig

    from longlora_plugin.memory import estimate_step_memory

    config = LlamaConfig(**{k: v for k, v in LLAMA2_7B.items() if k != "model_type"})
    base = estimate_step_memory(config, 65536)
    double = estimate_step_memory(config, 131072)
    assert double.terms["checkpoints"] == 2 * base.terms["checkpoints"] > 0
    assert double.terms["weights"] == base.terms["weights"]
    assert estimate_step_memory(config, 65536, offload=True).terms["checkpoints"] == 0
    assert estimate_step_memory(config, 65536, tiled_mlp=16).terms["layer_recompute"] < base.terms["layer_recompute"]
    qlora = estimate_step_memory(config, 65536, quantization_bits=4)
    assert qlora.terms["weights"] < 0.45 * base.terms["weights"]
    assert qlora.terms["checkpoints"] == 2 * base.terms["checkpoints"]  # fp32 residual stream after k-bit preparation
    hf = estimate_step_memory(config, 65536, attention="sdpa", gradient_checkpointing=False, loss="hf")
    assert hf.terms["loss_head"] > 65536 * 32000 * 2  # full logits, at least once in bf16
    with pytest.raises(ValueError, match="loss must be one of \\('fused', 'hf'\\), got 'liger'"):
        estimate_step_memory(config, 4096, loss="liger")
    with pytest.raises(ValueError, match="offload applies to the checkpoints"):
        estimate_step_memory(config, 4096, offload=True, device="cpu")


def test_plan_says_what_fits_and_when_sequence_parallelism_is_needed(tmp_path, capsys):
    from longlora_plugin.cli import main as cli

    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    cli(["plan", str(path), "--length", "262144", "--memory-gib", "140.4"])
    out = capsys.readouterr().out
    assert "hf-defaults" in out and "does not fit" in out
    assert "fits with stack: memory.tiled_mlp: 64" in out
    cli(["plan", str(path), "--length", "4194304", "--memory-gib", "79.6"])
    assert "sequence parallelism (DeepSpeed Ulysses) with P = " in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # one line, exit status 2
        cli(["plan", "no-such/model-here", "--length", "4096"])
    assert refused.value.code == 2 and "longlora: error: no config.json at no-such/model-here" in capsys.readouterr().err
