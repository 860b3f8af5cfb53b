"""S2-Attn tensor ops against the slow reference: outputs and gradients, over shapes, layouts and dtypes."""

import pytest
import torch
import torch.nn.functional as F
from tests.helpers.reference import reference_s2_attention

from longlora_plugin.ops import s2_attention

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}

# (batch, heads, kv heads, seq_len, group size)
SHAPES = [
    pytest.param(1, 4, 4, 32, 8, id="divisible"),
    pytest.param(2, 4, 2, 37, 8, id="indivisible-gqa2"),
    pytest.param(3, 6, 2, 29, 6, id="gqa3-ragged-halves"),
    pytest.param(2, 8, 1, 24, 5, id="mqa-odd-group"),
    pytest.param(2, 4, 4, 9, 16, id="shorter-than-group"),
    pytest.param(2, 5, 5, 23, 4, id="odd-heads"),
    pytest.param(1, 1, 1, 11, 4, id="one-head"),
    pytest.param(2, 4, 2, 17, 1, id="group-of-one"),
]


def make_layout(kind: str, batch: int, seq_len: int) -> dict:
    if kind == "none":
        return {}
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    if kind == "left-pad":
        for b in range(batch):
            mask[b, : (3 * b + 1) % seq_len] = False
        return {"padding_mask": mask}
    if kind == "right-pad":
        for b in range(batch):
            mask[b, seq_len - (2 * b + 3) % seq_len :] = False
        return {"padding_mask": mask}
    if kind == "ragged-both":
        for b in range(batch):
            mask[b, : b % 3] = False
            mask[b, seq_len - (b * 5) % 7 :] = False
        return {"padding_mask": mask}
    total = batch * seq_len
    cuts = sorted({0, total, *(int(c) for c in torch.linspace(0, total, 5)[1:-1].round()), min(3, total)})
    if kind == "packed-cu":
        return {"cu_seqlens": torch.tensor(cuts, dtype=torch.int32)}
    if kind == "restart-position-ids":
        positions = torch.cat([torch.arange(b - a) for a, b in zip(cuts[:-1], cuts[1:])]).view(batch, seq_len)
        return {"position_ids": positions}
    raise ValueError(kind)


LAYOUTS = ["none", "left-pad", "right-pad", "ragged-both", "packed-cu", "restart-position-ids"]


def random_qkv(batch, heads, kv_heads, seq_len, head_dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(h):
        return torch.randn(batch, h, seq_len, head_dim, generator=generator).to(dtype).requires_grad_()

    return rand(heads), rand(kv_heads), rand(kv_heads)


def check_against_reference(q, k, v, **kwargs):
    out = s2_attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out, dtype=torch.float64)
    (out.double() * grad_out).sum().backward()
    ref_q, ref_k, ref_v = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = reference_s2_attention(ref_q, ref_k, ref_v, **kwargs)
    (expected * grad_out).sum().backward()
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.double(), expected.detach(), **tol)
    for ours, ref in ((q, ref_q), (k, ref_k), (v, ref_v)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, **tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch,heads,kv_heads,seq_len,group_size", SHAPES)
def test_matches_reference_fp32(batch, heads, kv_heads, seq_len, group_size, layout):
    q, k, v = random_qkv(batch, heads, kv_heads, seq_len)
    check_against_reference(q, k, v, group_size=group_size, **make_layout(layout, batch, seq_len))


@pytest.mark.parametrize("layout", ["none", "ragged-both", "packed-cu"])
@pytest.mark.parametrize("batch,heads,kv_heads,seq_len,group_size", SHAPES[:4])
def test_matches_reference_bf16(batch, heads, kv_heads, seq_len, group_size, layout):
    q, k, v = random_qkv(batch, heads, kv_heads, seq_len, dtype=torch.bfloat16)
    check_against_reference(q, k, v, group_size=group_size, **make_layout(layout, batch, seq_len))


@pytest.mark.parametrize("layout", ["none", "left-pad", "packed-cu"])
def test_shift_off_matches_reference(layout):
    q, k, v = random_qkv(2, 4, 2, 26)
    check_against_reference(q, k, v, group_size=6, shift=False, **make_layout(layout, 2, 26))


@pytest.mark.parametrize("layout", ["none", "right-pad", "restart-position-ids"])
@pytest.mark.parametrize("window", [1, 3, 7, 100])
def test_sliding_window_matches_reference(layout, window):
    q, k, v = random_qkv(2, 4, 2, 30)
    check_against_reference(q, k, v, group_size=8, sliding_window=window, **make_layout(layout, 2, 30))


@pytest.mark.parametrize("layout", ["none", "left-pad", "packed-cu"])
def test_softcap_matches_reference(layout):
    q, k, v = random_qkv(2, 4, 2, 27)
    q.data *= 4  # large logits, so that the cap matters
    check_against_reference(q, k, v, group_size=8, softcap=3.0, scaling=0.3, **make_layout(layout, 2, 27))


def test_group_covering_the_sequence_without_shift_is_full_causal_attention():
    q, k, v = random_qkv(2, 4, 2, 33)
    out = s2_attention(q, k, v, group_size=33, shift=False)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["none", "right-pad", "packed-cu"])
