"""The training entry point: a recipe in, a LongLoRA adapter out, trained by TRL's SFTTrainer.

    longlora train recipes/sft-longalpaca-llama2-7b-16k.yaml --training.output_dir runs/x
    accelerate launch --config_file integrations/accelerate/deepspeed_zero2.yaml -m longlora_plugin.train RECIPE.yaml

Progress bars, checkpoints, ``--training.resume_from_checkpoint`` and ``report_to`` logging are the Trainer's own.
The adapter (LoRA + embeddings + norms + longlora.json) is written to ``<output_dir>/adapter`` at the end.

What can be checked is checked before training starts: local paths, the output folder (writable, room for a
checkpoint and the adapter), every data record, and that a checkpoint to resume from was written by the same setup.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .recipe import Recipe, load_recipe, parse_overrides

__all__ = ["RESUME_KEYS", "build_trainer", "check_resume_checkpoint", "load_tokenizer", "main", "train"]

# Adapter settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = (
    "r",
    "lora_alpha",
    "target_modules",
    "modules_to_save",
    "trainable_embeddings",
    "trainable_norms",
    "original_context",
    "target_context",
    "rope_type",
    "rope_rounding",
    "rope_options",
    "s2_group_size",
    "s2_shift",
    "s2_logit_scale",
)

# The paper's hyper-parameters where a recipe says nothing (TRL's own defaults otherwise).
PAPER_DEFAULTS = dict(
    learning_rate=2e-5,
    weight_decay=0.0,
    warmup_steps=20,
    lr_scheduler_type="constant_with_warmup",
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    activation_checkpointing=True,  # gradient_checkpointing before transformers 5.23: see compat.py
    report_to="none",
)


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer (``model.tokenizer``, else the model's own)."""
    from .data import load_tokenizer as load_named_tokenizer

    name = recipe.model.tokenizer or recipe.model.name_or_path
    return load_named_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code)


def _check_local_source(value: str | None, name: str, source: str) -> None:
    """A value that is plainly a path (absolute, ./, ../, ~, or with more than one '/') must exist.

    Anything else may be a hub id ('org/name'), which only loading can check.
    """
    if value is None or value == "bytes":
        return
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().exists():
        raise ValueError(f"{source}: {name} {value} does not exist (give a local folder or a hub id like 'org/name')")


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


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _check_free_space(trainer) -> None:
    """Fail now, not at the first save, when the disk cannot hold a checkpoint and the final adapter."""
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    adapter_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in trainable)
    saves_checkpoints = trainer.args.save_strategy != "no"
    optimizer_bytes = sum(getattr(p, "ds_numel", p.numel()) * 8 for p in trainable)  # AdamW: two fp32 moments
    needed = adapter_bytes + (adapter_bytes + optimizer_bytes if saves_checkpoints else 0)
    free = shutil.disk_usage(trainer.args.output_dir).free
    if free < needed:
        what = "one checkpoint and the final adapter" if saves_checkpoints else "the final adapter"
        raise ValueError(
            f"training.output_dir {trainer.args.output_dir} has {_megabytes(free)} free, but {what} need about "
            f"{_megabytes(needed)}; free some space or choose another output_dir"
        )


def _checkpoint_to_resume(args) -> Path | None:
    value = args.resume_from_checkpoint
    if value is None or value is False:
        return None
    if value is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise ValueError(
                f"training.resume_from_checkpoint is true, but {args.output_dir} holds no checkpoint-* folder"
            )
        return Path(last)
    if not Path(value).is_dir():
        raise ValueError(f"training.resume_from_checkpoint {value} is not a checkpoint folder")
    return Path(value)


