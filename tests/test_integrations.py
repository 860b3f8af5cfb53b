"""Launch configs under integrations/, and real multi-process / DeepSpeed runs of a recipe on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers.launch_setup import make_base_and_data, write_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = sorted((ROOT / "integrations" / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((ROOT / "integrations" / "deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type.value in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    if config.distributed_type.value == "DEEPSPEED":
        ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        assert ds_file in DEEPSPEED_CONFIGS


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=[p.stem for p in DEEPSPEED_CONFIGS])
def test_deepspeed_configs_are_valid_json_for_the_trainer(path):
    config = json.loads(path.read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] in (2, 3)
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.fixture(scope="module")
def launch_setup(tmp_path_factory):
    return make_base_and_data(tmp_path_factory.mktemp("launch"))


def launch(args: list[str], **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **env}
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def adapter_tensors(setup: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(setup / name / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_process_gloo_run_of_the_sft_recipe(launch_setup):
    recipe = write_recipe(launch_setup, "ddp")
    result = launch(
        ["--multi_gpu", "--num_processes", "2", "-m", "longlora_plugin.train", str(recipe)], ACCELERATE_USE_CPU="1"
    )
    assert "longlora: trained with DistributedDataParallel" in result.stdout
    tensors = adapter_tensors(launch_setup, "ddp")
    assert any("lora_A" in k for k in tensors) and any("embed_tokens" in k for k in tensors)


deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install '.[deepspeed]')")


@pytest.mark.slow
@deepspeed
def test_deepspeed_zero3_saves_the_same_real_embeddings_and_norms_as_zero2(launch_setup):
    # No ACCELERATE_USE_CPU here: it would make accelerate wrap the model in DDP instead of the DeepSpeed engine.
    for stage in (2, 3):
        recipe = write_recipe(launch_setup, f"zero{stage}")
        config = ROOT / "integrations" / "deepspeed" / f"zero{stage}.json"
        result = launch(
            ["--use_deepspeed", "--deepspeed_config_file", str(config), "--num_processes", "1",
             "-m", "longlora_plugin.train", str(recipe)],
        )
        assert f"longlora: trained with DeepSpeedEngine, ZeRO stage {stage}" in result.stdout
    zero2, zero3 = adapter_tensors(launch_setup, "zero2"), adapter_tensors(launch_setup, "zero3")
    assert zero2.keys() == zero3.keys()
    saved_modules = [k for k in zero3 if "lora_" not in k]
    assert any("embed_tokens" in k for k in saved_modules) and any("norm" in k for k in saved_modules)
    base = AutoModelForCausalLM.from_pretrained(launch_setup / "base")
    for key, tensor in zero3.items():
        assert tensor.numel() > 0, f"{key} was saved empty under ZeRO-3"
        torch.testing.assert_close(tensor, zero2[key], atol=1e-5, rtol=1e-4, msg=key)
    embedding = next(zero3[k] for k in saved_modules if "embed_tokens" in k)
    assert embedding.shape == base.get_input_embeddings().weight.shape
    assert not torch.equal(embedding, base.get_input_embeddings().weight)  # trained, not the base's copy
