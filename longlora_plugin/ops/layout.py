"""Where S2-Attn's attention segments lie.

Pure functions from a batch's token layout (padding mask, restarting position ids, packed ``cu_seqlens``) to the
contiguous segments inside which S2-Attn attends causally. Both backends consume these segments: flash-attn as
varlen ``cu_seqlens``, SDPA as equal-length buckets of gathered segments.

Vocabulary: the batch has ``B * S`` token slots; ``T`` of them are real tokens (not padding). Real tokens are
kept in row-major order ("compact" order), so a document, and every segment inside it, is a contiguous run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TokenLayout",
    "Segments",
    "SegmentBucket",
    "token_layout",
    "s2_segments",
    "bucket_segments",
]


@dataclass(frozen=True)
class TokenLayout:
    """The real tokens of a batch, in compact order, and where their documents start."""

    num_slots: int  # B * S
    valid_index: torch.Tensor | None  # (T,) slot of each real token; None when every slot is real
    position: torch.Tensor  # (T,) position p of the token inside its own document, from 0
    doc_start: torch.Tensor  # (T,) bool, True at the first token of each document
    rows_are_documents: bool  # no padding and no packing: every row is one document, p = 0..S-1

    @property
    def num_tokens(self) -> int:
        return self.position.numel()


@dataclass(frozen=True)
class Segments:
    """Contiguous runs of compact tokens that attend causally among themselves and to nothing else."""

    starts: torch.Tensor  # (N,) compact index of each segment's first token
    lengths: torch.Tensor  # (N,)
    num_tokens: int  # T

    def cu_seqlens(self) -> torch.Tensor:
        """(N + 1,) int32 cumulative boundaries, the varlen convention of flash-attn."""
        cu = torch.zeros(self.lengths.numel() + 1, dtype=torch.int32, device=self.lengths.device)
        torch.cumsum(self.lengths, 0, out=cu[1:])
        return cu

    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0


@dataclass(frozen=True)
class SegmentBucket:
    """Segments of one padded length, gathered into a dense batch for one SDPA call."""

    length: int  # L, the padded segment length
    gather_index: torch.Tensor  # (n, L) compact token index per slot; T (a zero row) marks tail padding
    has_padding: bool


def _validate_cu_seqlens(cu_seqlens: torch.Tensor, num_slots: int) -> torch.Tensor:
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seq_lens must be a 1-D tensor [0, ..., total], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if int(cu[0]) != 0 or int(cu[-1]) != num_slots or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seq_lens must rise from 0 to the number of token slots ({num_slots}), got {cu_seqlens.tolist()}"
        )
    return cu


def token_layout(
    batch_size: int,
    seq_len: int,
    *,
    padding_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> TokenLayout:
    """Find the documents of a batch.

    A document starts at each row start, at each packed boundary in ``cu_seqlens`` (over the flattened ``B * S``
    slots, as TRL's padding-free collator gives them), and wherever ``position_ids`` do not continue by +1 (the
    rule transformers uses to detect packing). Padding slots (``padding_mask`` False) are then dropped; a
    token's position p is its rank among the real tokens of its document.
    """
    num_slots = batch_size * seq_len
    starts = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
    starts[:, :1] = True
    if position_ids is not None:
        if position_ids.ndim == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.shape[-1] != seq_len or position_ids.shape[0] not in (1, batch_size):
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)} do not match a batch of {batch_size} x {seq_len}"
            )
        pos = position_ids.to(device).expand(batch_size, seq_len)
        starts[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    starts = starts.reshape(num_slots)
    if cu_seqlens is not None:
        cu = _validate_cu_seqlens(cu_seqlens.to(device), num_slots)[:-1]
        starts[cu[cu < num_slots]] = True

    valid_index = None
    if padding_mask is not None:
        if tuple(padding_mask.shape) != (batch_size, seq_len):
            raise ValueError(
                f"padding mask of shape {tuple(padding_mask.shape)} does not match a batch of {batch_size} x {seq_len}"
            )
        valid = padding_mask.to(device=device, dtype=torch.bool).reshape(num_slots)
        if not bool(valid.all()):
            doc_id = torch.cumsum(starts, 0)  # (B*S,)
            valid_index = valid.nonzero().squeeze(1)  # (T,)
            doc_id = doc_id[valid_index]
            starts = torch.ones_like(doc_id, dtype=torch.bool)
            starts[1:] = doc_id[1:] != doc_id[:-1]

    index = torch.arange(starts.numel(), device=starts.device)  # (T,)
    first_of_doc = torch.where(starts, index, torch.zeros_like(index)).cummax(0).values
    rows_are_documents = valid_index is None and int(starts.sum()) == batch_size
    return TokenLayout(
        num_slots=num_slots,
        valid_index=valid_index,
        position=index - first_of_doc,
        doc_start=starts,
        rows_are_documents=rows_are_documents,
    )


def s2_segments(layout: TokenLayout, group_size: int, offset: int) -> Segments:
    """Segments of the heads whose groups are ``(p + offset) // group_size``; offset 0 or G // 2 (shifted)."""
    if layout.num_tokens == 0:
        empty = torch.zeros(0, dtype=torch.long, device=layout.position.device)
        return Segments(starts=empty, lengths=empty, num_tokens=0)
    group = torch.div(layout.position + offset, group_size, rounding_mode="floor")  # (T,)
    begins = layout.doc_start.clone()
    begins[1:] |= group[1:] != group[:-1]
    starts = begins.nonzero().squeeze(1)  # (N,)
    ends = torch.cat([starts[1:], starts.new_tensor([layout.num_tokens])])
    return Segments(starts=starts, lengths=ends - starts, num_tokens=layout.num_tokens)


def _padded_length(lengths: torch.Tensor, group_size: int) -> torch.Tensor:
    # Next power of two, capped at G: few distinct buckets, at most 2x waste on a short segment.
    pow2 = torch.pow(2, torch.ceil(torch.log2(lengths.clamp(min=1).double()))).long()
    return torch.minimum(pow2, torch.full_like(pow2, max(group_size, 1)))


def bucket_segments(segments: Segments, group_size: int) -> tuple[list[SegmentBucket], torch.Tensor]:
    """Group segments into dense buckets for batched SDPA.

    Tail padding inside a bucket slot is harmless under causal attention: a real token never attends to a later
    slot. Returns the buckets and ``scatter_index`` (T,): for each compact token, its row in the concatenation of
    all bucket outputs flattened to ``(sum(n * L), ...)``.
    """
    num_tokens = segments.num_tokens
    device = segments.starts.device
    scatter_index = torch.empty(num_tokens, dtype=torch.long, device=device)
    buckets: list[SegmentBucket] = []
    if num_tokens == 0:
        return buckets, scatter_index
    padded = _padded_length(segments.lengths, group_size)  # (N,)
    base = 0
    for length in sorted(set(padded.tolist())):
        chosen = (padded == length).nonzero().squeeze(1)
        starts, lengths = segments.starts[chosen], segments.lengths[chosen]  # (n,)
        slot = torch.arange(length, device=device)  # (L,)
        is_pad = slot[None, :] >= lengths[:, None]  # (n, L)
        gather_index = torch.where(is_pad, num_tokens, starts[:, None] + slot[None, :])
        rows = base + torch.arange(chosen.numel() * length, device=device).view(-1, length)  # (n, L)
        real = ~is_pad
        scatter_index[gather_index[real]] = rows[real]
        buckets.append(SegmentBucket(length=length, gather_index=gather_index, has_padding=bool(is_pad.any())))
        base += chosen.numel() * length
    return buckets, scatter_index
