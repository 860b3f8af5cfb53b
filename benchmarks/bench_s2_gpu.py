"""S2-Attn on one CUDA GPU, bf16, forward + backward, timed side by side with CUDA events.

flash-attn varlen S2 vs flash-attn full causal attention (and the SDPA S2 path vs full causal SDPA) at 32k and
64k tokens, G = N/4. Needs a CUDA GPU; the flash rows need flash-attn installed (``pip install '.[flash]'``).

    python benchmarks/bench_s2_gpu.py --lengths 32768 65536 --json gpu.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from longlora_plugin.ops import flash_attn_available, s2_attention


def cuda_time(step, repeats: int) -> float:
    step()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return best


def case(seq_len: int, heads: int, head_dim: int, repeats: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    grad = torch.randn(1, seq_len, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    group = seq_len // 4
    steps = {
        "s2_sdpa": lambda: s2_attention(q, k, v, group_size=group, backend="sdpa").backward(grad),
        "full_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).backward(grad),
    }
    if flash_attn_available():
        from flash_attn import flash_attn_func

        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # (B, S, H, D)
        steps["s2_flash"] = lambda: s2_attention(q, k, v, group_size=group, backend="flash").backward(grad)
        steps["full_flash"] = lambda: flash_attn_func(qt, kt, vt, causal=True).backward(grad)
    times = {name: cuda_time(step, repeats) for name, step in steps.items()}
    row = {"N": seq_len, "H": heads, "D": head_dim, **{f"{n}_ms": round(t * 1000, 2) for n, t in times.items()}}
    row["sdpa_speedup"] = round(times["full_sdpa"] / times["s2_sdpa"], 2)
    if "s2_flash" in times:
        row["flash_speedup"] = round(times["full_flash"] / times["s2_flash"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_s2_gpu.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, flash-attn {flash_attn_available()}")
    rows = []
    for n in args.lengths:
        for heads, dim in ((8, 64), (32, 128)):
            rows.append(case(n, heads, dim, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
