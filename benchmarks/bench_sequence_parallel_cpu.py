"""S2-Attn training steps under DeepSpeed Ulysses on P CPU ranks (gloo): step time and all-to-all volume.

    python benchmarks/bench_sequence_parallel_cpu.py --lengths 2048 --ranks 1 2 4

A functional check with a size table, not a speed claim: the P ranks share this machine's cores, so more ranks do
not make a step faster here. Each rank runs one thread. P = 1 is one process without sequence parallelism.

Per layer, in the forward, Ulysses' four all-to-alls (q, k, v in; the attention output back) move, per rank,
(2 h + 2 h_kv) * N * (P - 1) / P^2 elements, i.e. 4 N h (P - 1) / P^2 without GQA (h = H * D, h_kv = H_kv * D, or
h / P when DeepSpeed repeats KV heads for P > H_kv); the backward moves as much again.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import longlora_plugin  # noqa: F401  (registers s2_attention)

    config = LlamaConfig(
        vocab_size=259, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=65536,
    )
    config.s2_group_size = None
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="s2_attention").train()


def _step(model, input_ids, position_ids, labels, shard):
    logits = model(input_ids=input_ids[:, shard], position_ids=position_ids[:, shard], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, shard].flatten(), ignore_index=-100)
    loss.backward()


def _worker(rank, world, port, args, length, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    model = _model(args)
    if world > 1:
        import deepspeed
        import torch.distributed as dist

        from longlora_plugin.sequence_parallel import register_s2_ulysses

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        register_s2_ulysses(model, world)
    ids = torch.randint(3, 259, (1, length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(length)[None]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    shard = slice(rank * length // world, (rank + 1) * length // world)
    times = []
    for _ in range(args.repeats + 1):  # the first step warms up
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        _step(model, ids, positions, labels, shard)
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(min(times[1:]), out)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import deepspeed  # noqa: F401  (before the fork: each rank then starts at once)
    import transformers  # noqa: F401

    import longlora_plugin  # noqa: F401

    print(f"Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads (MHA), fp32, G = N/4, "
          f"one thread per rank, forward + backward, best of {args.repeats}")
    print("| N | P | step (s) | all-to-all elements per rank per layer, forward: 4 N h (P-1)/P^2 |")
    print("| --- | --- | --- | --- |")
    for length in args.lengths:
        for world in args.ranks:
            if length % world:
                raise ValueError(f"--lengths {length} does not split over {world} ranks")
            with tempfile.TemporaryDirectory() as folder:
                out = os.path.join(folder, "t.pt")
                mp.start_processes(_worker, args=(world, _free_port(), args, length, out), nprocs=world,
                                   join=True, start_method="fork")
                seconds = torch.load(out)
            volume = 4 * length * args.hidden * (world - 1) // world**2
            print(f"| {length:,} | {world} | {seconds:.3f} | {volume:,} |", flush=True)


if __name__ == "__main__":
    main()
