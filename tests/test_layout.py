"""The pure segment construction behind both backends (cu_seqlens for flash-attn varlen), checked on CPU."""

import pytest
import torch
from tests.helpers.reference import document_positions

from longlora_plugin import S2Settings
from longlora_plugin.ops import bucket_segments, s2_segments, token_layout


def segments_as_lists(layout, group_size, offset):
    seg = s2_segments(layout, group_size, offset)
    return seg.cu_seqlens().tolist(), seg.max_length()


def test_one_row_divisible():
    layout = token_layout(1, 16)
    assert segments_as_lists(layout, 4, 0) == ([0, 4, 8, 12, 16], 4)
    # Shifted: a first segment of G/2, whole groups offset by G/2, then the G/2 remainder. No wrap-around.
    assert segments_as_lists(layout, 4, 2) == ([0, 2, 6, 10, 14, 16], 4)


def test_indivisible_and_shorter_than_group():
    assert segments_as_lists(token_layout(1, 10), 4, 0) == ([0, 4, 8, 10], 4)
    assert segments_as_lists(token_layout(1, 10), 4, 2) == ([0, 2, 6, 10], 4)
    assert segments_as_lists(token_layout(1, 3), 8, 0) == ([0, 3], 3)
    assert segments_as_lists(token_layout(1, 3), 8, 4) == ([0, 3], 3)
    assert segments_as_lists(token_layout(1, 7), 5, 2) == ([0, 3, 7], 4)  # odd G: first segment is G - G // 2


def test_ragged_rows_give_monotone_per_row_segments():
    """The reference took group boundaries from the batch-wide length: non-monotone cu_seqlens, then a crash."""
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],  # left padding, 8 tokens
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # right padding, 5 tokens
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # 10 tokens
        ],
        dtype=torch.bool,
    )
    layout = token_layout(3, 10, padding_mask=mask)
    assert layout.valid_index.tolist() == [i for i, m in enumerate(mask.reshape(-1).tolist()) if m]
    assert layout.position.tolist() == [*range(8), *range(5), *range(10)]
    assert segments_as_lists(layout, 4, 0) == ([0, 4, 8, 12, 13, 17, 21, 23], 4)
    assert segments_as_lists(layout, 4, 2) == ([0, 2, 6, 8, 10, 13, 15, 19, 23], 4)


def test_packed_documents_from_cu_seqlens_and_from_position_ids_agree():
    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    from_cu = token_layout(1, 12, cu_seqlens=cu)
    from_positions = token_layout(1, 12, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1]]))
    for layout in (from_cu, from_positions):
        assert layout.position.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1]
        assert segments_as_lists(layout, 4, 0) == ([0, 3, 7, 10, 12], 4)
        assert segments_as_lists(layout, 4, 2) == ([0, 2, 3, 5, 9, 10, 12], 4)
        assert not layout.rows_are_documents


def test_packed_cu_seqlens_over_several_rows():
    cu = torch.tensor([0, 5, 9, 16], dtype=torch.int32)  # 2 rows x 8 slots; the second document crosses rows
    layout = token_layout(2, 8, cu_seqlens=cu)
    # A row start also starts a document: rows never attend to each other.
    assert layout.position.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("seed", range(20))
def test_segments_follow_the_rules(seed):
    """Every segment lies in one document and one group; segments tile the real tokens in order."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq_len = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 30, (1,), generator=gen))
    group_size = int(torch.randint(1, 9, (1,), generator=gen))
    mask = torch.rand(batch, seq_len, generator=gen) > 0.2
    positions = torch.randint(0, 3, (batch, seq_len), generator=gen).cumsum(1)  # restarts where a step is not +1
    layout = token_layout(batch, seq_len, padding_mask=mask, position_ids=positions)
    docs, pos = document_positions(batch, seq_len, mask, positions)
    flat_docs = [d for row in docs for d in row if d >= 0]
    flat_pos = [p for row in pos for p in row if p >= 0]
    assert layout.position.tolist() == flat_pos
    for offset in {0, group_size // 2}:
        seg = s2_segments(layout, group_size, offset)
        cu = seg.cu_seqlens().tolist()
        assert cu[0] == 0 and cu[-1] == len(flat_pos) and all(a < b for a, b in zip(cu[:-1], cu[1:]))
        for a, b in zip(cu[:-1], cu[1:]):
            assert len({flat_docs[i] for i in range(a, b)}) == 1
            assert len({(flat_pos[i] + offset) // group_size for i in range(a, b)}) == 1
            assert b - a <= group_size
        # Maximal: consecutive segments differ in document or group.
        for boundary in cu[1:-1]:
            same_doc = flat_docs[boundary] == flat_docs[boundary - 1]
            same_group = (flat_pos[boundary] + offset) // group_size == (flat_pos[boundary - 1] + offset) // group_size
            assert not (same_doc and same_group)


def test_buckets_cover_every_token_once():
    mask = torch.rand(3, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    layout = token_layout(3, 40, padding_mask=mask)
    seg = s2_segments(layout, 12, 6)
    buckets, scatter = bucket_segments(seg, 12)
    flat = torch.cat([b.gather_index.reshape(-1) for b in buckets])
    assert torch.equal(flat[scatter], torch.arange(layout.num_tokens))
    assert all(b.length <= 12 for b in buckets)


def test_group_size_resolution():
    def group(seq_len, **settings):
        return S2Settings(**settings).group_size_for(seq_len)

    assert group(1000) == 250
    assert group(1000, group_size_ratio=0.5) == 500
    assert group(1000, group_size=64, group_size_ratio=0.5) == 64
    assert group(1, group_size_ratio=0.25) == 1
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="s2_group_size must be a positive int or None"):
            S2Settings(group_size=bad)
    for bad in (0.0, 1.5, -0.1, "0.25"):
        with pytest.raises(ValueError, match=r"s2_group_size_ratio must be a number in \(0, 1\]"):
            S2Settings(group_size_ratio=bad)
