"""Sliding-window perplexity on long documents, with full attention (the paper's protocol, stride 256).

Each window of ``context_length`` tokens moves by ``stride``; only the tokens no earlier window scored are scored,
each with as much left context as the window holds. Windows are run one at a time, so memory stays that of one
forward pass at ``context_length`` (SDPA's causal kernel, no O(S^2) mask).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["document_token_ids", "perplexity_at_lengths", "sliding_window_nll"]


def document_token_ids(records, tokenizer, text_field: str, *, max_tokens: int | None = None, source: str = "data"):
    """Each record's ``text_field`` as token ids (no special tokens), cut to ``max_tokens``."""
    documents = []
    for index, record in enumerate(records):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"{source}: record {index} has no text field '{text_field}'")
        documents.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
    return documents


def sliding_window_nll(model, tokens: list[int], context_length: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of tokens scored in one document.

    Every token but the document's first is scored exactly once (when stride == context_length, a window's first
    token has no context and is skipped, as in the usual protocol).
    """
    if context_length < 2 or not 1 <= stride <= context_length:
        raise ValueError(f"need context_length >= 2 and 1 <= stride <= context_length, got {context_length}, {stride}")
    device = next(model.parameters()).device
    total, count, scored_until = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + context_length, len(tokens))
        window = torch.tensor(tokens[begin:end], device=device).unsqueeze(0)  # (1, W)
        targets = window[:, 1:].clone()  # token j + 1 is predicted at position j
        targets[:, : max(scored_until - begin - 1, 0)] = -100  # already scored by an earlier window
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=window).logits[:, :-1].float(), dim=-1)  # (1, W-1, V)
        keep = targets != -100
        total -= log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum().item()
        count += int(keep.sum())
        scored_until = end
        if end == len(tokens):
            break
    return total, count


def perplexity_at_lengths(
    model, documents: Iterable[list[int]], context_lengths: list[int], stride: int, progress: bool = False
) -> dict[int, float]:
    """Perplexity over all documents for each evaluation context length (full attention: eval mode)."""
    model.eval()
    documents = [doc for doc in documents if len(doc) > 1]
    if not documents:
        raise ValueError("no document with at least two tokens to evaluate")
    results = {}
    for length in context_lengths:
        iterator = documents
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(documents, desc=f"perplexity @ {length}")
        total = count = 0
        for doc in iterator:
            nll, scored = sliding_window_nll(model, doc, length, min(stride, length))
            total, count = total + nll, count + scored
        results[length] = math.exp(total / count)
    return results
