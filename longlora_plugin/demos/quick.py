"""``longlora demo --quick``: a tiny Llama trained with S2-Attn on CPU in about a minute, then the kernel timed.

No downloads: the text is the Python standard library's own source, read byte by byte.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokenizer import BYTE_ID_OFFSET
from ..hf_attention import S2_ATTENTION
from .timing import compare_kernel_times

__all__ = ["QuickDemoResult", "run_quick_demo", "stdlib_byte_ids"]


def stdlib_byte_ids(num_bytes: int) -> torch.Tensor:
    """The first ``num_bytes`` of the standard library's .py files (sorted by path), as byte-tokenizer ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= num_bytes:
            break
    data = b"".join(chunks)[:num_bytes]
    if len(data) < num_bytes:
        raise RuntimeError(f"the standard library at {root} holds only {len(data)} bytes of .py source")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + BYTE_ID_OFFSET


@dataclass
class QuickDemoResult:
    losses: list[float]
    eval_loss: float
    speed: dict[int, tuple[float, float]]  # seq_len -> (S2 seconds, full SDPA seconds), attention kernel


def run_quick_demo(
    *, steps: int = 150, seq_len: int = 512, batch_size: int = 4, speed_lengths=(4096, 8192), log=print
) -> QuickDemoResult:
    from transformers import AutoModelForCausalLM, LlamaConfig

    corpus = stdlib_byte_ids(2_000_000)
    train_ids, held_out = corpus[:-200_000], corpus[-200_000:]
    config = LlamaConfig(
        vocab_size=256 + BYTE_ID_OFFSET, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, s2_group_size_ratio=0.25,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=S2_ATTENTION).train()
    log(f"tiny Llama: {sum(p.numel() for p in model.parameters()):,} parameters, attn_implementation={S2_ATTENTION}")
    log(f"training {steps} steps at {seq_len} tokens (S2-Attn, group {seq_len // 4}) on stdlib source bytes")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        starts = torch.randint(0, train_ids.numel() - seq_len, (batch_size,), generator=generator).tolist()
        batch = torch.stack([train_ids[s : s + seq_len] for s in starts])  # (B, S)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            log(f"  step {step + 1:4d}  loss {losses[-1]:.3f}")
    model.eval()  # full causal attention at inference
    with torch.no_grad():
        batch = held_out[: 4 * seq_len].view(4, seq_len)
        eval_loss = model(input_ids=batch, labels=batch).loss.item()
    log(f"held-out loss with full attention (eval mode): {eval_loss:.3f}")
    speed = compare_kernel_times(speed_lengths, log=log)
    return QuickDemoResult(losses=losses, eval_loss=eval_loss, speed=speed)
