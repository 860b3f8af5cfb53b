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
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from .adapter import LONGLORA_FILE, check_base_matches, prepare_base, read_longlora_settings, save_longlora
from .adapter import write_longlora_settings
from .compat import checkpointing_arguments
from .config import LongLoraConfig
from .data import load_tokenizer as load_named_tokenizer
from .data.tokenizer import text_encoder
from .eval.selection import passkey_selection
from .hf_attention import S2_ATTENTION
from .memory import apply_memory_options, memory_training_arguments
from .plugins import dataset_formats
from .quantization import keep_trainable_modules_in_float32, prepare_quantized_base, quantization_from_recipe
from .sequence_parallel import sequence_parallel_trainer, sequence_parallel_training_arguments
from .recipe import Recipe, load_recipe, parse_overrides
from .sources import check_local_source

__all__ = ["build_trainer", "check_resume_checkpoint", "load_tokenizer", "main", "run_recipe", "train"]

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
    name = recipe.model.tokenizer or recipe.model.name_or_path
    return load_named_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code)


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


def _checkpoints_kept(args, total_steps: int) -> int:
    """How many checkpoints lie on disk at once: save_total_limit, or every one the run writes when unlimited."""
    if args.save_strategy == "no":
        return 0
    if args.save_strategy == "epoch":
        written = max(1, math.ceil(args.num_train_epochs))
    else:
        every = args.save_steps if args.save_steps >= 1 else max(1, math.ceil(args.save_steps * total_steps))
        written = max(1, total_steps // int(every))
    return written if not args.save_total_limit else min(written, args.save_total_limit)


def _total_steps(trainer) -> int:
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * max(1, args.world_size)))
    return math.ceil(batches / args.gradient_accumulation_steps * args.num_train_epochs)


def _check_free_space(trainer) -> None:
    """Fail now, not at a save, when the disk cannot hold the checkpoints the run keeps and the final adapter."""
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    adapter_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in trainable)
    optimizer_bytes = sum(getattr(p, "ds_numel", p.numel()) * 8 for p in trainable)  # AdamW: two fp32 moments
    checkpoints = _checkpoints_kept(trainer.args, _total_steps(trainer))
    needed = adapter_bytes + checkpoints * (adapter_bytes + optimizer_bytes)
    free = shutil.disk_usage(trainer.args.output_dir).free
    if free < needed:
        what = f"{checkpoints} checkpoint(s) and the final adapter" if checkpoints else "the final adapter"
        raise ValueError(
            f"training.output_dir {trainer.args.output_dir} has {_megabytes(free)} free, but {what} need about "
            f"{_megabytes(needed)}; free some space, lower training.save_total_limit or choose another output_dir"
        )


