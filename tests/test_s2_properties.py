"""Property-based: S2-Attn equals the reference over random shapes, group sizes, GQA ratios, paddings and packings."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.reference import reference_s2_attention

from longlora_plugin.ops import s2_attention


@st.composite
def s2_cases(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 28))
    group_size = draw(st.integers(1, 12))
    kwargs = {"group_size": group_size, "shift": draw(st.booleans())}
    layout = draw(st.sampled_from(["none", "padding", "packed", "positions"]))
    if layout == "padding":
        mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=seq_len, max_size=seq_len), min_size=batch, max_size=batch)))
        kwargs["padding_mask"] = mask
    elif layout == "packed":
        cuts = draw(st.lists(st.integers(0, batch * seq_len), max_size=5))
        kwargs["cu_seqlens"] = torch.tensor(sorted({0, batch * seq_len, *cuts}), dtype=torch.int32)
    elif layout == "positions":
        steps = draw(st.lists(st.integers(0, 2), min_size=seq_len, max_size=seq_len))
        kwargs["position_ids"] = torch.tensor(steps).cumsum(0).unsqueeze(0)  # a step that is not +1 restarts
    if draw(st.booleans()):
        kwargs["sliding_window"] = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**16))
    return batch, heads, kv_heads, seq_len, kwargs, seed


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(s2_cases())
def test_s2_matches_reference_on_random_cases(case):
    batch, heads, kv_heads, seq_len, kwargs, seed = case
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq_len, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq_len, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    out = s2_attention(q, k, v, **kwargs)
    expected = reference_s2_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-8)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
