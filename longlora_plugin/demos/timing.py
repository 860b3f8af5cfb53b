"""The demos' speed line: the S2-Attn kernel against full causal SDPA, forward + backward, timed side by side.

The kernel is timed, not the demo model's step: a tiny model's step is dominated by work that is not attention,
so its ratio says little about S2-Attn. ``benchmarks/bench_s2_cpu.py`` has the end-to-end tables.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..ops import s2_attention

__all__ = ["KERNEL_SHAPE", "best_time", "compare_kernel_times"]

KERNEL_SHAPE = "B=1, H=8, D=64, G=N/4, fp32"


def best_time(step: Callable[[], object], repeats: int) -> float:
    """The best wall time of ``repeats`` calls of ``step``, after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def compare_kernel_times(lengths, *, repeats: int = 2, log=print) -> dict[int, tuple[float, float]]:
    """Per length: (S2-Attn seconds, full causal SDPA seconds) for one forward + backward of the attention alone."""
    speed = {}
    for seq_len in lengths:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, seq_len, 64, generator=generator, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, seq_len, 8, 64, generator=generator)  # (B, S, H, D)
        s2 = best_time(lambda: s2_attention(q, k, v, group_size=seq_len // 4).backward(grad), repeats)
        full = best_time(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).backward(grad), repeats
        )
        speed[seq_len] = (s2, full)
        log(
            f"attention kernel at {seq_len} tokens ({KERNEL_SHAPE}), forward + backward: S2-Attn {s2:.2f}s, "
            f"full causal SDPA {full:.2f}s -> {full / s2:.2f}x"
        )
    return speed
