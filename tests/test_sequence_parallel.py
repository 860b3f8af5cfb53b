"""S2-Attn under DeepSpeed Ulysses sequence parallelism, on CPU ranks (gloo, fp32).

The distributed cases run whole tiny models on P forked ranks through DeepSpeed's own Ulysses attention
(``register_with_transformers`` around "s2_attention") and compare the loss and every parameter gradient with one
process on the full sequence. Controls rerun cases with the head offset switched off and must differ.
"""

import pytest
import torch
from tests.helpers.reference import reference_s2_attention
from tests.helpers.ulysses import run_ulysses_cases

from longlora_plugin import sequence_parallel
from longlora_plugin.ops import s2_attention
from longlora_plugin.sequence_parallel import (
    ParallelSection,
    check_sequence_parallel_batch,
    check_sequence_parallel_padding,
    ulysses_heads,
)

LOSS_TOL, GRAD_TOL = 1e-5, 1e-5
CONTROL_MIN = 1e-3  # without the head offset the results are off by far more than fp32 noise

# (name, model kwargs, seq_len, G, packed document lengths, control)
CASES = {
    2: [
        dict(name="gqa", seq_len=30, group_size=8, control=True),  # 30 not divisible by G
        dict(name="packed", seq_len=30, group_size=4, documents=[11, 7, 12], control=True),
        dict(name="batch2", seq_len=22, group_size=6, batch=2),
        dict(name="mistral_window", model_type="mistral", seq_len=30, group_size=8),
    ],
    3: [
        # H=6: rank 1 holds heads [2, 4), straddling H/2 = 3; its two query heads share one KV head
        dict(name="straddle", config=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3),
             seq_len=30, group_size=8, control=True),
        # MQA: DeepSpeed repeats the one KV head on every rank (P > H_kv)
        dict(name="mqa_replicated", config=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1),
             seq_len=27, group_size=5, documents=[10, 17]),
    ],
    4: [
        dict(name="kv_replicated", seq_len=28, group_size=12, control=True),  # H=4, H_kv=2 < P
        dict(name="packed_h8", config=dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8),
             seq_len=28, group_size=6, documents=[5, 13, 10], control=True),
    ],
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_ulysses_matches_one_process(world):
    results = run_ulysses_cases(world, CASES[world])
    assert sorted(results) == sorted(case["name"] for case in CASES[world])
    for name, result in results.items():
        diff = result["ulysses"]
        assert diff["parameters"] > 10, name
        assert diff["loss"] < LOSS_TOL, (world, name, diff)
        assert diff["grad"] < GRAD_TOL * max(1.0, diff["grad_scale"]), (world, name, diff)
        if "without_offset" in result:  # the control: same run, every rank believing it holds heads 0..H/P-1
            control = result["without_offset"]
            assert control["loss"] > CONTROL_MIN or control["grad"] > CONTROL_MIN, (world, name, control)


