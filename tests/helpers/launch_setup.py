"""A tiny saved base model, a LongAlpaca data file and recipes over them, for tests that launch real training runs."""

import json
from pathlib import Path

import torch
import yaml
from tests.helpers.families import tiny_config
from transformers import AutoModelForCausalLM


def make_base_and_data(folder: Path, records: int = 16) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=259, max_position_embeddings=64))
    model.save_pretrained(folder / "base")
    rows = [{"instruction": f"Echo {i}.", "output": f"echo {i} " * (1 + i % 4)} for i in range(records)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_recipe(folder: Path, name: str, **training) -> Path:
    """A recipe over make_base_and_data's files; ``training`` keys override the defaults below."""
    recipe = {
        "model": {"name_or_path": str(folder / "base"), "tokenizer": "bytes", "dtype": "float32"},
        "context": {"original": 64, "target": 256},
        "s2": {"group_size": 64},
        "data": {"format": "longalpaca", "path": str(folder / "data.jsonl"), "too_long": "truncate"},
        "training": {
            "output_dir": str(folder / name),
            "max_steps": 3,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "bf16": False,
            "activation_checkpointing": False,
            "save_strategy": "no",
            "logging_steps": 1,
            "seed": 0,
            "data_seed": 0,
            **training,
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
