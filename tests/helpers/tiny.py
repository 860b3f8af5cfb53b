"""A tiny byte-level Llama, learnable text for it, and a plain training loop, for the training tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longlora_plugin import S2_ATTENTION
from longlora_plugin.data.tokenizer import BYTE_ID_OFFSET
from longlora_plugin.demos.quick import stdlib_byte_ids

__all__ = ["byte_corpus", "tiny_llama", "train_s2"]

byte_corpus = stdlib_byte_ids  # real text: the standard library's source, as byte ids


def tiny_llama(*, hidden_size: int = 64, layers: int = 2, seed: int = 0, **config_overrides):
    """A byte-vocabulary Llama (4 heads over 2 KV heads) with S2-Attn; ``s2_*`` settings go in the overrides."""
    config = LlamaConfig(
        vocab_size=256 + BYTE_ID_OFFSET,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=0,
        **config_overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=S2_ATTENTION)


def train_s2(model, corpus: torch.Tensor, *, steps: int, seq_len: int, batch_size: int, lr: float = 3e-3):
    """AdamW next-token steps on random windows of ``corpus``; the loss of each step."""
    generator = torch.Generator().manual_seed(0)
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
