"""The training entry point: a recipe in, a LongLoRA adapter out, trained by TRL's SFTTrainer.

    longlora train recipes/sft-longalpaca-llama2-7b-16k.yaml --training.output_dir runs/x
    accelerate launch --config_file integrations/accelerate/deepspeed_zero2.yaml -m longlora_plugin.train RECIPE.yaml

Progress bars, checkpoints, ``--training.resume_from_checkpoint`` and ``report_to`` logging are the Trainer's own.
The adapter (LoRA + embeddings + norms + longlora.json) is written to ``<output_dir>/adapter`` at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from .recipe import Recipe, load_recipe, parse_overrides

__all__ = ["build_trainer", "load_tokenizer", "main", "train"]

# The paper's hyper-parameters where a recipe says nothing (TRL's own defaults otherwise).
PAPER_DEFAULTS = dict(
    learning_rate=2e-5,
    weight_decay=0.0,
    warmup_steps=20,
    lr_scheduler_type="constant_with_warmup",
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    gradient_checkpointing=True,
    report_to="none",
)


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    from .data import byte_tokenizer

    name = recipe.model.tokenizer or recipe.model.name_or_path
    tokenizer = byte_tokenizer() if name == "bytes" else AutoTokenizer.from_pretrained(name, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name} has neither a pad token nor an eos token to pad with; set model.tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_output_dir(output_dir: str) -> None:
    """Fail now, not after hours of training, when the results could not be written."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".longlora-write-test"
    try:
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as error:
        raise ValueError(f"training.output_dir {path} is not writable: {error}") from error


def build_trainer(recipe: Recipe):
    """Tokenizer, data, base model + LongLoRA (position interpolation, S2-Attn, LoRA+), and the SFTTrainer."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from .adapter import apply_longlora_settings, check_modules_exist
    from .attention import S2_ATTENTION
    from .config import LongLoraConfig
    from .plugins import dataset_formats

    formats = dataset_formats()
    if recipe.data.format not in formats:
        raise ValueError(f"{recipe.source}: data.format {recipe.data.format!r} is not one of {sorted(formats)}")
    training = {**PAPER_DEFAULTS, **recipe.training}
    training.setdefault("output_dir", "runs/longlora")
    _check_output_dir(training["output_dir"])
    # Before the model: under DeepSpeed ZeRO-3 the arguments switch on partitioned loading in from_pretrained.
    args = SFTConfig(
        **training,
        max_length=recipe.context.target,
        packing=recipe.data.packing,
        padding_free=recipe.data.packing,
    )
    tokenizer = load_tokenizer(recipe)
    dataset = formats[recipe.data.format].prepare(recipe, tokenizer)  # validates every record before training

    dtype = recipe.model.dtype if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.name_or_path,
        dtype=dtype,
        attn_implementation=S2_ATTENTION,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    lora = recipe.lora
    config_kwargs: dict[str, Any] = dict(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        trainable_embeddings=lora.trainable_embeddings,
        trainable_norms=lora.trainable_norms,
        original_context=recipe.context.original,
        target_context=recipe.context.target,
        rope_type=recipe.context.rope_type,
        rope_rounding=recipe.context.rope_rounding,
        s2_group_size=recipe.group_size,
        s2_shift=recipe.s2.shift,
    )
    if lora.target_modules is not None:
        config_kwargs["target_modules"] = lora.target_modules
    config = LongLoraConfig.for_model(model, **config_kwargs)
    check_modules_exist(model, config)
    apply_longlora_settings(model, config)  # position interpolation and S2-Attn on the base
    # TRL wraps the model with peft itself, which it does in the way DeepSpeed ZeRO-3 needs.
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=config)


def train(recipe: Recipe):
    """Run a recipe; returns the trainer (its model is the trained PeftModel)."""
    from .adapter import save_longlora

    trainer = build_trainer(recipe)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    plugin = trainer.accelerator.state.deepspeed_plugin
    if trainer.accelerator.is_main_process:
        stage = f", ZeRO stage {plugin.zero_stage}" if plugin is not None else ""
        print(f"longlora: trained with {type(trainer.model_wrapped).__name__}{stage}", flush=True)
    # The wrapped model (a DeepSpeed engine under ZeRO) gathers ZeRO-3 shards; every rank must call this.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        save_longlora(
            trainer.accelerator.unwrap_model(trainer.model),
            Path(trainer.args.output_dir) / "adapter",
            tokenizer=trainer.processing_class,
            state_dict=state_dict,
        )
    trainer.accelerator.wait_for_everyone()
    return trainer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    recipe = load_recipe(argv[0], parse_overrides(argv[1:]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
