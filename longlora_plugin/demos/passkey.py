"""``longlora demo``: LongLoRA extends a tiny byte-level Llama 4x on a CPU, with no downloads.

1. the short-context base (recipes/demo/base, 256 tokens, trained by recipes/demo/make_base.py) is evaluated on
   passkey retrieval with full attention at lengths up to the target (1024);
2. so is the base with position interpolation (factor 4) and no fine-tuning;
3. the recipe recipes/demo/passkey-tiny-cpu.yaml extends the base with LongLoRA (S2-Attn, LoRA, trainable
   embeddings and norms, position interpolation) through the same training entry point as every recipe, keeping the
   weights with the best held-out passkey score (the recipe's ``selection`` section);
4. the extended model is evaluated like the others; a table is printed and a PNG plot written.
Last, the attention kernel is timed at 8k tokens, S2-Attn against full causal SDPA.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..data.tokenizer import text_encoder
from ..eval.passkey import passkey_accuracy
from ..eval.plots import plot_passkey
from ..recipe import load_recipe
from ..rope import extend_rope
from ..train import load_tokenizer, train
from .timing import compare_kernel_times

__all__ = ["DEMO_RECIPE", "PasskeyDemoResult", "run_passkey_demo"]


def _recipes_dir() -> Path:
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "recipes", package.parent / "recipes"):
        if (candidate / "demo").is_dir():
            return candidate
    raise FileNotFoundError("the demo recipe was not found next to the package; run from a checkout of the repository")


DEMO_RECIPE = "demo/passkey-tiny-cpu.yaml"
GOAL_ACCURACY = 0.9


@dataclass
class PasskeyDemoResult:
    accuracy: dict[str, dict[int, float]]  # model label -> length -> passkey accuracy
    train_seconds: float
    speed: dict[int, tuple[float, float]]  # seq_len -> (S2 seconds, full SDPA seconds), attention kernel
    plot: Path | None
    target: int

    @property
    def extended_at_target(self) -> float:
        return self.accuracy[f"LongLoRA ({self.target})"][self.target]


def run_passkey_demo(*, overrides: dict | None = None, trials: int = 40, speed_lengths: tuple[int, ...] = (8192,), log=print) -> PasskeyDemoResult:
    recipe = load_recipe(_recipes_dir() / DEMO_RECIPE, overrides)
    adapter = recipe.longlora_config()
    original, target = recipe.context.original, recipe.context.target
    tokenizer = load_tokenizer(recipe)

    encode = text_encoder(tokenizer)

    lengths = list(range(original, target + 1, original))

    def evaluate(model) -> dict[int, float]:
        return {n: passkey_accuracy(model, encode, n, trials, seed=1234, intro="") for n in lengths}

    def load_base():
        return AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=torch.float32)

    accuracy: dict[str, dict[int, float]] = {}
    log(f"base model: {recipe.model.name_or_path} ({original}-token context); passkey, {trials} trials per length")
    accuracy[f"base ({original})"] = evaluate(load_base())
    interpolated = load_base()
    rope_type = adapter.rope_type
    factor = extend_rope(
        interpolated, target, original_length=original, rope_type=rope_type, rope_options=adapter.rope_options
    )
    accuracy[f"{rope_type} interpolation x{factor:g}, no fine-tuning"] = evaluate(interpolated)

    steps = recipe.training.get("max_steps")
    scale = "" if recipe.s2.logit_scale == 1.0 else f" (training logits x{recipe.s2.logit_scale:g})"
    log(f"LongLoRA: {original} -> {target} tokens, S2-Attn G={recipe.group_size}{scale}, LoRA r={adapter.r} + "
        f"embeddings + norms, {rope_type} interpolation, {steps} steps of batch "
        f"{recipe.training.get('per_device_train_batch_size')}, training seed {recipe.training.get('seed', 42)}")
    start = time.perf_counter()
    trainer = train(recipe)
    train_seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses:
        log("  training loss: " + ", ".join(f"{loss:.3f}" for loss in losses))
    scored = [(entry["step"], value) for entry in trainer.state.log_history for key, value in entry.items()
              if key.startswith("passkey_")]
    if scored:
        chosen = next(entry for entry in trainer.state.log_history if "selected_step" in entry)
        log(f"  held-out passkey at {target} (seed {recipe.selection.passkey_seed}, {recipe.selection.passkey_trials} "
            "trials) by step: " + ", ".join(f"{step}: {100 * value:.0f}%" for step, value in scored))
        log(f"  kept the weights of step {chosen['selected_step']}")
    extended = trainer.model.eval()
    accuracy[f"LongLoRA ({target})"] = evaluate(extended)
    log(f"  trained in {train_seconds:.0f}s; adapter in {Path(trainer.args.output_dir) / 'adapter'}")

    header = f"{'model':44s}" + "".join(f"{n:>8d}" for n in lengths)
    log("\npasskey retrieval accuracy (full attention, greedy exact match)")
    log(header)
    for label, by_length in accuracy.items():
        log(f"{label:44s}" + "".join(f"{100 * by_length[n]:7.0f}%" for n in lengths))
    output_dir = Path(trainer.args.output_dir)
    plot = plot_passkey(
        accuracy, output_dir / "passkey.png", trained_length=target, title=f"Tiny Llama, {original} -> {target} tokens"
    )
    (output_dir / "passkey.json").write_text(json.dumps({"lengths": lengths, "accuracy": accuracy, "trials": trials}, indent=2))
    log(f"plot: {plot}")
    verdict = "reached" if accuracy[f"LongLoRA ({target})"][target] >= GOAL_ACCURACY else "NOT reached"
    log(f"goal: LongLoRA >= {GOAL_ACCURACY:.0%} at {target} tokens: {verdict}")

    speed = compare_kernel_times(speed_lengths, log=log)
    return PasskeyDemoResult(accuracy=accuracy, train_seconds=train_seconds, speed=speed, plot=plot, target=target)
