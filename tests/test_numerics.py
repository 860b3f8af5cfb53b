"""Half precision edge cases: no NaN or inf in outputs or gradients."""

import pytest
import torch
from tests.helpers.families import tiny_config
from transformers import AutoModelForCausalLM

from longlora_plugin import S2_ATTENTION, s2_attention


def finite_forward_backward(dtype, batch, seq_len, group_size, scale=1.0, **kwargs):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        (torch.randn(batch, h, seq_len, 16, generator=generator) * scale).to(dtype).requires_grad_()
        for h in (4, 2, 2)
    )
    out = s2_attention(q, k, v, group_size=group_size, **kwargs)
    out.float().square().sum().backward()
    for tensor in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(tensor.float()).all()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_padded_rows(dtype):
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1] = False  # a row of padding only
    out = finite_forward_backward(dtype, 3, 20, 8, padding_mask=mask)
    assert out[1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_padded_batch(dtype):
    out = finite_forward_backward(dtype, 2, 12, 4, padding_mask=torch.zeros(2, 12, dtype=torch.bool))
    assert out.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_with_a_single_real_token(dtype):
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, -1] = True  # left padded
    mask[1, 0] = True  # right padded
    finite_forward_backward(dtype, 2, 12, 4, padding_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_one_token_documents(dtype):
    finite_forward_backward(dtype, 1, 6, 4, cu_seqlens=torch.tensor([0, 1, 2, 5, 6], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_len", [1, 2])
def test_very_short_sequences(dtype, seq_len):
    finite_forward_backward(dtype, 2, seq_len, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_of_one_token(dtype):
    finite_forward_backward(dtype, 2, 9, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_sequence_with_large_logits(dtype):
    # Logits of about +-1000 (softmax fully saturated); at scale 30 even plain SDPA's fp16 gradients overflow.
    finite_forward_backward(dtype, 1, 2048, 512, scale=16.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_model_with_a_padding_only_row_trains_finite(dtype):
    model = AutoModelForCausalLM.from_config(tiny_config("llama", s2_group_size=4), attn_implementation=S2_ATTENTION)
    model = model.to(dtype).train()
    input_ids = torch.randint(3, 90, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None)
