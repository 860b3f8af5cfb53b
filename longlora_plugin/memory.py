"""Memory for long sequences: the recipe's ``memory`` section, its application, and a model of one step's peak.

What bounds the longest sequence one device trains is not attention (S2-Attn and flash-style kernels keep it O(N))
but everything else: the activations each layer keeps for backward, the MLP's N x intermediate tensors when a layer
is recomputed, and the N x vocab logits. The options reuse what the libraries have:

- ``gradient_checkpointing``: transformers' non-reentrant activation checkpointing (keep one hidden state per layer,
  recompute the layer in backward);
- ``tiled_mlp: S``: DeepSpeed's ``TiledMLP`` (runs each MLP on S slices of the sequence, recomputing in backward),
  applied to the MLP modules a plugin names through the ``longlora_tiled_mlp`` hook;
- ``offload``: transformers' checkpoint offload, the per-layer checkpoints held in pinned host memory (CUDA only);
- the loss head: TRL's SFTTrainer always computes the loss with its fused, chunked LM head (no N x vocab logits).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "MemorySection",
    "apply_memory_options",
    "memory_training_arguments",
    "tile_mlp_forward",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class MemorySection:
    """The recipe's ``memory`` section."""

    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "non-reentrant activation checkpointing: one hidden state per layer is kept"},
    )
    tiled_mlp: int | None = field(
        default=None,
        metadata={"help": "run each MLP on this many slices of the sequence (DeepSpeed TiledMLP); null: off"},
    )
    offload: bool = field(
        default=False,
        metadata={"help": "hold the per-layer checkpoints in pinned host memory (CUDA only)"},
    )

    def validate(self, where: str = "memory") -> None:
        checks = [
            ("gradient_checkpointing", self.gradient_checkpointing, isinstance(self.gradient_checkpointing, bool),
             "true or false"),
            ("tiled_mlp", self.tiled_mlp, self.tiled_mlp is None or (_is_int(self.tiled_mlp) and self.tiled_mlp >= 2),
             "null or an int >= 2 (the number of sequence slices)"),
            ("offload", self.offload, isinstance(self.offload, bool), "true or false"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{where}: memory.{name} must be {allowed}, got {value!r}")
        if self.offload and not self.gradient_checkpointing:
            raise ValueError(
                f"{where}: memory.offload: true offloads the checkpoints of memory.gradient_checkpointing, "
                "which is false; switch checkpointing on or offload off"
            )


def memory_training_arguments(memory: MemorySection, training: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """The TrainingArguments keys the memory options set, merged into the recipe's ``training`` dict.

    The recipe's ``training.gradient_checkpointing`` / ``_kwargs`` win where given; otherwise checkpointing follows
    ``memory.gradient_checkpointing`` and is non-reentrant. ``memory.offload`` is refused without CUDA, since the
    checkpoints already live in host memory there (and pinning needs a CUDA device).
    """
    memory.validate(where)
    result = dict(training)
    result.setdefault("gradient_checkpointing", memory.gradient_checkpointing)
    if result["gradient_checkpointing"]:
        kwargs = dict(result.get("gradient_checkpointing_kwargs") or {})
        kwargs.setdefault("use_reentrant", False)
        if memory.offload:
            _check_offload_possible(where, training)
            kwargs["offload"] = True
        result["gradient_checkpointing_kwargs"] = kwargs
    elif memory.offload:
        raise ValueError(f"{where}: memory.offload needs gradient checkpointing, which training turns off")
    return result


def _check_offload_possible(where: str, training: dict[str, Any]) -> None:
    import torch

    if not torch.cuda.is_available() or training.get("use_cpu"):
        raise ValueError(
            f"{where}: memory.offload: true moves the per-layer checkpoints from the GPU to pinned host memory; "
            "this machine trains on the CPU, where they are in host memory already. Set memory.offload: false"
        )
    from transformers import PreTrainedModel

    enable = getattr(PreTrainedModel, "_activation_checkpointing_enable", None)
    if enable is None or "offload" not in inspect.signature(enable).parameters:
        import transformers

        raise ValueError(
            f"{where}: memory.offload needs transformers' checkpoint offload (5.24 or newer); this is "
            f"transformers {transformers.__version__}. Upgrade, or set memory.offload: false"
        )


def tile_mlp_forward(module: torch.nn.Module, shards: int) -> None:
    """Run ``module`` (a token-wise MLP taking and returning one (..., S, H) tensor) on ``shards`` sequence slices.

    DeepSpeed's ``TiledMLP`` keeps only the MLP's input for backward and recomputes each slice there, so the
    N x intermediate tensors exist one slice at a time. The module's own forward is kept and called per slice, so
    LoRA layers inside it keep working.
    """
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    if getattr(module, "_longlora_tiled_shards", None) is not None:
        module._longlora_tiled_shards = shards
        return
    plain_forward = module.forward

    def run_slice(_module, x):
        return plain_forward(x)

    def tiled_forward(self, x):
        if not torch.is_grad_enabled():  # inference: nothing is kept for backward, slicing would only cost time
            return plain_forward(x)
        trainable = [p for p in self.parameters() if p.requires_grad]
        return TiledMLP.apply(run_slice, self, x, min(self._longlora_tiled_shards, x.shape[-2]), trainable)

    module._longlora_tiled_shards = shards
    module.forward = types.MethodType(tiled_forward, module)


def _check_deepspeed(where: str) -> None:
    try:
        import deepspeed.runtime.sequence_parallel.ulysses_sp  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"{where}: memory.tiled_mlp uses DeepSpeed's TiledMLP, which could not be imported ({error}); "
            "install the deepspeed extra: pip install 'longlora-plugin[deepspeed]'"
        ) from None


def apply_memory_options(model: torch.nn.Module, memory: MemorySection, where: str = "recipe") -> list[str]:
    """Apply the model-side options (tiled MLP) to a loaded base model; returns the names of the tiled modules.

    Checkpointing and offload are training arguments (``memory_training_arguments``): the Trainer applies them.
    """
    from .plugins import get_plugin_manager

    memory.validate(where)
    if memory.tiled_mlp is None:
        return []
    _check_deepspeed(where)
    tiled = get_plugin_manager().hook.longlora_tiled_mlp(model=model, shards=memory.tiled_mlp)
    if not tiled:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"{where}: memory.tiled_mlp: no plugin knows how the MLP of model_type '{model_type}' tiles "
            "(implement the longlora_tiled_mlp hook); set memory.tiled_mlp: null"
        )
    return list(tiled)
