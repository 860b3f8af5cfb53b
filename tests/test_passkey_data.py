"""Generated passkey samples: a key placed within S2-Attn's training reach is seen by every answer position in one
layer, checked against the segments the S2 kernels use; the default placement is unchanged."""

import random

import pytest

from longlora_plugin.data.passkey import PASSKEY_NEEDLE, PASSKEY_QUESTION, make_passkey_sample
from longlora_plugin.data.tokenizer import byte_ids
from longlora_plugin.ops.layout import s2_segments, token_layout


def segment_start(length: int, group_size: int, offset: int, position: int) -> int:
    """Where the S2 segment holding ``position`` starts, from the layout code the kernels use."""
    segments = s2_segments(token_layout(1, length), group_size, offset)
    starts = [s for s in segments.starts.tolist() if s <= position]
    return max(starts)


@pytest.mark.parametrize("group_size", [256, 512])
def test_a_key_within_reach_is_seen_by_every_answer_position_in_one_layer(group_size):
    rng = random.Random(3)
    needle_length = len(byte_ids(PASSKEY_NEEDLE.format(key="12345")))
    for _ in range(60):
        length = rng.randint(group_size, 2 * group_size)
        sample = make_passkey_sample(byte_ids, length, rng, intro="", reach_group_size=group_size)
        filler = length - needle_length - len(byte_ids(PASSKEY_QUESTION)) - len(sample.answer_ids)
        needle_start = round(sample.depth * filler)
        assert byte_ids(f"The pass key is {sample.key}") == sample.prompt_ids[needle_start : needle_start + 21]
        for position in range(len(sample.prompt_ids) - 1, sample.length - 1):  # positions that predict the answer
            seen_from = min(segment_start(length, group_size, offset, position) for offset in (0, group_size // 2))
            assert seen_from <= needle_start, (length, position, seen_from, needle_start)


def test_the_uniform_default_draws_the_same_samples_as_before():
    """Without a group size the depth is one plain draw after the key, as before the option existed."""
    rng, reference = random.Random(11), random.Random(11)
    for length in (300, 700, 1024):
        sample = make_passkey_sample(byte_ids, length, rng, intro="")
        key = str(reference.randrange(10**4, 10**5))
        assert (sample.key, sample.depth) == (key, reference.random())


def test_reach_keeps_the_key_late_enough_and_spreads_it_over_the_reachable_part():
    rng = random.Random(0)
    depths = [make_passkey_sample(byte_ids, 1024, rng, intro="", reach_group_size=512).depth for _ in range(300)]
    filler = 1024 - len(byte_ids(PASSKEY_NEEDLE.format(key="12345"))) - len(byte_ids(PASSKEY_QUESTION)) - 5
    assert min(depths) * filler >= 512 - 1  # the answer at ~1020 sees its own group [512, 1024) and [768, 1024)
    assert max(depths) > 0.95 and min(depths) < 0.6
