"""Passkey retrieval scored with full attention: greedy exact match per length, and a depth x length grid."""

from __future__ import annotations

import random
from typing import Callable

import torch

from ..data.passkey import PASSKEY_INTRO, passkey_batch

__all__ = ["passkey_accuracy", "passkey_grid", "passkey_lengths"]


def passkey_lengths(minimum: int, maximum: int, interval: int) -> list[int]:
    """Lengths from ``minimum`` to ``maximum`` on ``interval`` (``maximum`` always included)."""
    if minimum < 1 or maximum < minimum or interval < 1:
        raise ValueError(f"need 1 <= min-length <= max-length and interval >= 1, got {minimum}, {maximum}, {interval}")
    lengths = list(range(minimum, maximum + 1, interval))
    return lengths if lengths[-1] == maximum else [*lengths, maximum]


def passkey_accuracy(
    model,
    encode: Callable[[str], list[int]],
    length: int,
    trials: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    intro: str = PASSKEY_INTRO,
    depth: float | None = None,
) -> float:
    """Exact-match accuracy of greedy decoding, computed teacher-forced in one pass per batch.

    ``depth`` fixes where the key is hidden (0 = start, 1 = end); None draws it at random per sample.
    Greedy decoding reproduces the key exactly iff the argmax at every answer position is the key's next token, so
    checking all answer positions at once is the same test as decoding token by token.
    """
    rng = random.Random(seed)
    correct = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        done = 0
        while done < trials:
            n = min(batch_size, trials - done)
            input_ids, labels, _ = passkey_batch(encode, length, n, rng, intro=intro, depth=depth)
            logits = model(input_ids=input_ids).logits  # (B, S, V)
            predicted = logits[:, :-1].argmax(-1)  # prediction for token t + 1
            targets = labels[:, 1:]
            answer = targets != -100
            correct += int(((predicted == targets) | ~answer).all(dim=1).sum())
            done += n
    model.train(was_training)
    return correct / trials


def passkey_grid(
    model,
    encode: Callable[[str], list[int]],
    lengths: list[int],
    trials: int,
    *,
    depths: int = 0,
    seed: int = 0,
    intro: str = PASSKEY_INTRO,
    progress: bool = False,
) -> tuple[dict[int, float], dict[tuple[int, float | None], float]]:
    """Accuracy per length, and per (length, depth) for ``depths`` evenly spaced key depths (0 or 1: a random depth
    per trial). A length's accuracy is the mean over its depths."""
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    depth_list = [None] if depths < 2 else [i / (depths - 1) for i in range(depths)]
    cells = [(n, d) for n in lengths for d in depth_list]
    if progress:
        from tqdm.auto import tqdm

        cells = tqdm(cells, desc="passkey")
    grid = {
        (n, d): passkey_accuracy(model, encode, n, trials, seed=seed, intro=intro, depth=d) for n, d in cells
    }
    by_length = {n: sum(grid[(n, d)] for d in depth_list) / len(depth_list) for n in lengths}
    return by_length, grid
