"""Passkey retrieval, the paper's protocol (after Landmark Attention): a random key hidden at a random depth in
filler text, then a question; the answer is the key, read by greedy decoding and scored by exact match."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

__all__ = ["PasskeySample", "make_passkey_sample", "PASSKEY_INTRO", "PASSKEY_FILLER", "PASSKEY_QUESTION"]

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


def make_passkey_sample(
    encode: Callable[[str], list[int]],
    length: int,
    rng: random.Random,
    *,
    depth: float | None = None,
    digits: int = 5,
) -> PasskeySample:
    """A sample of about ``length`` tokens (prompt + answer) under ``encode``; shorter filler if it must.

    The filler is cut at a token boundary to hit the length; the needle goes in at ``depth`` (random if None).
    """
    key = str(rng.randrange(10 ** (digits - 1), 10**digits))
    depth = rng.random() if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    intro, needle, question = encode(PASSKEY_INTRO), encode(PASSKEY_NEEDLE.format(key=key)), encode(PASSKEY_QUESTION)
    answer = encode(key)
    budget = length - len(intro) - len(needle) - len(question) - len(answer)
    if budget < 0:
        raise ValueError(f"a passkey sample needs at least {length - budget} tokens, asked for {length}")
    filler_unit = encode(PASSKEY_FILLER)
    filler = (filler_unit * (budget // len(filler_unit) + 1))[:budget]
    cut = round(depth * len(filler))
    prompt = intro + filler[:cut] + needle + filler[cut:] + question
    return PasskeySample(prompt_ids=prompt, answer_ids=answer, key=key, depth=depth)
