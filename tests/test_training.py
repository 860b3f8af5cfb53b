"""A tiny Llama learns with S2-Attn, and S2-Attn is what it trained with."""

import torch

import longlora_plugin.hf_attention as attention
from tests.helpers.tiny import byte_corpus, tiny_llama, train_s2


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


def test_logit_scale_multiplies_the_attention_scores_in_training_and_leaves_inference_alone():
    """s2_logit_scale=f trains exactly like a model whose every attention ``scaling`` is f times larger."""
    import copy

    from longlora_plugin import configure_s2

    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64, s2_group_size=32)
    reference = copy.deepcopy(model)
    configure_s2(model, logit_scale=0.5)
    for layer in reference.model.layers:
        layer.self_attn.scaling *= 0.5
    batch = byte_corpus(512).view(2, 256)
    model.train(), reference.train()
    scaled = model(input_ids=batch).logits
    assert torch.allclose(scaled, reference(input_ids=batch).logits, atol=1e-5)
    for layer in reference.model.layers:
        layer.self_attn.scaling *= 2.0
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, reference(input_ids=batch).logits)
    assert not torch.allclose(scaled, model(input_ids=batch).logits, atol=1e-3)


def test_a_rope_attention_factor_divided_out_in_training_leaves_s2_training_unchanged():
    """yarn attention_factor a and s2_logit_scale 1/a^2: S2 training is the plain model's, full attention is a^2 sharper."""
    import copy

    from longlora_plugin import configure_s2, extend_rope

    torch.manual_seed(0)
    plain = tiny_llama(hidden_size=64, s2_group_size=32)
    tempered = copy.deepcopy(plain)
    rope = dict(rope_type="yarn", original_length=128)
    extend_rope(plain, 512, rope_options={"attention_factor": 1.0}, **rope)
    extend_rope(tempered, 512, rope_options={"attention_factor": 1.25}, **rope)
    configure_s2(tempered, logit_scale=1 / 1.25**2)
    batch = byte_corpus(1024).view(2, 512)
    plain.train(), tempered.train()
    torch.testing.assert_close(tempered(input_ids=batch).logits, plain(input_ids=batch).logits, atol=1e-4, rtol=1e-4)
    plain.eval(), tempered.eval()
    for layer in plain.model.layers:
        layer.self_attn.scaling *= 1.25**2
    with torch.no_grad():
        torch.testing.assert_close(tempered(input_ids=batch).logits, plain(input_ids=batch).logits, atol=1e-4, rtol=1e-4)