@pytest.mark.parametrize(
    "heads, kv_heads, block",
    [(4, 2, 2), (4, 2, 1), (6, 3, 2), (6, 1, 2), (8, 2, 2), (5, 5, 1)],
)
def test_head_offset_is_a_slice_of_the_full_op(heads, kv_heads, block):
    """Any contiguous block of heads, given its offset, gets exactly those heads of the full S2-Attn."""
    torch.manual_seed(0)
    seq_len, dim, group = 19, 8, 6
    q = torch.randn(1, heads, seq_len, dim)
    k, v = torch.randn(2, 1, kv_heads, seq_len, dim)
    position_ids = torch.cat([torch.arange(7), torch.arange(12)])[None]
    full = reference_s2_attention(q, k, v, group_size=group, position_ids=position_ids)  # (B, S, H, D)
    n_rep = heads // kv_heads
    for first in range(0, heads, block):
        kv_index = torch.arange(first, first + block) // n_rep
        kv_index = kv_index.unique_consecutive()
        # the block's own KV heads, repeated per query head when the block cuts through a KV group (as DeepSpeed)
        if block < n_rep:
            k_part, v_part = k[:, kv_index], v[:, kv_index]
        else:
            k_part, v_part = k[:, first // n_rep : (first + block) // n_rep], v[:, first // n_rep : (first + block) // n_rep]
        out = s2_attention(
            q[:, first : first + block], k_part, v_part, group_size=group, position_ids=position_ids,
            head_offset=first, total_heads=heads, backend="sdpa",
        )
        torch.testing.assert_close(out, full[:, :, first : first + block], atol=1e-5, rtol=1e-5)


def test_head_offset_changes_the_result():
    """The offset is not ignored: the same two heads as the first or the second half attend differently."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 16, 8)
    first = s2_attention(q, k, v, group_size=4, head_offset=0, total_heads=4)
    second = s2_attention(q, k, v, group_size=4, head_offset=2, total_heads=4)
    assert (first - second).abs().max() > 1e-2


@pytest.mark.parametrize("offset, total", [(-1, 4), (3, 4), (1, 2), (True, 4), (0, 1)])
def test_bad_head_offset_is_refused(offset, total):
    q, k, v = torch.randn(3, 1, 2, 8, 4)
    with pytest.raises(ValueError, match="head_offset"):
        s2_attention(q, k, v, group_size=4, head_offset=offset, total_heads=total)


class _Module:
    def __init__(self, heads):
        from tests.helpers.families import tiny_config

        self.config = tiny_config("llama", hidden_size=8 * heads, num_attention_heads=heads, num_key_value_heads=heads)


def test_short_head_count_without_a_sequence_parallel_group_is_refused():
    query = torch.zeros(1, 2, 8, 8)
    assert ulysses_heads(_Module(2), query, {}) == (0, None)  # all heads: nothing looked up
    with pytest.raises(ValueError, match="num_attention_heads=4.*no DeepSpeed sequence-parallel"):
        ulysses_heads(_Module(4), query, {})


def test_ulysses_heads_reads_the_rank(monkeypatch):
    monkeypatch.setattr(sequence_parallel, "sequence_parallel_rank_world", lambda: (2, 3))
    query = torch.zeros(1, 2, 12, 8)
    assert ulysses_heads(_Module(6), query, {"position_ids": torch.arange(12)[None]}) == (4, 6)
    with pytest.raises(ValueError, match="expected 6 / 3 per rank"):
        ulysses_heads(_Module(6), torch.zeros(1, 1, 12, 8), {})


def test_lost_boundaries_are_refused(monkeypatch):
    monkeypatch.setattr(sequence_parallel, "sequence_parallel_rank_world", lambda: (0, 2))
    module, query = _Module(4), torch.zeros(1, 2, 12, 8)
    shard_ids = torch.arange(6).repeat(2)[None]  # every rank numbered its shard from 0 (model-made ids)
    with pytest.raises(ValueError, match="each shard would attend as its own document"):
        ulysses_heads(module, query, {"position_ids": shard_ids})
    with pytest.raises(ValueError, match="cu_seq_lens_q ending at 6"):
        ulysses_heads(module, query, {"cu_seq_lens_q": torch.tensor([0, 2, 6]), "position_ids": torch.arange(12)[None]})
    # packed documents that restart inside shards are kept
    packed = torch.cat([torch.arange(5), torch.arange(7)])[None]
    assert ulysses_heads(module, query, {"position_ids": packed}) == (0, 4)


def test_padding_before_real_tokens_is_refused_under_sp(monkeypatch):
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    check_sequence_parallel_padding(left)  # no SP group: the mask reaches S2-Attn, nothing to refuse
    monkeypatch.setattr(sequence_parallel, "sequence_parallel_rank_world", lambda: (0, 2))
    check_sequence_parallel_padding(right)
    with pytest.raises(ValueError, match="padding before real tokens"):
        check_sequence_parallel_padding(left)


def test_batches_for_the_ulysses_data_adapter():
    packed = {
        "input_ids": torch.ones(1, 6, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]),
        "labels": torch.ones(1, 6, dtype=torch.long),
        "cu_seq_lens_q": torch.tensor([0, 3, 5, 6]),
        "cu_seq_lens_k": torch.tensor([0, 3, 5, 6]),
        "max_length_q": 3,
        "max_length_k": 3,
        "seq_idx": torch.tensor([0, 0, 0, 1, 1, 2]),
    }
    ready = check_sequence_parallel_batch(packed, 2)
    assert sorted(ready) == ["input_ids", "labels", "position_ids"]
    with pytest.raises(ValueError, match="pad_to_multiple_of to a multiple of 4"):
        check_sequence_parallel_batch(packed, 4)
    with pytest.raises(ValueError, match="needs position_ids"):
        check_sequence_parallel_batch({"input_ids": packed["input_ids"]}, 2)
    padded = {"input_ids": torch.ones(1, 4), "position_ids": torch.zeros(1, 4), "attention_mask": torch.tensor([[0, 1, 1, 1]])}
    with pytest.raises(ValueError, match="padded on the right"):
        check_sequence_parallel_batch(padded, 2)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_parallel_section_refuses_bad_sizes(value):
    with pytest.raises(ValueError, match="parallel.sequence_parallel must be a positive int"):
        ParallelSection(sequence_parallel=value)


def _same_record_data(folder, records=48):
    """LongAlpaca records that are all the same, so the step losses do not depend on the order data is read in."""
    import json

    row = {"instruction": "Echo the words.", "output": "the quick brown fox " * 3}
    (folder / "data.jsonl").write_text((json.dumps(row) + "\n") * records)


def _steps(history):
    return [(h["loss"], h["grad_norm"]) for h in history if "loss" in h]


@pytest.fixture(scope="module")
def sgd_recipe(tmp_path_factory):
    """A packed SGD recipe without warm-up or clipping (a wrong gradient scale shows in every later loss), and the
    step losses and gradient norms of one process without DeepSpeed."""
    from tests.helpers.launch_setup import make_base_and_data, write_recipe

    from longlora_plugin.recipe import load_recipe
    from longlora_plugin.train import train

    folder = tmp_path_factory.mktemp("sp_trainer")
    make_base_and_data(folder)
    _same_record_data(folder)
    recipe = write_recipe(folder, "run", optim="sgd", learning_rate=0.5, warmup_steps=0, max_grad_norm=0.0,
                          lr_scheduler_type="constant", per_device_train_batch_size=1)
    overrides = {"data.packing": True}
    one = _steps(train(load_recipe(recipe, {**overrides, "training.output_dir": str(folder / "one")})).state.log_history)
    return folder, recipe, overrides, one


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_sp_zero_packed_gives_single_process_losses(sgd_recipe, stage):
    """The recipe with parallel.sequence_parallel 2 on two DeepSpeed ZeRO CPU ranks (TRL packing, plain SGD, no
    clipping): the step losses and gradient norms of one process. DeepSpeed 0.19 reduces SP gradients differently
    in ZeRO-2 and ZeRO-3; both must come out right."""
    from pathlib import Path

    from tests.helpers.ulysses import run_recipe_on_ranks

    folder, recipe, overrides, one = sgd_recipe
    repo = Path(__file__).resolve().parents[1]
    sp = run_recipe_on_ranks(
        2, recipe, {**overrides, "parallel.sequence_parallel": 2, "training.output_dir": str(folder / f"sp{stage}")},
        repo / f"integrations/deepspeed/zero{stage}.json",
    )
    assert (sp["engine"], sp["zero_stage"], sp["sp_size"]) == ("DeepSpeedEngine", stage, 2)
    steps = _steps(sp["log_history"])
    assert len(steps) == len(one) == 3
    for (loss, norm), (ref_loss, ref_norm) in zip(steps, one):
        assert loss == pytest.approx(ref_loss, abs=1e-4) and norm == pytest.approx(ref_norm, rel=1e-4), (steps, one)


def _cuda_backends():
    import importlib.util

    if not torch.cuda.is_available():
        return []
    return ["sdpa", "flash"] if importlib.util.find_spec("flash_attn") else ["sdpa"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", _cuda_backends() or ["sdpa"])
def test_head_offset_blocks_on_gpu(backend):
    """What a Ulysses rank computes on a GPU (bf16, packed documents): its block of the full S2-Attn, forward and
    backward, including a block that straddles H/2."""
    torch.manual_seed(0)
    # H=12, H_kv=3, P=3 as DeepSpeed would split it: 4 query heads and their one KV head per rank
    heads, kv_heads, block, seq_len, dim, group = 12, 3, 4, 333, 64, 64
    q, k, v = (torch.randn(1, h, seq_len, dim) for h in (heads, kv_heads, kv_heads))
    position_ids = torch.cat([torch.arange(100), torch.arange(233)])[None]
    full = s2_attention(q, k, v, group_size=group, position_ids=position_ids, backend="sdpa")  # fp32 CPU
    for first in range(0, heads, block):  # [4, 8) straddles H/2 = 6
        kv = slice(first // block, first // block + 1)
        parts = [x.cuda().bfloat16().requires_grad_() for x in (q[:, first : first + block], k[:, kv], v[:, kv])]
        out = s2_attention(*parts, group_size=group, position_ids=position_ids.cuda(), head_offset=first,
                           total_heads=heads, backend=backend)
        out.float().sum().backward()
        torch.testing.assert_close(out.float().cpu(), full[:, :, first : first + block], atol=3e-2, rtol=3e-2)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in parts)
