"""A slow, obviously-correct S2-Attn: explicit per-head boolean masks built token by token from the rules."""

from __future__ import annotations

import torch


def document_positions(
    batch_size: int,
    seq_len: int,
    padding_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Per slot: a document number (-1 for padding) and the position inside that document."""
    packed_starts = set(cu_seqlens.tolist()) if cu_seqlens is not None else set()
    docs, positions = [], []
    doc = -1
    for b in range(batch_size):
        row_docs, row_pos = [], []
        previous_pos = None
        count = 0
        for t in range(seq_len):
            pos = None if position_ids is None else int(position_ids[min(b, position_ids.shape[0] - 1), t])
            starts = t == 0 or (b * seq_len + t) in packed_starts or (pos is not None and pos != previous_pos + 1)
            previous_pos = pos
            if starts:
                doc += 1
                count = 0
            if padding_mask is not None and not bool(padding_mask[b, t]):
                row_docs.append(-1)
                row_pos.append(-1)
                continue
            row_docs.append(doc)
            row_pos.append(count)
            count += 1
        docs.append(row_docs)
        positions.append(row_pos)
    return docs, positions


def s2_allowed(
    num_heads: int,
    seq_len: int,
    docs: list[int],
    positions: list[int],
    group_size: int,
    shift: bool,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """(H, S, S) bool for one row: may query i of head h attend key j."""
    allowed = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.bool)
    for h in range(num_heads):
        offset = group_size // 2 if shift and h >= num_heads // 2 else 0
        for i in range(seq_len):
            for j in range(i + 1):
                if docs[i] < 0 or docs[i] != docs[j]:
                    continue
                if (positions[i] + offset) // group_size != (positions[j] + offset) // group_size:
                    continue
                if sliding_window is not None and positions[i] - positions[j] >= sliding_window:
                    continue
                allowed[h, i, j] = True
    return allowed


def attend_with_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Eager attention in float64. query (B, H, S, D), key/value (B, H_kv, S, D), allowed (B, H, S, S) ->
    (B, S, H, D) in query's dtype; a query that may attend nothing gives zeros."""
    n_rep = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(n_rep, 1), value.double().repeat_interleave(n_rep, 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2).to(query.dtype)


def reference_s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group_size: int,
    shift: bool = True,
    padding_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    batch, num_heads, seq_len, _ = query.shape
    docs, positions = document_positions(batch, seq_len, padding_mask, position_ids, cu_seqlens)
    allowed = torch.stack(
        [s2_allowed(num_heads, seq_len, docs[b], positions[b], group_size, shift, sliding_window) for b in range(batch)]
    )
    return attend_with_mask(query, key, value, allowed, scaling, softcap)
