"""S2-Attn vs full causal SDPA on CPU, timed side by side in one run (fp32, forward + backward).

Kernel: B=1, H=8, D=64, G=N/4, against (a) full causal SDPA as transformers runs it and (b) the paper's
roll-with-wrap S2 (which leaks future tokens; timed only to show leak-free costs nothing).
End to end: one training step of a 4-layer Llama (hidden 256, 8 heads), S2 vs SDPA, with peak memory measured
in a fresh subprocess per case.

    python benchmarks/bench_s2_cpu.py                       # everything (about 20 minutes on 2 cores)
    python benchmarks/bench_s2_cpu.py --kernel 4096 8192 --model 8192 --vocab 259
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from longlora_plugin.demos.timing import best_time
from longlora_plugin.ops import s2_attention


def full_causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous()  # (B, S, H, D)


def roll_s2_with_wrap(q, k, v, group_size):
    """The paper's pseudo-code: roll half the heads by -G/2, attend in groups, roll back. Wraps around."""
    batch, heads, seq_len, dim = q.shape
    half, shift = heads // 2, group_size // 2

    def shifted(x):  # (B, H, S, D)
        return torch.cat([x[:, :half], x[:, half:].roll(-shift, dims=2)], dim=1)

    def grouped(x):  # (B, H, S, D) -> (B*S/G, H, G, D)
        return x.view(batch, heads, seq_len // group_size, group_size, dim).transpose(1, 2).flatten(0, 1)

    out = F.scaled_dot_product_attention(*(grouped(shifted(x)) for x in (q, k, v)), is_causal=True)
    out = out.view(batch, seq_len // group_size, heads, group_size, dim).transpose(1, 2).reshape(q.shape)
    out = torch.cat([out[:, :half], out[:, half:].roll(shift, dims=2)], dim=1)
    return out.transpose(1, 2).contiguous()


def kernel_case(seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, seq_len, 64, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, seq_len, 8, 64)
    group = seq_len // 4
    candidates = {
        "s2": lambda: s2_attention(q, k, v, group_size=group).backward(grad),
        "full_sdpa": lambda: full_causal_sdpa(q, k, v).backward(grad),
        "roll_s2": lambda: roll_s2_with_wrap(q, k, v, group).backward(grad),
    }
    times = {name: float("inf") for name in candidates}
    for _ in range(repeats):  # interleaved, so that drifts in machine load hit every candidate alike
        for name, step in candidates.items():
            times[name] = min(times[name], best_time(step, 1))
    return {
        "N": seq_len,
        **{f"{name}_s": round(t, 3) for name, t in times.items()},
        "speedup_vs_full": round(times["full_sdpa"] / times["s2"], 2),
        "speedup_vs_roll": round(times["roll_s2"] / times["s2"], 2),
    }


def llama_for_benchmark(attn_implementation: str, vocab_size: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import longlora_plugin  # noqa: F401  (registers s2_attention)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=65536,
        s2_group_size_ratio=0.25,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).train()


def model_step(model, seq_len: int):
    batch = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def peak_memory_child(attn_implementation: str, seq_len: int, vocab_size: int) -> None:
    """Run in a fresh process: print the peak resident memory one training step adds, in MiB."""
    model = llama_for_benchmark(attn_implementation, vocab_size)
    step = model_step(model, seq_len)
    with open("/proc/self/statm") as f:
        before_mib = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    step()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_step_mib": round(peak_mib - before_mib, 1)}))


def peak_memory(attn_implementation: str, seq_len: int, vocab_size: int) -> float:
    code = (
        "import sys; sys.argv=['x']; from benchmarks.bench_s2_cpu import peak_memory_child; "
        f"peak_memory_child({attn_implementation!r}, {seq_len}, {vocab_size})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_step_mib"]


def model_case(seq_len: int, repeats: int, vocab_size: int) -> dict:
    s2_model = llama_for_benchmark("s2_attention", vocab_size)
    sdpa_model = llama_for_benchmark("sdpa", vocab_size)
    steps = {"s2": model_step(s2_model, seq_len), "sdpa": model_step(sdpa_model, seq_len)}
    times = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name] = min(times[name], best_time(step, 1))
    memory = {name: peak_memory(impl, seq_len, vocab_size) for name, impl in (("s2", "s2_attention"), ("sdpa", "sdpa"))}
    return {
        "N": seq_len,
        "vocab": vocab_size,
        "s2_s": round(times["s2"], 3),
        "sdpa_s": round(times["sdpa"], 3),
        "speedup": round(times["sdpa"] / times["s2"], 2),
        "s2_peak_mib": memory["s2"],
        "sdpa_peak_mib": memory["sdpa"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--model", type=int, nargs="*", default=[8192, 16384])
    parser.add_argument(
        "--vocab", type=int, nargs="+", default=[259, 32000], help="vocabularies of the end-to-end Llama (bytes, Llama-2's)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward + backward", flush=True)
    results = {"kernel": [], "model": []}
    for n in args.kernel:
        row = kernel_case(n, args.repeats if n < 32768 else 1)
        results["kernel"].append(row)
        print("kernel", json.dumps(row), flush=True)
    for vocab in args.vocab:
        for n in args.model:
            row = model_case(n, args.repeats, vocab)
            results["model"].append(row)
            print("model ", json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