def _checkpoint_to_resume(args) -> Path | None:
    value = args.resume_from_checkpoint
    if value is None or value is False:
        return None
    if value is True:
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
    """Refuse a checkpoint written by another run: other adapter settings (LongLoraConfig.resume_keys()) or another
    base.

    ``model`` is the PeftModel about to train. The base is compared through the checkpoint's longlora.json, which
    this module writes into every checkpoint (older checkpoints lack it; their adapter settings are still compared).
    """
    checkpoint = Path(checkpoint)
    adapter_config = checkpoint / "adapter_config.json"
    if not adapter_config.is_file():
        raise ValueError(
            f"training.resume_from_checkpoint {checkpoint} is not a checkpoint of a LongLoRA run: "
            "it has no adapter_config.json"
        )
    saved = json.loads(adapter_config.read_text())
    current = model.peft_config["default"]
    defaults = type(current)()  # an older checkpoint lacks a key added since: it had the default
    differences = [
        f"{key}={saved.get(key, getattr(defaults, key))!r} there, {getattr(current, key)!r} here"
        for key in type(current).resume_keys()
        if _comparable(saved.get(key, getattr(defaults, key))) != _comparable(getattr(current, key))
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
    class SettingsInCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if state.is_world_process_zero and isinstance(model, PeftModel) and folder.is_dir():
                write_longlora_settings(model, folder)

    return SettingsInCheckpoints()


def _selection_callbacks(recipe: Recipe, tokenizer, args) -> list:
    selection = recipe.selection
    if not selection.enabled:
        return []
    if args.world_size > 1 or recipe.parallel.sequence_parallel > 1:
        raise ValueError(
            f"{recipe.source}: selection.passkey_every keeps a copy of the weights in one process; it needs a "
            f"single-process run, this one has {args.world_size} processes"
        )
    return [
        passkey_selection(
            text_encoder(tokenizer),
            length=selection.passkey_length or recipe.context.target,
            every=selection.passkey_every,
            trials=selection.passkey_trials,
            seed=selection.passkey_seed,
        )
    ]


def _quiet_other_libraries() -> None:
    """Keep a run's first screen to our output and the progress bar.

    accelerate imports DeepSpeed whenever it is installed, even for runs that do not use it, and DeepSpeed then warns
    that it guessed its CPU accelerator: on a machine without CUDA, name that choice through DeepSpeed's own switch.
    peft reads ``model.is_gradient_checkpointing``, which transformers 5.24 deprecates (not our call to change).
    """
    if "deepspeed" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def build_trainer(recipe: Recipe):
    """Tokenizer, data, base model + LongLoRA (position interpolation, S2-Attn, LoRA+), and the SFTTrainer."""
    formats = dataset_formats()
    if recipe.data.format not in formats:
        raise ValueError(f"{recipe.source}: data.format {recipe.data.format!r} is not one of {sorted(formats)}")
    check_local_source(recipe.model.name_or_path, f"{recipe.source}: model.name_or_path")
    check_local_source(recipe.model.tokenizer, f"{recipe.source}: model.tokenizer")
    _quiet_other_libraries()
    training = {
        **checkpointing_arguments(PAPER_DEFAULTS),
        **memory_training_arguments(recipe.memory, checkpointing_arguments(recipe.training), recipe.source),
    }
    training.setdefault("output_dir", "runs/longlora")
    _check_output_dir(training["output_dir"])
    # Before the model: under DeepSpeed ZeRO-3 the arguments switch on partitioned loading in from_pretrained.
    args = SFTConfig(
        **training,
        max_length=recipe.context.target,
        packing=recipe.data.packing,
        padding_free=recipe.data.packing,
        **sequence_parallel_training_arguments(recipe.parallel, training),
    )
    checkpoint = _checkpoint_to_resume(args)
    tokenizer = load_tokenizer(recipe)
    dataset = formats[recipe.data.format].prepare(recipe, tokenizer)  # validates every record before training

    dtype = recipe.model.dtype if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)
    quantization = quantization_from_recipe(recipe.model.quantization, recipe.source)
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.name_or_path,
        dtype=dtype,
        attn_implementation=S2_ATTENTION,
        trust_remote_code=recipe.model.trust_remote_code,
        **({"quantization_config": quantization.bnb_config()} if quantization else {}),
    )
    if quantization:
        model = prepare_quantized_base(model)
    apply_memory_options(model, recipe.memory, recipe.source)  # tiled MLP; checkpointing is in the arguments
    config = LongLoraConfig.for_model(model, **recipe.longlora_kwargs())
    prepare_base(model, config)  # position interpolation and S2-Attn on the base
    # TRL wraps the model with peft itself, which it does in the way DeepSpeed ZeRO-3 needs. Seeded first: TRL (1.14
    # at least) draws the LoRA init before the Trainer seeds, so equal seeds would start from other weights.
    set_seed(args.seed)
    callbacks = [_settings_in_checkpoints(), *_selection_callbacks(recipe, tokenizer, args)]
    trainer_class = sequence_parallel_trainer(SFTTrainer) if recipe.parallel.sequence_parallel > 1 else SFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=callbacks,
    )
    if quantization:
        keep_trainable_modules_in_float32(trainer.model)
    if checkpoint is not None:
        check_resume_checkpoint(checkpoint, trainer.model)
    _check_free_space(trainer)
    return trainer


def train(recipe: Recipe):
    """Run a recipe; returns the trainer (its model is the trained PeftModel)."""
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


def run_recipe(argv: list[str]):
    """``RECIPE.yaml --section.key value ...``: load, override, train."""
    recipe = load_recipe(argv[0], parse_overrides(argv[1:]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return train(recipe)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        run_recipe(argv)
    except (ValueError, OSError) as error:  # bad input: one line per rank; LONGLORA_DEBUG=1 shows the traceback
        if os.environ.get("LONGLORA_DEBUG", "0") not in ("", "0"):
            raise
        print(f"longlora: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