def _comparable(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


def check_resume_checkpoint(checkpoint: str | os.PathLike, model) -> None:
    """Refuse a checkpoint written by another run: other adapter settings (RESUME_KEYS) or another base.

    ``model`` is the PeftModel about to train. The base is compared through the checkpoint's longlora.json, which
    this module writes into every checkpoint (older checkpoints lack it; their adapter settings are still compared).
    """
    from .adapter import LONGLORA_FILE, check_base_matches, read_longlora_settings

    checkpoint = Path(checkpoint)
    adapter_config = checkpoint / "adapter_config.json"
    if not adapter_config.is_file():
        raise ValueError(
            f"training.resume_from_checkpoint {checkpoint} is not a checkpoint of a LongLoRA run: "
            "it has no adapter_config.json"
        )
    saved = json.loads(adapter_config.read_text())
    current = model.peft_config["default"]
    differences = [
        f"{key}={saved.get(key)!r} there, {getattr(current, key)!r} here"
        for key in RESUME_KEYS
        if _comparable(saved.get(key)) != _comparable(getattr(current, key))
    ]
    if differences:
        raise ValueError(
            f"training.resume_from_checkpoint {checkpoint} comes from another run: {'; '.join(differences)}. "
            "Resume with the recipe that wrote it, or train into a fresh output_dir."
        )
    if (checkpoint / LONGLORA_FILE).is_file():
        check_base_matches(model.get_base_model().config, read_longlora_settings(checkpoint), checkpoint)


def _settings_in_checkpoints():
    """A callback that writes longlora.json into every checkpoint: resumes can check the base, and a checkpoint is
    a complete adapter folder that load_longlora reads."""
    from peft import PeftModel
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from .adapter import write_longlora_settings

    class SettingsInCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if state.is_world_process_zero and isinstance(model, PeftModel) and folder.is_dir():
                write_longlora_settings(model, folder)

    return SettingsInCheckpoints()


def build_trainer(recipe: Recipe):
    """Tokenizer, data, base model + LongLoRA (position interpolation, S2-Attn, LoRA+), and the SFTTrainer."""
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from .adapter import apply_longlora_settings, check_modules_exist
    from .hf_attention import S2_ATTENTION
    from .config import LongLoraConfig
    from .plugins import dataset_formats

    formats = dataset_formats()
    if recipe.data.format not in formats:
        raise ValueError(f"{recipe.source}: data.format {recipe.data.format!r} is not one of {sorted(formats)}")
    _check_local_source(recipe.model.name_or_path, "model.name_or_path", recipe.source)
    _check_local_source(recipe.model.tokenizer, "model.tokenizer", recipe.source)
    from .compat import checkpointing_arguments

    training = {**checkpointing_arguments(PAPER_DEFAULTS), **checkpointing_arguments(recipe.training)}
    training.setdefault("output_dir", "runs/longlora")
    _check_output_dir(training["output_dir"])
    # Before the model: under DeepSpeed ZeRO-3 the arguments switch on partitioned loading in from_pretrained.
    args = SFTConfig(
        **training,
        max_length=recipe.context.target,
        packing=recipe.data.packing,
        padding_free=recipe.data.packing,
    )
    checkpoint = _checkpoint_to_resume(args)
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
        rope_options=recipe.context.rope_options,
        s2_group_size=recipe.group_size,
        s2_shift=recipe.s2.shift,
        s2_logit_scale=recipe.s2.logit_scale,
    )
    if lora.target_modules is not None:
        config_kwargs["target_modules"] = lora.target_modules
    config = LongLoraConfig.for_model(model, **config_kwargs)
    check_modules_exist(model, config)
    apply_longlora_settings(model, config)  # position interpolation and S2-Attn on the base
    # TRL wraps the model with peft itself, which it does in the way DeepSpeed ZeRO-3 needs. Seeded first: TRL
    # (1.14 at least) draws the LoRA init before the Trainer seeds, so equal seeds would start from other weights.
    set_seed(args.seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[_settings_in_checkpoints()],
    )
    if checkpoint is not None:
        check_resume_checkpoint(checkpoint, trainer.model)
    _check_free_space(trainer)
    return trainer


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
