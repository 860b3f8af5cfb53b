"""Multi-GPU check of S2-Attn under DeepSpeed Ulysses (NCCL), for the day a machine with >= 2 GPUs is available.

    torchrun --nproc_per_node 2 benchmarks/sp_multi_gpu_check.py          # or 4, 8: P = number of GPUs
    torchrun --nproc_per_node 2 benchmarks/sp_multi_gpu_check.py --cpu --length 512   # the script's own dry run

Every rank computes the single-GPU loss and gradients of a small Llama on the full sequence, then the same under
Ulysses (its sequence shard, DeepSpeed's all-to-all over NCCL), and compares: fp32 with the SDPA backend (tight
tolerance), bf16 with the flash-attn varlen backend when installed (loose tolerance), packed documents included,
and a control without the head offset that must differ. Exits 1 on any mismatch. benchmarks/sp_multi_gpu_check.sh
then trains a recipe for a few steps through accelerate + DeepSpeed ZeRO-2 with parallel.sequence_parallel.
"""

from __future__ import annotations

import os
import sys

import torch


DEVICE = "cuda"


def _model(heads: int, kv_heads: int, dtype, backend: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import longlora_plugin  # noqa: F401

    config = LlamaConfig(vocab_size=1000, hidden_size=64 * heads, intermediate_size=128 * heads, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=65536)
    config.s2_group_size, config.s2_backend = 256, backend
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="s2_attention", dtype=dtype).to(DEVICE).train()


def _loss(model, ids, positions, labels, count):
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum") / count


def main() -> int:
    import deepspeed
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state
    import torch.distributed as dist
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import longlora_plugin.hf_attention as hf_attention
    from longlora_plugin.sequence_parallel import register_s2_ulysses

    global DEVICE
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU ranks: checks this script, not the GPUs")
    parser.add_argument("--length", type=int, help="tokens per sequence (default 8192 per rank)")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu:
        DEVICE = "cpu"
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="gloo" if args.cpu else "nccl")
    length = args.length or 8192 * world
    failures = 0
    cases = [("fp32 sdpa", torch.float32, "sdpa", 2e-4), ("bf16 flash", torch.bfloat16, "flash", 3e-2)]
    for name, dtype, backend, tolerance in cases:
        if backend == "flash" and (args.cpu or not longlora_plugin_flash_available()):
            if rank == 0:
                print(f"[{name}] skipped: flash-attn not installed", flush=True)
            continue
        for packed in (False, True):
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop("s2_attention", None)
            sp_state._release_sequence_parallel_groups()
            heads = 8 if 8 % world == 0 else world
            model = _model(heads, max(1, heads // 4), dtype, backend)
            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(3, 1000, (1, length), generator=gen).to(DEVICE)
            positions = torch.arange(length)
            if packed:
                positions = torch.cat([torch.arange(n) for n in (length // 3, length // 2, length - length // 3 - length // 2)])
            positions = positions[None].to(DEVICE)
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = ids[:, 1:]
            labels[:, :-1][positions[:, 1:] == 0] = -100
            count = (labels != -100).sum()
            reference = _loss(model, ids, positions, labels, count)
            reference.backward()
            reference = reference.detach()
            ref = {n: p.grad.float().clone() for n, p in model.named_parameters()}
            mpu = register_s2_ulysses(model, world)
            group = mpu.get_sequence_parallel_group()
            shard = slice(rank * length // world, (rank + 1) * length // world)

            def sharded_run():
                model.zero_grad(set_to_none=True)
                local = _loss(model, ids[:, shard], positions[:, shard], labels[:, shard], count)
                local.backward()
                loss = local.detach().clone()
                dist.all_reduce(loss, group=group)
                grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
                for grad in grads.values():
                    dist.all_reduce(grad, group=group)
                return float(loss), max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-6))
                                        for n in ref)

            loss, grad_error = sharded_run()
            original = hf_attention.ulysses_heads
            hf_attention.ulysses_heads = lambda module, query, kwargs: (0, None)
            control_loss, control_error = sharded_run()
            hf_attention.ulysses_heads = original
            ok = abs(loss - float(reference)) < tolerance and grad_error < tolerance * 10
            control_differs = abs(control_loss - float(reference)) > tolerance or control_error > tolerance * 10
            failures += (not ok) + (not control_differs)
            if rank == 0:
                print(f"[{name}, P={world}, N={length}, packed={packed}] loss {loss:.6f} vs {float(reference):.6f}, "
                      f"max relative grad error {grad_error:.2e}: {'OK' if ok else 'MISMATCH'}; without head offset "
                      f"{control_error:.2e}: {'differs (good)' if control_differs else 'SAME (check cannot fail)'}",
                      flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


def longlora_plugin_flash_available() -> bool:
    from longlora_plugin.ops import flash_attn_available

    return flash_attn_available()


if __name__ == "__main__":
    sys.exit(main())
