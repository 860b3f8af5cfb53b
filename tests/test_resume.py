"""A run killed with SIGKILL after a checkpoint, then resumed, ends with the adapter of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from families import tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def write_run(folder: Path, name: str) -> Path:
    recipe = {
        "model": {"name_or_path": str(folder / "base"), "tokenizer": "bytes", "dtype": "float32"},
        "context": {"original": 64, "target": 256},
        "s2": {"group_size": 64},
        "data": {"format": "longalpaca", "path": str(folder / "data.jsonl"), "too_long": "truncate"},
        "training": {
            "output_dir": str(folder / name),
            "max_steps": 24,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "learning_rate": 5e-3,
            "bf16": False,
            "use_cpu": True,
            "gradient_checkpointing": False,
            "save_strategy": "steps",
            "save_steps": 4,
            "logging_steps": 1,
            "seed": 0,
            "data_seed": 0,
            "dataloader_num_workers": 0,
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_command(recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "longlora_plugin.train", str(recipe), *overrides]


ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=259, max_position_embeddings=64)).save_pretrained(
        tmp_path / "base"
    )
    records = [{"instruction": f"Echo {i}.", "output": f"echo {i} " * (1 + i % 4)} for i in range(24)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    straight = write_run(tmp_path, "straight")
    subprocess.run(train_command(straight), check=True, capture_output=True, env=ENV, timeout=600)

    killed = write_run(tmp_path, "killed")
    checkpoint = tmp_path / "killed" / "checkpoint-4"
    process = subprocess.Popen(train_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while not all((checkpoint / name).is_file() for name in ("trainer_state.json", "rng_state.pth", "optimizer.pt")):
        assert process.poll() is None, "the run ended before its step-4 checkpoint"
        assert time.time() < deadline, "no step-4 checkpoint within 5 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "adapter").exists()  # killed before the end

    subprocess.run(
        train_command(killed, "--training.resume_from_checkpoint", str(checkpoint)),
        check=True, capture_output=True, env=ENV, timeout=600,
    )
    expected = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
