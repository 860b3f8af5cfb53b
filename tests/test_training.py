"""A tiny Llama learns with S2-Attn, and S2-Attn is what it trained with."""

import torch

import longlora_plugin.attention as attention
from longlora_plugin.demo import byte_corpus, tiny_llama, train_s2


def test_tiny_llama_loss_falls_over_30_s2_steps(monkeypatch):
    calls = []
    real = attention.s2_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["group_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "s2_attention", counting)
    model = tiny_llama(hidden_size=64, s2_group_size=32)
    losses = train_s2(model, byte_corpus(200_000), steps=30, seq_len=128, batch_size=4)
    assert len(calls) == 30 * model.config.num_hidden_layers and set(calls) == {32}
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.7 * first, losses


def test_eval_mode_never_calls_s2():
    model = tiny_llama(hidden_size=64, s2_group_size=32).eval()
    batch = byte_corpus(256).view(2, 128)
    original = attention.s2_attention
    try:
        attention.s2_attention = None  # any call would raise
        with torch.no_grad():
            model(input_ids=batch)
    finally:
        attention.s2_attention = original