@pytest.mark.parametrize("t", [0, 5, 12, 20])
def test_later_tokens_never_change_earlier_outputs(layout, t):
    batch, seq_len = 2, 24
    q, k, v = random_qkv(batch, 8, 4, seq_len)
    kwargs = dict(group_size=8, **make_layout(layout, batch, seq_len))
    before = s2_attention(q, k, v, **kwargs)
    changed = [x.detach().clone() for x in (q, k, v)]
    for x in changed:
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 10
    after = s2_attention(*changed, **kwargs)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
    if layout == "none":  # the perturbation is real: later outputs do change
        assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_first_token_sees_only_itself_in_every_head():
    """The reference's roll wraps the last G/2 tokens around to the front of the shifted heads; ours must not."""
    q, k, v = random_qkv(1, 4, 4, 32)
    out = s2_attention(q, k, v, group_size=8)  # (B, S, H, D)
    torch.testing.assert_close(out[0, 0], v[0, :, 0], atol=1e-6, rtol=1e-6)


def test_packed_documents_equal_each_document_alone():
    lengths = [5, 17, 1, 9]
    q, k, v = random_qkv(1, 4, 2, sum(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = s2_attention(q, k, v, group_size=6, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = s2_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], group_size=6)
        torch.testing.assert_close(packed[:, a:b], alone, atol=1e-6, rtol=1e-5)


def test_padded_rows_equal_each_row_alone():
    q, k, v = random_qkv(3, 4, 2, 20)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[0, :7] = False  # left padding
    mask[2, 13:] = False  # right padding
    batched = s2_attention(q, k, v, group_size=6, padding_mask=mask)
    for b in range(3):
        keep = mask[b].nonzero().squeeze(1)
        alone = s2_attention(*(x[b : b + 1, :, keep] for x in (q, k, v)), group_size=6)
        torch.testing.assert_close(batched[b, keep], alone[0], atol=1e-6, rtol=1e-5)
        assert batched[b, ~mask[b]].abs().max() == 0 if (~mask[b]).any() else True


def test_fully_padded_batch_gives_zeros_and_zero_gradients():
    q, k, v = random_qkv(2, 4, 2, 6)
    out = s2_attention(q, k, v, group_size=4, padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert out.shape == (2, 6, 4, 8) and out.abs().max() == 0
    out.sum().backward()
    assert all(x.grad is not None and x.grad.abs().max() == 0 for x in (q, k, v))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(group_size=0), "group_size must be a positive int, got 0"),
        (dict(group_size=2.5), "got 2.5"),
        (dict(group_size=4, backend="triton"), "got 'triton'"),
        (dict(group_size=4, backend="flash"), r"backend 'flash' cannot serve this layer; it needs CUDA tensors"),
        (dict(group_size=4, backend="varlen"), r"backend 'varlen' cannot serve this layer; it needs CUDA tensors"),
        (dict(group_size=4, sliding_window=0), "sliding_window must be a positive int"),
        (dict(group_size=4, cu_seqlens=torch.tensor([0, 3, 5])), r"cu_seq_lens must rise from 0 to .*\(12\)"),
        (dict(group_size=4, cu_seqlens=torch.tensor([0, 8, 4, 12])), r"got \[0, 8, 4, 12\]"),
        (dict(group_size=4, padding_mask=torch.ones(2, 5, dtype=torch.bool)), r"padding mask of shape \(2, 5\)"),
        (dict(group_size=4, position_ids=torch.zeros(3, 6, dtype=torch.long)), r"position_ids of shape \(3, 6\)"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    q, k, v = random_qkv(2, 4, 2, 6)
    with pytest.raises(ValueError, match=message):
        s2_attention(q, k, v, **kwargs)


def test_heads_not_a_multiple_of_kv_heads_is_refused():
    q, k, v = random_qkv(1, 6, 4, 8)
    with pytest.raises(ValueError, match=r"query heads \(6\) to be a multiple of the key/value heads \(4\)"):
        s2_attention(q, k, v, group_size=4)


cuda_flash = pytest.mark.skipif(
    not (torch.cuda.is_available() and __import__("importlib").util.find_spec("flash_attn")),
    reason="needs CUDA and flash-attn",
)


@pytest.mark.gpu
@cuda_flash
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flash_backend_matches_sdpa_backend_on_gpu(layout):
    batch, seq_len = 3, 301
    q, k, v = (x.detach().cuda().bfloat16().requires_grad_() for x in random_qkv(batch, 8, 2, seq_len, head_dim=64))
    kwargs = dict(group_size=64, **{n: t.cuda() for n, t in make_layout(layout, batch, seq_len).items()})
    grad_out = torch.randn(batch, seq_len, 8, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend in ("flash", "sdpa"):
        for x in (q, k, v):
            x.grad = None
        out = s2_attention(q, k, v, backend=backend, **kwargs)
        (out * grad_out).sum().backward()
        results.append((out.detach().float(), *(x.grad.float() for x in (q, k, v))))
    for flash, sdpa in zip(*results):
        torch.testing.assert_close(flash, sdpa, atol=2e-2, rtol=2e-2)
