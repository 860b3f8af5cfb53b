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

from .compat import activation_checkpointing_name, checkpointing_arguments
from .settings import _is_int

if TYPE_CHECKING:
    import torch

__all__ = [
    "MemorySection",
    "DEVICE_MEMORY",
    "SETUPS",
    "StepMemory",
    "estimate_step_memory",
    "longest_fitting",
    "plan_report",
    "stack_options",
    "apply_memory_options",
    "memory_training_arguments",
    "tile_mlp_forward",
]


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

    The recipe's ``training.activation_checkpointing`` (or ``gradient_checkpointing``) / ``_kwargs`` win where given; otherwise checkpointing follows
    ``memory.gradient_checkpointing`` and is non-reentrant. ``memory.offload`` is refused without CUDA, since the
    checkpoints already live in host memory there (and pinning needs a CUDA device).
    """
    memory.validate(where)
    result = checkpointing_arguments(training)  # either spelling, renamed to this transformers' one
    name = activation_checkpointing_name()
    result.setdefault(name, memory.gradient_checkpointing)
    if result[name]:
        kwargs = dict(result.get(f"{name}_kwargs") or {})
        kwargs.setdefault("use_reentrant", False)
        if memory.offload:
            _check_offload_possible(where, training)
            kwargs["offload"] = True
        result[f"{name}_kwargs"] = kwargs
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


# ---------------------------------------------------------------------------------------------------------------------
# The memory model: the peak bytes of one training step (batch 1, N tokens), from the model config alone.
# Per-layer tensor counts are those of a llama-like decoder layer (norm, q/k/v/o with LoRA, RoPE, attention, gated
# MLP) as autograd keeps them; they were calibrated against measured CPU steps (benchmarks/bench_memory.py,
# docs/memory.md), which is also where their limits are stated.
HIDDEN_SAVED = 10.2  # hidden-sized (N x H) tensors one layer keeps for backward: norms, q/k/v, rope, attention, residuals
INNER_SAVED = 3.0  # intermediate-sized (N x I) tensors: gate, act(gate), up
HIDDEN_BACKWARD = 2.0  # extra N x H gradients alive while one layer runs backward
INNER_BACKWARD = 2.0  # extra N x I gradients (d act, d up) alive in the MLP's backward
TILED_HIDDEN = 2.0  # TiledMLP's own N x H buffers: the input gradient it fills slice by slice, the concatenated output
TOKEN_TILE = 4096  # TRL's fused LM head projects 4096 tokens at a time ...
VOCAB_TILE = 32768  # ... against 32768 vocabulary rows (trl/kernels/chunked_logprob.py)
CPU_FUSED_TILES = 8.0  # TRL's torch fallback (no Triton) keeps about 8 fp32 tiles alive (exp, log_p, p, grad...)
HF_LOSS_FP32_COPIES = 3.0  # the model's own loss: logits, then fp32 log-softmax, its gradient and the logits gradient
CUDA_RUNTIME_BYTES = 1.5 * 2**30  # CUDA context, cuBLAS/flash workspaces and allocator slack, on a GPU

ATTENTIONS = ("s2", "sdpa", "flash")
LOSSES = ("fused", "hf")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class StepMemory:
    """The named terms of one step's peak, in bytes; ``total`` is their sum."""

    terms: dict[str, float]
    seq_len: int
    options: dict[str, Any]

    @property
    def total(self) -> float:
        return float(sum(self.terms.values()))


