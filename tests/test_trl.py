"""LongLoraConfig and S2-Attn inside TRL's SFTTrainer, on CPU with a tiny model and a byte-level tokenizer."""

import pytest
import torch
from datasets import Dataset
from tests.helpers.families import tiny_config
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

import longlora_plugin.hf_attention as attention
from longlora_plugin.compat import checkpointing_arguments
from longlora_plugin import LongLoraConfig, S2_ATTENTION, trainable_parameter_report
from longlora_plugin.data import byte_tokenizer


def sft_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        max_length=96,
        activation_checkpointing=False,
        seed=0,
    )
    return SFTConfig(**checkpointing_arguments({**defaults, **overrides}))


def text_dataset(n=8):
    return Dataset.from_dict({"text": [f"record {i}: " + "lorem ipsum dolor sit amet " * (2 + i % 3) for i in range(n)]})


@pytest.mark.parametrize("checkpointing,resolved", [(False, True), (True, True), (False, False)])
def test_sft_trainer_takes_longlora_config_and_trains_with_s2(tmp_path, monkeypatch, checkpointing, resolved):
    calls = []
    real = attention.s2_attention
    monkeypatch.setattr(attention, "s2_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = tiny_config("llama", vocab_size=259, s2_group_size=16)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=S2_ATTENTION)
    trainer = SFTTrainer(
        model=model,
        args=sft_args(tmp_path, activation_checkpointing=checkpointing),
        train_dataset=text_dataset(),
        processing_class=byte_tokenizer(),
        peft_config=LongLoraConfig.for_model(model) if resolved else LongLoraConfig(),
    )
    report = trainable_parameter_report(trainer.model)
    assert report["lora"]["count"] > 0 and report["embeddings"]["count"] > 0 and report["norms"]["count"] > 0
    embed_before = trainer.model.get_input_embeddings().weight.detach().clone()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert calls, "S2-Attn was never called during SFT training"
    assert not torch.equal(trainer.model.get_input_embeddings().weight, embed_before)  # embeddings trained
