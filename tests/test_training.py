"""A tiny Llama learns with S2-Attn, and S2-Attn is what it trained with."""

import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import longlora_plugin.attention as attention
from longlora_plugin import S2_ATTENTION


def byte_corpus(num_bytes: int) -> torch.Tensor:
    """Real text that every machine has offline: the standard library's own source, as byte ids (+3)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b""
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= num_bytes:
            break
    return torch.frombuffer(bytearray(data[:num_bytes]), dtype=torch.uint8).long() + 3


def tiny_llama(**s2_config):
    config = LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, **s2_config,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=S2_ATTENTION)


def train_steps(model, corpus, *, steps, seq_len, batch_size, lr=3e-3):
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


def test_tiny_llama_loss_falls_over_30_s2_steps(monkeypatch):
    calls = []
    real = attention.s2_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["group_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "s2_attention", counting)
    model = tiny_llama(s2_group_size=32)
    losses = train_steps(model, byte_corpus(200_000), steps=30, seq_len=128, batch_size=4)
    assert len(calls) == 30 * model.config.num_hidden_layers and set(calls) == {32}
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.7 * first, losses


def test_eval_mode_never_calls_s2(monkeypatch):
    model = tiny_llama(s2_group_size=32).eval()
    monkeypatch.setattr(attention, "s2_attention", None)  # any call would raise
    with torch.no_grad():
        model(input_ids=byte_corpus(256).view(2, 128))