def _shape(config: Any) -> dict[str, int]:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return dict(
        hidden=hidden,
        inner=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def _lora_parameters(shape: dict[str, int], rank: int, targets: tuple[str, ...]) -> int:
    h, q, kv, i = shape["hidden"], shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"], shape["inner"]
    sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    unknown = sorted(set(targets) - set(sizes))
    if unknown:
        raise ValueError(f"lora targets {unknown} are not llama-like projections; known: {sorted(sizes)}")
    return shape["layers"] * sum(rank * (sizes[t][0] + sizes[t][1]) for t in targets)


def estimate_step_memory(
    config: Any,
    seq_len: int,
    *,
    dtype: str = "bfloat16",
    quantization_bits: int | None = None,
    lora_r: int = 8,
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    trainable_embeddings: bool = True,
    trainable_norms: bool = True,
    attention: str = "s2",
    gradient_checkpointing: bool = True,
    tiled_mlp: int | None = None,
    offload: bool = False,
    loss: str = "fused",
    device: str = "cuda",
) -> StepMemory:
    """The peak bytes of one LongLoRA training step of batch 1 and ``seq_len`` tokens, as named terms.

    ``config``: a transformers config of a llama-like model (config only, no weights). ``dtype``: the weights' and
    activations' dtype ("bfloat16", "float16", "float32"); ``quantization_bits=4``: QLoRA (NF4 double-quant frozen
    projections; peft's k-bit preparation keeps embeddings, norms and head, and so the residual stream, in float32).
    ``attention``: "s2", "sdpa" or "flash", all O(N) in memory (S2 and SDPA measured equal); eager attention's
    N x N scores are not modelled.
    ``loss``: "fused" (TRL SFTTrainer's chunked LM head) or "hf" (the model's own loss over full logits).
    ``device``: "cuda" (TRL's Triton loss kernel, plus CUDA_RUNTIME_BYTES) or "cpu" (TRL's torch fallback).

    Terms: weights (frozen and trainable, peft's copies of embeddings and norms), trainable state (gradients and
    AdamW's two moments for LoRA, embeddings, norms), checkpoints (one hidden state per layer, 0 when offloaded;
    every layer's activations without checkpointing), layer recompute (one layer's activations and gradients in
    backward), loss head, and runtime (CUDA only).
    """
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    if dtype not in sizes:
        raise ValueError(f"dtype must be one of {sorted(sizes)}, got {dtype!r}")
    checks = [
        ("seq_len", seq_len, _is_int(seq_len) and seq_len >= 1, "a positive int"),
        ("quantization_bits", quantization_bits, quantization_bits in (None, 4), "None or 4"),
        ("attention", attention, attention in ATTENTIONS, f"one of {ATTENTIONS}"),
        ("loss", loss, loss in LOSSES, f"one of {LOSSES}"),
        ("device", device, device in DEVICES, f"one of {DEVICES}"),
        ("tiled_mlp", tiled_mlp, tiled_mlp is None or (_is_int(tiled_mlp) and tiled_mlp >= 2), "None or an int >= 2"),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if offload and (device != "cuda" or not gradient_checkpointing):
        raise ValueError("offload applies to the checkpoints of gradient checkpointing on a CUDA device")
    s = _shape(config)
    n, h, i, v, layers = seq_len, s["hidden"], s["inner"], s["vocab"], s["layers"]
    q_width, kv_width = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    act = sizes[dtype]
    # QLoRA: embeddings, norms and head are float32 after peft's k-bit preparation, so the residual stream is too
    residual = 4 if quantization_bits else act
    full_bytes = 4 if quantization_bits else act

    projections = layers * (h * (q_width + 2 * kv_width) + q_width * h + 3 * h * i)
    embedding = v * h
    head = 0 if s["tied"] else v * h
    norms = (2 * layers + 1) * h
    if quantization_bits:
        projection_bytes = projections * (0.5 + (1 + 4 / 256) / 64)  # 4 bits + double-quantized absmax per 64
    else:
        projection_bytes = projections * act
    lora = _lora_parameters(s, lora_r, tuple(lora_targets))
    lora_bytes = 2 if quantization_bits else act  # TRL casts a quantized model's LoRA to bfloat16
    copies = (embedding if trainable_embeddings else 0) + (norms if trainable_norms else 0)  # peft modules_to_save
    weights = projection_bytes + (embedding + head + norms + copies) * full_bytes + lora * lora_bytes
    # gradients and AdamW's exp_avg / exp_avg_sq, each in the parameter's dtype
    trainable_state = 3 * (lora * lora_bytes + copies * full_bytes)

    layer_saved = n * (HIDDEN_SAVED * h * residual + INNER_SAVED * i * act / (tiled_mlp or 1))
    layer_backward = n * (HIDDEN_BACKWARD * h * residual + INNER_BACKWARD * i * act / (tiled_mlp or 1))
    if tiled_mlp:
        layer_backward += n * TILED_HIDDEN * h * act
    if gradient_checkpointing:
        checkpoints = 0.0 if offload else layers * n * h * residual
        recompute = layer_saved + layer_backward
    else:
        checkpoints = layers * layer_saved
        recompute = layer_backward

    logits_rows = n
    tokens_per_tile = min(n, TOKEN_TILE)
    if loss == "hf":
        loss_head = logits_rows * v * (act + 4 * HF_LOSS_FP32_COPIES)
    elif device == "cuda":  # one tile in the compute dtype, fp32 gradient of the hidden states, the gathered hidden
        loss_head = tokens_per_tile * min(v, VOCAB_TILE) * act + n * h * (4 + residual)
    else:
        loss_head = CPU_FUSED_TILES * tokens_per_tile * v * 4 + n * h * (4 + residual)
    # The loss head's temporaries are gone before the last layer runs backward, so the two peaks do not add up;
    # without checkpointing every layer's activations are still held while either runs.
    activations = {"checkpoints": checkpoints, "layer_recompute": recompute if recompute > loss_head else 0.0,
                   "loss_head": loss_head if loss_head >= recompute else 0.0}
    terms = {
        "weights": float(weights),
        "trainable_state": float(trainable_state),
        **{k: float(val) for k, val in activations.items()},
        "runtime": CUDA_RUNTIME_BYTES if device == "cuda" else 0.0,
    }
    options = dict(dtype=dtype, quantization_bits=quantization_bits, attention=attention, loss=loss, device=device,
                   gradient_checkpointing=gradient_checkpointing, tiled_mlp=tiled_mlp, offload=offload)
    return StepMemory(terms=terms, seq_len=seq_len, options=options)


# ---------------------------------------------------------------------------------------------------------------------
# Projections: the longest sequence one step fits in a device's memory, and `longlora plan`.
GIB = 2**30
DEVICE_MEMORY = {"80 GB (A100/H100)": 81559 * 2**20, "141 GB (H200)": 143771 * 2**20}  # as nvidia-smi reports them


def stack_options(name: str, seq_len: int, config: Any) -> dict[str, Any]:
    """The memory options of a named setup: "hf-defaults" (SDPA, no checkpointing, the model's own loss over full
    logits), "stack" (S2-Attn, non-reentrant checkpointing, TRL's fused loss, MLP tiled in slices of H tokens) and
    "stack+offload" (the same, checkpoints in host memory)."""
    if name == "hf-defaults":
        return dict(attention="sdpa", gradient_checkpointing=False, loss="hf")
    hidden = _shape(config)["hidden"]
    shards = max(2, -(-seq_len // hidden))  # DeepSpeed's rule: slices of about H tokens
    options = dict(attention="s2", gradient_checkpointing=True, loss="fused", tiled_mlp=shards)
    if name == "stack+offload":
        options["offload"] = True
    elif name != "stack":
        raise ValueError(f"setup must be 'hf-defaults', 'stack' or 'stack+offload', got {name!r}")
    return options


SETUPS = ("hf-defaults", "stack", "stack+offload")


def longest_fitting(config: Any, capacity_bytes: float, setup: str, step: int = 1024, **model: Any) -> int:
    """The longest N (a multiple of ``step``) whose estimated step fits in ``capacity_bytes``; 0 if none does."""

    def fits(n: int) -> bool:
        return estimate_step_memory(config, n, **stack_options(setup, n, config), **model).total <= capacity_bytes

    if not fits(step):
        return 0
    low, high = 1, 2
    while fits(high * step):
        low, high = high, high * 2
        if high > 2**16:  # 64M tokens: beyond anything a step would be run at
            return low * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle * step) else (low, middle)
    return low * step


def plan_report(config: Any, seq_len: int, memory_gib: float, *, dtype: str = "bfloat16",
                quantization_bits: int | None = None, lora_r: int = 8) -> str:
    """What ``longlora plan`` prints: each setup's estimate for ``seq_len`` tokens on a ``memory_gib`` GiB device,
    whether it fits, the options that make it fit, or the sequence-parallel degree P that does."""
    if not (isinstance(memory_gib, (int, float)) and memory_gib > 0):
        raise ValueError(f"device memory must be a positive number of GiB, got {memory_gib!r}")
    capacity = memory_gib * GIB
    model = dict(dtype=dtype, quantization_bits=quantization_bits, lora_r=lora_r)
    kind = f"QLoRA ({quantization_bits}-bit base)" if quantization_bits else f"LoRA, {dtype}"
    lines = [f"one training step, batch 1, {seq_len} tokens, {kind}, on a {memory_gib:g} GiB device:"]
    fitting = None
    for setup in SETUPS:
        options = stack_options(setup, seq_len, config)
        estimate = estimate_step_memory(config, seq_len, **options, **model)
        fits = estimate.total <= capacity
        terms = ", ".join(f"{name} {value / GIB:.1f}" for name, value in estimate.terms.items() if value)
        lines.append(f"  {setup:14s} {estimate.total / GIB:8.1f} GiB  {'fits' if fits else 'does not fit':12s} ({terms})")
        if fits and fitting is None and setup != "hf-defaults":
            fitting = (setup, options)
    longest = ", ".join(f"{setup} {longest_fitting(config, capacity, setup, **model)}" for setup in SETUPS)
    lines.append(f"longest step that fits (tokens): {longest}")
    hf_fits = estimate_step_memory(config, seq_len, **stack_options("hf-defaults", seq_len, config), **model).total <= capacity
    if hf_fits:
        lines.append("fits with the Hugging Face defaults")
    elif fitting is not None:
        setup, options = fitting
        recipe = [f"memory.tiled_mlp: {options['tiled_mlp']}", "memory.gradient_checkpointing: true"]
        if options.get("offload"):
            recipe.append("memory.offload: true")
        lines.append(f"fits with {setup}: {', '.join(recipe)} (S2-Attn and TRL's fused loss as the recipes have them)")
    else:
        parallel = _sequence_parallel_degree(config, seq_len, capacity, model)
        if parallel is None:
            lines.append("does not fit: even 64-way sequence parallelism leaves the weights and one slice too large")
        else:
            lines.append(f"does not fit on one device: sequence parallelism (DeepSpeed Ulysses) with P = {parallel} "
                         f"({seq_len // parallel} tokens per rank, stack+offload, weights replicated) fits")
    return "\n".join(lines)


def _sequence_parallel_degree(config: Any, seq_len: int, capacity: float, model: dict[str, Any]) -> int | None:
    """Smallest power-of-two P whose per-rank share (N/P tokens, weights replicated) fits. Ulysses splits attention
    heads across ranks, so P is at most the number of KV heads times the GQA ratio (the query heads)."""
    heads = _shape(config)["heads"]
    parallel = 2
    while parallel <= min(64, heads):
        share = -(-seq_len // parallel)
        if estimate_step_memory(config, share, **stack_options("stack+offload", share, config), **model).total <= capacity:
            return parallel
        parallel *= 2
    return None
