"""Unmodified clients gain S2-Attn by one flag: TRL's own CLI (plain, LoRA, packing), the same script under
``accelerate launch`` with 2 CPU processes, a plain ``transformers.Trainer`` script and a plain peft script.

Each runs in a subprocess on a local tiny model folder (with the byte tokenizer saved next to it) and a local data
file. S2-Attn is shown to be the path taken by the INFO line hf_attention.py logs on the first S2 training forward.
The scripts reach s2_attention through the autoload .pth that installing the package puts in site-packages.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers.families import tiny_config
from transformers import AutoModelForCausalLM

from longlora_plugin.data import byte_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
S2_LINE = "s2_attention: training with S2-Attn"

pytestmark = pytest.mark.slow


def client_env(**extra):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's package
    return {
        **os.environ,
        "PYTHONPATH": path,
        "TRANSFORMERS_VERBOSITY": "info",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def run_client(command, tmp_path, **extra_env):
    result = subprocess.run(
        [str(c) for c in command], cwd=tmp_path, env=client_env(**extra_env), capture_output=True, text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """A tiny llama folder with its fast tokenizer, and a data folder with one JSON-lines file of text records."""
    root = tmp_path_factory.mktemp("clients")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=259, max_position_embeddings=256))
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    (root / "data").mkdir()
    rows = [{"text": f"record {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 3)} for i in range(16)]
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def sft_arguments(files, out):
    return [
        "--model_name_or_path", files / "model", "--dataset_name", files / "data",
        "--attn_implementation", "s2_attention",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "64", "--learning_rate", "1e-3",
        "--output_dir", out, "--use_cpu", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
        "--logging_steps", "1",
    ]  # fmt: skip


@pytest.mark.parametrize("flags", [[], ["--use_peft"], ["--packing"]], ids=["plain", "peft", "packing"])
def test_trl_sft_cli_trains_with_s2(local_files, tmp_path, flags):
    out = tmp_path / "out"
    output = run_client([BIN / "trl", "sft", *sft_arguments(local_files, out), *flags], tmp_path)
    assert S2_LINE in output
    assert "'train_loss'" in output
    saved = "adapter_config.json" if "--use_peft" in flags else "model.safetensors"
    assert (out / saved).is_file()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trl_sft_script_under_accelerate_launch_with_two_cpu_processes(local_files, tmp_path):
    launch = [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()]
    command = [*launch, "-m", "trl.scripts.sft", *sft_arguments(local_files, tmp_path / "out"), "--use_peft", "--packing"]
    output = run_client(command, tmp_path, ACCELERATE_USE_CPU="1")
    assert S2_LINE in output
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in output  # 2 ranks x 2 rows
    assert (tmp_path / "out" / "adapter_config.json").is_file()


TRAINER_SCRIPT = """
import json, sys
from datasets import load_dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)

model_dir, data_dir, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="s2_attention")
data = load_dataset(data_dir, split="train").map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                         use_cpu=True, report_to="none", save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=data,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
result = trainer.train()
print(json.dumps({"attention": model.config._attn_implementation, "loss": result.training_loss}))
"""


def test_plain_trainer_script_without_importing_the_plugin(local_files, tmp_path):
    assert "longlora" not in TRAINER_SCRIPT
    script = tmp_path / "train.py"
    script.write_text(TRAINER_SCRIPT)
    output = run_client([sys.executable, script, local_files / "model", local_files / "data", tmp_path / "out"], tmp_path)
    assert S2_LINE in output
    result = json.loads(_last_json(output))
    assert result["attention"] == "s2_attention" and math.isfinite(result["loss"])


PEFT_SCRIPT = """
import json, sys
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from longlora_plugin import LongLoraConfig

model_dir, out = sys.argv[1:3]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="s2_attention"),
                       LongLoraConfig(r=4))
batch = tokenizer(["some words of text " * 4, "fewer words"], padding=True, return_tensors="pt")
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for _ in range(2):
    model(**batch, labels=labels, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
with torch.no_grad():
    trained = model(**batch).logits
model.save_pretrained(out)
reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
with torch.no_grad():
    again = reloaded(**batch).logits
real = batch["attention_mask"].bool()
print(json.dumps({
    "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
    "reload_max_diff": (trained[real] - again[real]).abs().max().item(),
    "attention": reloaded.config._attn_implementation,
}))
"""


def _last_json(output):
    return next(line for line in reversed(output.splitlines()) if line.startswith("{"))


def test_plain_peft_script_with_longlora_config(local_files, tmp_path):
    script = tmp_path / "peft_train.py"
    script.write_text(PEFT_SCRIPT)
    output = run_client([sys.executable, script, local_files / "model", tmp_path / "adapter"], tmp_path)
    assert S2_LINE in output
    result = json.loads(_last_json(output))
    trainable = result["trainable"]
    assert any(".lora_A." in name for name in trainable)
    assert any("embed_tokens.modules_to_save" in name for name in trainable)
    assert any("norm.modules_to_save" in name for name in trainable)
    # Reloaded with the default attention: eval-mode S2 is full attention, and the trained embeddings/norms load.
    assert result["attention"] != "s2_attention" and result["reload_max_diff"] < 1e-5
