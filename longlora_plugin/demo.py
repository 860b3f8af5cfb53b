"""The embedded default: a tiny Llama trained with S2-Attn on CPU, then one training step timed S2 vs SDPA.

No downloads: the text is the Python standard library's own source, read byte by byte.
"""

from __future__ import annotations

import copy
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .attention import S2_ATTENTION

__all__ = ["DemoResult", "byte_corpus", "compare_step_times", "run_demo", "time_training_step", "tiny_llama", "train_s2"]

BYTE_OFFSET = 3  # ids 0, 1, 2 are pad, bos, eos; byte b is id b + 3


def byte_corpus(num_bytes: int) -> torch.Tensor:
    """The first num_bytes of the standard library's .py files (sorted by path), as token ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= num_bytes:
            break
    data = b"".join(chunks)[:num_bytes]
    if len(data) < num_bytes:
        raise RuntimeError(f"the standard library at {root} holds only {len(data)} bytes of .py source")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + BYTE_OFFSET


def tiny_llama(
    attn_implementation: str = S2_ATTENTION,
    *,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 8192,
    seed: int = 0,
    **s2_config,
):
    config = LlamaConfig(
        vocab_size=256 + BYTE_OFFSET,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **s2_config,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


@dataclass
class DemoResult:
    losses: list[float]
    eval_loss: float
    speed: dict[int, tuple[float, float]]  # seq_len -> (S2 seconds, SDPA seconds) for one training step


def train_s2(model, corpus: torch.Tensor, *, steps: int, seq_len: int, batch_size: int, lr: float = 3e-3, seed: int = 0):
    """Plain AdamW next-token training on random windows of the corpus; returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, corpus.numel() - seq_len, (batch_size,), generator=generator)
        batch = torch.stack([corpus[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def time_training_step(model, seq_len: int, repeats: int = 2) -> float:
    """Best wall time of a forward + backward over one (1, seq_len) batch, after one warm-up step."""
    model.train()
    batch = torch.randint(BYTE_OFFSET, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        if i:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return min(times)


def compare_step_times(model, lengths, log=print) -> dict[int, tuple[float, float]]:
    """One training step of ``model`` (set to S2-Attn) against a copy set to SDPA, per length: (S2 s, SDPA s)."""
    speed = {}
    sdpa_model = copy.deepcopy(model)
    sdpa_model.set_attn_implementation("sdpa")
    for length in lengths:
        s2, sdpa = time_training_step(model, length), time_training_step(sdpa_model, length)
        speed[length] = (s2, sdpa)
        log(f"one training step at {length} tokens: S2-Attn {s2:.2f}s, full SDPA {sdpa:.2f}s -> {sdpa / s2:.2f}x")
    return speed


def run_demo(
    *, steps: int = 150, seq_len: int = 512, batch_size: int = 4, speed_lengths: tuple[int, ...] = (4096, 8192), log=print
) -> DemoResult:
    corpus = byte_corpus(2_000_000)
    train, held_out = corpus[:-200_000], corpus[-200_000:]
    model = tiny_llama(s2_group_size_ratio=0.25)
    log(f"tiny Llama: {sum(p.numel() for p in model.parameters()):,} parameters, attn_implementation={S2_ATTENTION}")
    log(f"training {steps} steps at {seq_len} tokens (S2-Attn, group {seq_len // 4}) on stdlib source bytes")
    losses = train_s2(model, train, steps=steps, seq_len=seq_len, batch_size=batch_size)
    for step in range(0, steps, max(1, steps // 6)):
        log(f"  step {step + 1:4d}  loss {losses[step]:.3f}")
    log(f"  step {steps:4d}  loss {losses[-1]:.3f}")
    model.eval()  # full causal attention at inference
    with torch.no_grad():
        batch = held_out[: 4 * seq_len].view(4, seq_len)
        eval_loss = model(input_ids=batch, labels=batch).loss.item()
    log(f"held-out loss with full attention (eval mode): {eval_loss:.3f}")
    speed = compare_step_times(model, speed_lengths, log)
    return DemoResult(losses=losses, eval_loss=eval_loss, speed=speed)
