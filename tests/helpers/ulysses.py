"""Run S2-Attn models under DeepSpeed Ulysses on P CPU ranks (gloo) and compare with one process.

``run_ulysses_cases(world, cases)`` spawns ``world`` processes; each builds the same tiny model per case, computes the
single-process loss and gradients on the full sequence, then the same under Ulysses (its shard of the sequence, heads
split by DeepSpeed's all-to-all), and reports the largest differences. ``control=True`` in a case also reruns it with
the head offset switched off, to show the comparison can fail.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["free_port", "run_ulysses_cases"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids (restarting at each packed document), next-token labels already shifted."""
    generator = torch.Generator().manual_seed(1)
    batch, seq_len = case.get("batch", 1), case["seq_len"]
    input_ids = torch.randint(3, 96, (batch, seq_len), generator=generator)
    documents = case.get("documents")  # lengths of packed documents, summing to seq_len
    if documents:
        position_ids = torch.cat([torch.arange(n) for n in documents]).expand(batch, seq_len).clone()
    else:
        position_ids = torch.arange(seq_len).expand(batch, seq_len).clone()
    shift_labels = torch.full_like(input_ids, -100)
    shift_labels[:, :-1] = input_ids[:, 1:]
    shift_labels[:, :-1][position_ids[:, 1:] == 0] = -100  # no target across a document boundary
    return input_ids, position_ids, shift_labels


def _loss_sum(model, input_ids, position_ids, shift_labels) -> torch.Tensor:
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=-100, reduction="sum"
    )


def _build(case: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    from longlora_plugin import S2_ATTENTION
    from tests.helpers.families import tiny_config

    config = tiny_config(case.get("model_type", "llama"), **case.get("config", {}))
    config.s2_group_size = case["group_size"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=S2_ATTENTION, dtype=torch.float32)
    return model.train()


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _ulysses_run(model, case, world, rank, group) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the whole batch, each rank holding its sequence shard; summed over the group."""
    import torch.distributed as dist

    input_ids, position_ids, shift_labels = _batch(case)
    shard = case["seq_len"] // world
    part = slice(rank * shard, (rank + 1) * shard)
    count = (shift_labels != -100).sum()
    model.zero_grad(set_to_none=True)
    local = _loss_sum(model, input_ids[:, part], position_ids[:, part], shift_labels[:, part]) / count
    local.backward()
    loss = local.detach().clone()
    dist.all_reduce(loss, group=group)
    grads = _gradients(model)
    for grad in grads.values():
        dist.all_reduce(grad, group=group)
    return float(loss), grads


def _largest_difference(loss_a, grads_a, loss_b, grads_b) -> dict[str, float]:
    assert grads_a.keys() == grads_b.keys()
    return {
        "loss": abs(loss_a - loss_b),
        "grad": max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a),
        "grad_scale": max(float(grads_b[n].abs().max()) for n in grads_b),
        "parameters": len(grads_a),
    }


def _worker(rank: int, world: int, port: int, cases: list[dict[str, Any]], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state

    import longlora_plugin.hf_attention as hf_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from longlora_plugin import S2_ATTENTION
    from longlora_plugin.sequence_parallel import register_s2_ulysses

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    results = []
    for case in cases:
        ALL_ATTENTION_FUNCTIONS._local_mapping.pop(S2_ATTENTION, None)  # the previous case's Ulysses wrapper
        sp_state._release_sequence_parallel_groups()
        model = _build(case)
        model.zero_grad(set_to_none=True)
        input_ids, position_ids, shift_labels = _batch(case)
        count = (shift_labels != -100).sum()
        reference = _loss_sum(model, input_ids, position_ids, shift_labels) / count
        reference.backward()
        ref_loss, ref_grads = float(reference.detach()), _gradients(model)

        mpu = register_s2_ulysses(model, world, micro_batch_size=case.get("batch", 1))
        group = mpu.get_sequence_parallel_group()
        loss, grads = _ulysses_run(model, case, world, rank, group)
        result = {"name": case["name"], "ulysses": _largest_difference(ref_loss, ref_grads, loss, grads)}
        if case.get("control"):
            original = hf_attention.ulysses_heads
            hf_attention.ulysses_heads = lambda module, query, kwargs: (0, None)  # every rank: "I hold heads 0.."
            try:
                loss, grads = _ulysses_run(model, case, world, rank, group)
            finally:
                hf_attention.ulysses_heads = original
            result["without_offset"] = _largest_difference(ref_loss, ref_grads, loss, grads)
        results.append(result)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def run_ulysses_cases(world: int, cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{case name: {"ulysses": differences, "without_offset": differences (control cases)}}."""
    # Fork after the heavy imports: each rank then starts in a fraction of a second instead of re-importing
    # torch, transformers and DeepSpeed (about 15 s each on a busy 2-core machine).
    import deepspeed  # noqa: F401
    import deepspeed.runtime.sequence_parallel.ulysses_sp  # noqa: F401
    import transformers  # noqa: F401

    import longlora_plugin  # noqa: F401

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(world, free_port(), cases, out_dir), nprocs=world, join=True, start_method="fork"
        )
        results = torch.load(os.path.join(out_dir, "results.pt"))
    return {result["name"]: result for result in results}


def _recipe_worker(rank: int, world: int, port: int, recipe_path: str, overrides: dict, ds_config: str, out_dir: str):
    """One rank of ``accelerate launch --use_deepspeed --num_processes world -m longlora_plugin.train``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=ds_config,
        ACCELERATE_MIXED_PRECISION="no", ACCELERATE_DYNAMO_BACKEND="NO",
    )
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    from longlora_plugin.recipe import load_recipe
    from longlora_plugin.train import train

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that may have trained already
    trainer = train(load_recipe(recipe_path, overrides))
    if rank == 0:
        plugin = trainer.accelerator.state.deepspeed_plugin
        summary = {
            "log_history": trainer.state.log_history,
            "engine": type(trainer.model_wrapped).__name__,
            "zero_stage": None if plugin is None else plugin.zero_stage,
            "sp_size": trainer.accelerator.parallelism_config.sp_size,
        }
        torch.save(summary, os.path.join(out_dir, "summary.pt"))


def run_recipe_on_ranks(world: int, recipe_path, overrides: dict, ds_config) -> dict[str, Any]:
    """Train a recipe on ``world`` forked CPU ranks under DeepSpeed; rank 0's log history and engine."""
    import trl  # noqa: F401  (imported before the fork, like DeepSpeed)

    import longlora_plugin.train  # noqa: F401

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _recipe_worker,
            args=(world, free_port(), str(recipe_path), overrides, str(ds_config), out_dir),
            nprocs=world,
            join=True,
            start_method="fork",
        )
        return torch.load(os.path.join(out_dir, "summary.pt"), weights_only=False)
