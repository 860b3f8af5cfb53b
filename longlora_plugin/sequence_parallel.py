"""S2-Attn under DeepSpeed Ulysses sequence parallelism (ALST): one sequence spread over P ranks.

Ulysses gives each rank the whole sequence for a contiguous block of query heads ``[r*H/P, (r+1)*H/P)`` (an
all-to-all before and after the core attention). S2-Attn's head split is global: heads ``[0, H/2)`` unshifted,
``[H/2, H)`` shifted. :func:`ulysses_heads` tells the attention function which global heads it holds, from
DeepSpeed's sequence-parallel state, only when a layer receives fewer heads than its config has.

The rest wires S2-Attn into the launch tools without patching them:

- :func:`register_s2_ulysses`: DeepSpeed's public ``register_with_transformers`` around ``"s2_attention"``, for
  custom training loops.
- :func:`s2_parallelism_config`: an accelerate ``ParallelismConfig`` whose DeepSpeed sequence-parallel handler names
  ``"s2_attention"`` (accelerate's own handler accepts only its built-in names; see docs/sequence-parallel.md for the
  small upstream change that would make this class unnecessary).
- :func:`sequence_parallel_trainer`: a Trainer subclass that gives single-process gradients (see
  :func:`single_process_gradient_loss`) and feeds packed batches to DeepSpeed's data adapter.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .settings import setting, validate_settings

__all__ = [
    "ParallelSection",
    "S2_ULYSSES_KEYS_DROPPED",
    "check_sequence_parallel_batch",
    "check_sequence_parallel_padding",
    "deepspeed_sp_gradient_factor",
    "register_s2_ulysses",
    "s2_parallelism_config",
    "sequence_parallel_group",
    "sequence_parallel_rank_world",
    "sequence_parallel_training_arguments",
    "sequence_parallel_trainer",
    "single_process_gradient_loss",
    "ulysses_heads",
]

# Packed-batch keys describing the whole row, which DeepSpeed's data adapter cannot shard (1-D or scalars).
# Under Ulysses, S2-Attn reads document boundaries from the (all-gathered) restarting position_ids instead.
S2_ULYSSES_KEYS_DROPPED = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")

_SP_STATE_MODULE = "deepspeed.runtime.sequence_parallel.parallel_state_sp"


@dataclass
class ParallelSection:
    """Recipe section ``parallel``."""

    sequence_parallel: int = setting(
        1,
        "P: spread each sequence over P ranks with DeepSpeed Ulysses (needs a DeepSpeed launch, e.g. "
        "integrations/accelerate/deepspeed_ulysses.yaml; P divides the number of attention heads). 1: off.",
        "positive int",
    )

    def __post_init__(self) -> None:
        validate_settings(self, key=lambda name: f"parallel.{name}")


def sequence_parallel_group():
    """DeepSpeed's Ulysses process group when one is initialized in this process, else None.

    Never imports DeepSpeed: a process that did not import its sequence-parallel state has no group.
    """
    state = sys.modules.get(_SP_STATE_MODULE)
    if state is None or getattr(state, "_SEQUENCE_PARALLEL_GROUP", None) is None:
        return None
    return state.get_sequence_parallel_group()


def sequence_parallel_rank_world() -> tuple[int, int] | None:
    """(rank, world size) in DeepSpeed's Ulysses group, or None when no group is initialized."""
    group = sequence_parallel_group()
    if group is None:
        return None
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _config_heads(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    return heads if isinstance(heads, int) and not isinstance(heads, bool) else None


def ulysses_heads(module: Any, query: Any, kwargs: dict[str, Any]) -> tuple[int, int | None]:
    """(head_offset, total_heads) of the query heads a layer received; (0, None) without head parallelism.

    query is (B, H_local, S, D). When H_local is the config's H, nothing is looked up. Otherwise the layer runs on a
    rank of Ulysses attention: rank r of the sequence-parallel group holds global heads [r * H_local, (r+1) * H_local)
    of the full, all-gathered sequence. Also refuses inputs whose document boundaries would be lost there.
    """
    total = _config_heads(module.config)
    local = query.shape[1]
    if total is None or local == total:
        return 0, None
    rank_world = sequence_parallel_rank_world()
    if rank_world is None:
        raise ValueError(
            f"s2_attention got {local} query heads but the model config has num_attention_heads={total}, and no "
            "DeepSpeed sequence-parallel (Ulysses) group is initialized, so it cannot tell which of the global heads "
            "these are (S2-Attn shifts heads [H/2, H) only). Head-parallel attention must run under DeepSpeed Ulysses "
            "(longlora_plugin.sequence_parallel.register_s2_ulysses, or accelerate's sp_backend='deepspeed')."
        )
    rank, world = rank_world
    if local * world != total:
        raise ValueError(
            f"s2_attention got {local} query heads on sequence-parallel rank {rank} of {world}, but the config has "
            f"num_attention_heads={total} (expected {total} / {world} per rank)"
        )
    _check_boundaries(kwargs, query.shape[0], query.shape[2], world)
    return rank * local, total


def _check_boundaries(kwargs: dict[str, Any], batch: int, seq_len: int, world: int) -> None:
    """Refuse layouts whose documents Ulysses would not carry to the core attention."""
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        cu = kwargs.get(key)
        if cu is not None and int(cu[-1]) != batch * seq_len:
            raise ValueError(
                f"under sequence parallelism s2_attention sees the full sequence ({batch} x {seq_len} tokens) but "
                f"got {key} ending at {int(cu[-1])} (a shard's boundaries). Drop {key} and pass restarting "
                "position_ids: S2-Attn reads packed documents from the all-gathered position_ids."
            )
    position_ids = kwargs.get("position_ids")
    if position_ids is None or seq_len % world:
        return
    # Each rank numbering its own shard 0..S/P-1 (model-made ids) turns every shard into a separate document.
    shard = seq_len // world
    ids = position_ids.reshape(-1, world, shard)
    expected = position_ids.new_tensor(range(shard))
    if world > 1 and bool((ids == expected).all()):
        raise ValueError(
            f"under sequence parallelism every rank's position_ids are 0..{shard - 1}: the model made them per shard, "
            "so each shard would attend as its own document. Put global position_ids in every batch before it is "
            "sharded (DeepSpeed's UlyssesSPDataLoaderAdapter requires them; TRL's collator adds them)."
        )


def check_sequence_parallel_padding(attention_mask: Any) -> None:
    """Refuse padding that Ulysses would silently drop: DeepSpeed hands the core attention no mask.

    Called from the mask function with each rank's (B, S/P) slice. Padding at the end of a row is harmless
    (causal attention never looks forward); anywhere else real tokens would attend to it.
    """
    if attention_mask is None or getattr(attention_mask, "ndim", 0) != 2 or sequence_parallel_rank_world() is None:
        return
    mask = attention_mask.bool()
    # A pad followed later by a real token: the running minimum drops below the value.
    padded_before_real = mask & ~mask.int().cummin(dim=1).values.bool()
    if bool(padded_before_real.any()):
        raise ValueError(
            "under DeepSpeed Ulysses sequence parallelism the core attention gets no attention mask, so padding "
            "before real tokens (left padding, or padding inside a row) would be attended to. Pad on the right, or "
            "pack without padding (data.packing: true), with position_ids restarting at each document."
        )


def check_sequence_parallel_batch(batch: dict[str, Any], world: int) -> dict[str, Any]:
    """A collated batch, ready for DeepSpeed's data adapter: checked, with the unshardable packed keys dropped.

    Needs global position_ids; any padding must be at the end of a row; the length must divide by P.
    """
    import torch

    if "position_ids" not in batch:
        raise ValueError(
            f"sequence parallelism needs position_ids in every batch (keys: {sorted(batch)}); TRL's collator adds "
            "them when sp_size > 1, a custom collator must too"
        )
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        mask = mask.bool()
        if bool((mask & ~mask.int().cummin(dim=1).values.bool()).any()):
            raise ValueError(
                "sequence parallelism drops the attention mask, so a batch may only be padded on the right; this "
                "one has padding before real tokens"
            )
    length = batch["input_ids"].shape[1]
    if length % world:
        raise ValueError(
            f"a batch of {length} tokens does not split over sequence_parallel={world} ranks; set "
            f"training.pad_to_multiple_of to a multiple of {world}"
        )
    return {key: value for key, value in batch.items() if key not in S2_ULYSSES_KEYS_DROPPED}


def register_s2_ulysses(model: Any, sequence_parallel_size: int, micro_batch_size: int = 1, **kwargs: Any):
    """Wrap ``"s2_attention"`` in DeepSpeed's Ulysses attention and initialize its groups; returns DeepSpeed's mpu.

    For custom training loops (accelerate's ``Accelerator`` does this itself with :func:`s2_parallelism_config`).
    The model must already use ``attn_implementation="s2_attention"``; torch.distributed must be initialized.
    Call once per process.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from .hf_attention import S2_ATTENTION

    _check_heads_divide(model.config, sequence_parallel_size)
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=S2_ATTENTION,
        sequence_parallel_size=sequence_parallel_size,
        micro_batch_size=micro_batch_size,
        **kwargs,
    )


def _check_heads_divide(config: Any, world: int) -> None:
    heads = _config_heads(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads is None or heads % world or not (kv_heads % world == 0 or world % kv_heads == 0):
        raise ValueError(
            f"sequence_parallel={world} must divide num_attention_heads={heads} and either divide or be a multiple "
            f"of num_key_value_heads={kv_heads} (Ulysses splits heads over the ranks)"
        )


def s2_parallelism_config(sequence_parallel: int):
    """accelerate's ``ParallelismConfig(sp_backend="deepspeed", sp_size=P)`` with ``"s2_attention"`` as the core.

    accelerate's ``DeepSpeedSequenceParallelConfig`` checks ``sp_attn_implementation`` against a fixed list of
    built-in names in ``__post_init__``; DeepSpeed itself accepts any name registered with transformers. The
    subclass below checks our one name and leaves the rest of accelerate's checks as they are.
    """
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    from .hf_attention import S2_ATTENTION

    @dataclass
    class S2SequenceParallelConfig(DeepSpeedSequenceParallelConfig):
        sp_attn_implementation: str | None = S2_ATTENTION

        def __post_init__(self) -> None:
            if self.sp_attn_implementation != S2_ATTENTION:
                raise ValueError(
                    f"S2SequenceParallelConfig runs {S2_ATTENTION!r}, got sp_attn_implementation="
                    f"{self.sp_attn_implementation!r}"
                )
            self.sp_attn_implementation = None  # accelerate's list-check skips None; set back right after
            super().__post_init__()
            self.sp_attn_implementation = S2_ATTENTION

    handler = S2SequenceParallelConfig(sp_seq_length_is_variable=True)
    return ParallelismConfig(sp_backend="deepspeed", sp_size=sequence_parallel, sp_handler=handler)


def sequence_parallel_training_arguments(section: ParallelSection, training: dict[str, Any]) -> dict[str, Any]:
    """Extra ``SFTConfig`` arguments for a recipe's ``parallel`` section ({} when sequence parallelism is off)."""
    world = section.sequence_parallel
    if world == 1:
        return {}
    _check_launch(world, training)
    multiple = training.get("pad_to_multiple_of")
    if multiple is not None and multiple % world:
        raise ValueError(
            f"training.pad_to_multiple_of={multiple} must be a multiple of parallel.sequence_parallel={world}"
        )
    extra: dict[str, Any] = {"parallelism_config": s2_parallelism_config(world)}
    if multiple is None:
        extra["pad_to_multiple_of"] = world
    return extra


LAUNCH_HINT = (
    "accelerate launch --config_file integrations/accelerate/deepspeed_ulysses.yaml --num_processes {world} "
    "-m longlora_plugin.train RECIPE.yaml"
)


def _check_launch(world: int, training: dict[str, Any]) -> None:
    """Ulysses needs DeepSpeed and a multiple of P processes; without them accelerate would train without SP."""
    import os

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or bool(training.get("deepspeed"))
    if not deepspeed or processes % world:
        raise ValueError(
            f"parallel.sequence_parallel={world} needs a DeepSpeed launch over a multiple of {world} processes "
            f"(this one: {processes} process(es), DeepSpeed {'on' if deepspeed else 'off'}), e.g. "
            + LAUNCH_HINT.format(world=world)
        )


def single_process_gradient_loss(local_share: Any, group: Any, gradient_factor: float = 1.0) -> Any:
    """The global token-mean loss in value, with the gradient of this rank's own share only.

    ``local_share`` is this rank's summed token losses divided by the token count of the whole sequence. Every rank
    returns the same value (the sum of the shares), while DeepSpeed's gradient reduction sums the ranks' gradients
    of their own shares over the sequence-parallel group and divides by the data-parallel size: the gradient of one
    process on the whole sequence.

    transformers' ``deepspeed_sp_compute_loss`` instead differentiates through an all-gather of the per-rank losses;
    the all-gather's backward already sums the P ranks, so its gradients come out P times too large (and on gloo its
    0-dim all-gathers fail outright).

    ``gradient_factor`` multiplies the gradient only, for a reduction that divides by more than the data-parallel
    size (see :func:`deepspeed_sp_gradient_factor`).
    """
    import torch.distributed as dist

    total = local_share.detach().reshape(1).clone()
    dist.all_reduce(total, group=group)
    scaled = local_share * gradient_factor
    return scaled + (total[0] - scaled.detach())


def deepspeed_sp_gradient_factor(engine: Any, world: int) -> int:
    """What DeepSpeed's gradient reduction under Ulysses must be compensated by, for single-process gradients.

    DeepSpeed 0.19 sums gradients over the sequence-data-parallel group (P x data-parallel ranks). ZeRO-1/2 then
    divide by the data-parallel size only (1). ZeRO-3 with ``reduce_scatter`` (its default) pre-divides by the whole
    group in ``reduce_scatter_coalesced``, P times more (P). ZeRO-3 without ``reduce_scatter`` mixes both paths by
    bucket size, so it is refused.
    """
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if stage != 3:
        return 1
    if getattr(engine.optimizer, "reduce_scatter", True):
        return world
    raise ValueError(
        "sequence parallelism with ZeRO-3 needs zero_optimization.reduce_scatter true (the default): without it "
        "DeepSpeed 0.19 averages some gradient buckets over the sequence-parallel ranks and others not"
    )


def sequence_parallel_trainer(base: type) -> type:
    """A subclass of TRL's SFTTrainer (it needs TRL's fused LM head) for Ulysses runs; unchanged when SP is off.

    - The loss is the token mean over the whole sequence and its gradients are those of a single process
      (:func:`single_process_gradient_loss`), computed without transformers' ``deepspeed_sp_compute_loss``.
    - Collated batches are checked and stripped of the packed keys DeepSpeed's data adapter cannot shard
      (:func:`check_sequence_parallel_batch`), so TRL's padding-free packing trains, with exact per-document groups.
    """

    class SequenceParallelTrainer(base):  # type: ignore[misc, valid-type]
        def _sp_world(self) -> int:
            pc = getattr(self.accelerator, "parallelism_config", None)
            if pc is None or pc.sp_backend != "deepspeed" or not pc.sp_enabled:
                return 1
            return pc.sp_size

        def get_train_dataloader(self):
            world = self._sp_world()
            if world > 1 and not getattr(self.data_collator, "_longlora_sp", False):
                collate = self.data_collator

                def collate_for_ulysses(features):
                    return check_sequence_parallel_batch(collate(features), world)

                collate_for_ulysses._longlora_sp = True  # type: ignore[attr-defined]
                self.data_collator = collate_for_ulysses
            return super().get_train_dataloader()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            world = self._sp_world()
            if world == 1 or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            import torch
            import torch.distributed as dist

            group = sequence_parallel_group()
            shift_labels = inputs["shift_labels"]  # DeepSpeed's data adapter shifted the labels, then sharded them
            tokens = (shift_labels != -100).sum().reshape(1).to(torch.float32)  # 1-element: gloo refuses 0-dim
            dist.all_reduce(tokens, group=group)
            model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            # TRL's fused LM head: summed NLL / num_items_in_batch, without the N x vocab logits
            outputs = model(**model_inputs, fused_lm_head=True, num_items_in_batch=tokens[0].clamp(min=1))
            factor = deepspeed_sp_gradient_factor(self.model_wrapped, world)
            loss = single_process_gradient_loss(outputs.loss, group, gradient_factor=factor)
            return (loss, outputs) if return_outputs else loss

    SequenceParallelTrainer.__name__ = SequenceParallelTrainer.__qualname__ = f"SequenceParallel{base.__name__}"
    return SequenceParallelTrainer
