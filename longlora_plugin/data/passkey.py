"""The passkey-retrieval task, the paper's protocol (after Landmark Attention): a random key hidden at a random depth
in filler text, then a question; the answer is the key. Scoring lives in ``longlora_plugin.eval.passkey``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "PASSKEY_FILLER",
    "PASSKEY_INTRO",
    "PASSKEY_QUESTION",
    "PasskeySample",
    "make_passkey_sample",
    "passkey_batch",
    "s2_reach_start",
]

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. "
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "


@dataclass(frozen=True)
class PasskeySample:
    prompt_ids: list[int]  # everything up to and including the question
    answer_ids: list[int]  # the key's tokens
    key: str
    depth: float  # where the needle sits, 0 (start) .. 1 (end of the filler)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def s2_reach_start(position: int, group_size: int) -> int:
    """The first position that the token at ``position`` attends to in training under S2-Attn: the start of its own
    group or of its shifted group (offset G/2), whichever is earlier."""
    own = position // group_size * group_size
    shifted = max((position + group_size // 2) // group_size * group_size - group_size // 2, 0)
    return min(own, shifted)


def make_passkey_sample(
    encode: Callable[[str], list[int]],
    length: int,
    rng: random.Random,
    *,
    depth: float | None = None,
    digits: int = 5,
    intro: str = PASSKEY_INTRO,
    reach_group_size: int | None = None,
) -> PasskeySample:
    """A sample of about ``length`` tokens (prompt + answer) under ``encode``; shorter filler if it must.

    The filler is cut at a token boundary to hit the length; the needle goes in at ``depth`` (random if None).
    With ``reach_group_size`` G, a random depth is drawn only where S2-Attn with groups of G lets every answer
    position see the whole needle in one layer (see :func:`s2_reach_start`); if no depth is (a sample too short
    for its groups), the needle goes last.
    """
    key = str(rng.randrange(10 ** (digits - 1), 10**digits))
    intro, needle, question = encode(intro), encode(PASSKEY_NEEDLE.format(key=key)), encode(PASSKEY_QUESTION)
    answer = encode(key)
    budget = length - len(intro) - len(needle) - len(question) - len(answer)
    if budget < 0:
        raise ValueError(f"a passkey sample needs at least {length - budget} tokens, asked for {length}")
    lowest = 0.0
    if reach_group_size is not None and depth is None and budget > 0:
        prompt_length = length - len(answer)  # the answer is predicted at positions prompt_length - 1 .. length - 2
        reach = max(s2_reach_start(t, reach_group_size) for t in range(prompt_length - 1, length - 1))
        lowest = min(max(reach - len(intro), 0) / budget, 1.0)
    depth = lowest + (1.0 - lowest) * rng.random() if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    filler_unit = encode(PASSKEY_FILLER)
    filler = (filler_unit * (budget // len(filler_unit) + 1))[:budget]
    cut = round(depth * len(filler))
    prompt = intro + filler[:cut] + needle + filler[cut:] + question
    return PasskeySample(prompt_ids=prompt, answer_ids=answer, key=key, depth=depth)


def passkey_batch(
    encode: Callable[[str], list[int]],
    length: int,
    batch_size: int,
    rng: random.Random,
    *,
    answer_only_loss: bool = True,
    intro: str = PASSKEY_INTRO,
    depth: float | None = None,
):
    """A (B, length) batch of passkey samples of exactly ``length`` tokens, with labels for causal-LM training.

    Labels are -100 everywhere but the answer when ``answer_only_loss`` (the retrieval is what is learned).
    Returns (input_ids, labels, answer_start) as tensors; answer_start is where the key's tokens begin.
    """
    rows, labels, starts = [], [], []
    for _ in range(batch_size):
        sample = make_passkey_sample(encode, length, rng, intro=intro, depth=depth)
        ids = sample.prompt_ids + sample.answer_ids
        ids = ids + ids[-1:] * (length - len(ids))  # the filler is cut at token level, so this is rare
        row_labels = [-100] * len(sample.prompt_ids) + sample.answer_ids if answer_only_loss else list(ids)
        row_labels = row_labels + [-100] * (length - len(row_labels))
        rows.append(ids[:length])
        labels.append(row_labels[:length])
        starts.append(len(sample.prompt_ids))
    return torch.tensor(rows), torch.tensor(labels), torch.tensor(starts)
