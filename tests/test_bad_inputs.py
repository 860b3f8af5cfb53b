"""Bad inputs across the API, the recipes and the CLI: each one fails early with an error naming the bad value.

One table, one row per bad input. Every row runs with training and the S2-Attn forward pass made to fail loudly,
so a row passes only if its error comes earlier: at config, load or data-validation time. docs/reliability.md
counts its figures from this table.
"""

import json
from functools import cached_property
from pathlib import Path

import pytest
import torch
import transformers
from tests.helpers.families import tiny_config
from tests.helpers.launch_setup import make_base_and_data, write_recipe
from transformers import AutoModelForCausalLM, GPT2Config

import longlora_plugin.hf_attention as attention
from longlora_plugin import (
    S2_ATTENTION,
    LongLoraConfig,
    configure_s2,
    extend_rope,
    get_longlora_model,
    load_longlora,
    s2_attention,
    save_longlora,
)
from longlora_plugin.cli import main as cli
from longlora_plugin.data import byte_tokenizer
from longlora_plugin.recipe import load_recipe
from longlora_plugin.train import build_trainer, load_tokenizer, train


class World:
    """A tiny saved base (Llama, 64-token context, byte vocabulary), its data and recipe, a saved adapter, a
    checkpoint of a finished run, a base of another size, and a tokenizer with neither pad nor eos."""

    def __init__(self, folder: Path):
        self.folder = make_base_and_data(folder, records=8)
        self.base = folder / "base"
        self.recipe = write_recipe(folder, "run", use_cpu=True)

    def prepare(self) -> None:
        for name in ("adapter", "checkpoint", "other_base", "tokenizer_without_pad_or_eos"):
            getattr(self, name)

    def load(self, overrides: dict | None = None):
        return load_recipe(self.recipe, overrides)

    def build(self, overrides: dict | None = None):
        return build_trainer(self.load(overrides))

    def file(self, name: str, content: str | bytes) -> str:
        path = self.folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def jsonl(self, name: str, *records: dict) -> str:
        return self.file(name, "".join(json.dumps(record) + "\n" for record in records))

    def llama(self, **overrides):
        return AutoModelForCausalLM.from_config(tiny_config("llama", **overrides))

    @cached_property
    def adapter(self) -> str:
        base = AutoModelForCausalLM.from_pretrained(self.base)
        model = get_longlora_model(base, original_context=64, target_context=256, s2_group_size=64)
        return str(save_longlora(model, self.folder / "adapter"))

    @cached_property
    def checkpoint(self) -> str:
        recipe = write_recipe(self.folder, "finished", use_cpu=True, max_steps=1, save_strategy="steps", save_steps=1)
        train(load_recipe(recipe))
        return str(self.folder / "finished" / "checkpoint-1")

    @cached_property
    def other_base(self) -> str:
        folder = self.folder / "base-hidden-96"
        self.llama(vocab_size=259, max_position_embeddings=64, hidden_size=96).save_pretrained(folder)
        return str(folder)

    @cached_property
    def tokenizer_without_pad_or_eos(self) -> str:
        tokenizer = byte_tokenizer()
        tokenizer.pad_token = None
        tokenizer.eos_token = None
        folder = self.folder / "tokenizer-without-pad-or-eos"
        tokenizer.save_pretrained(folder)
        return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = World(tmp_path_factory.mktemp("bad-inputs"))
    world.prepare()  # before the guards below, which forbid training
    return world


@pytest.fixture
def nothing_expensive_runs(monkeypatch):
    def training_started(*args, **kwargs):
        raise AssertionError("training started before the bad input was refused")

    def forward_reached(*args, **kwargs):
        raise AssertionError("the S2-Attn forward pass ran before the bad input was refused")

    monkeypatch.setattr(transformers.Trainer, "train", training_started)
    monkeypatch.setattr(attention, "s2_attention", forward_reached)


def case(case_id: str, trigger, *expected: str, error: type[BaseException] = ValueError):
    """A bad input: ``trigger(world)`` must raise ``error`` whose message contains every string in ``expected``."""
    return pytest.param(trigger, error, expected, id=case_id)


def qkv(heads: int, kv_heads: int):
    return torch.randn(1, heads, 8, 16), torch.randn(1, kv_heads, 8, 16), torch.randn(1, kv_heads, 8, 16)


def s2_model(model_type, **overrides):
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation=S2_ATTENTION)


def gpt2_with_interpolation(w):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96))
    config = LongLoraConfig(target_modules=["c_attn"], modules_to_save=["wte"], original_context=1024, target_context=4096)
    get_longlora_model(gpt2, config)


API = [
    case("api-falcon-at-load", lambda w: s2_model("falcon"), "model_type 'falcon'", "generic attention interface"),
    case("api-bloom-at-load", lambda w: s2_model("bloom"), "model_type 'bloom'", "generic attention interface"),
    case(
        "api-falcon-get-longlora-model",
        lambda w: get_longlora_model(AutoModelForCausalLM.from_config(tiny_config("falcon"))),
        "model_type 'falcon'",
        "generic attention interface",
    ),
    case("api-group-size-zero-at-load", lambda w: s2_model("llama", s2_group_size=0), "s2_group_size", "positive int or None, got 0"),
    case(
        "api-group-ratio-above-one-at-load",
        lambda w: s2_model("llama", s2_group_size_ratio=1.5),
        "s2_group_size_ratio must be a number in (0, 1], got 1.5",
    ),
    case(
        "api-group-ratio-zero-in-config",
        lambda w: LongLoraConfig(s2_group_size_ratio=0.0),
        "s2_group_size_ratio must be a number in (0, 1], got 0.0",
    ),
    case(
        "api-group-larger-than-target-context",
        lambda w: LongLoraConfig(original_context=64, target_context=256, s2_group_size=512),
        "s2_group_size must be at most target_context (256), got 512",
    ),
    case(
        "api-group-larger-than-model-context",
        lambda w: get_longlora_model(w.llama(), s2_group_size=1024),
        "s2_group_size (1024)",
        "context of 512 tokens",
    ),
    case("api-backend-unknown-at-load", lambda w: s2_model("llama", s2_backend="xformers"), "s2_backend", "'xformers'"),
    case("api-logit-scale-negative", lambda w: configure_s2(w.llama(), logit_scale=-1.0), "s2_logit_scale",
         "positive finite number", "got -1.0"),
    case("api-shift-not-bool", lambda w: configure_s2(w.llama(), shift="no"), "s2_shift must be True or False, got 'no'"),
    case(
        "api-heads-not-a-multiple-of-kv-heads-at-load",
        lambda w: s2_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=4),
        "num_attention_heads (6)",
        "multiple of num_key_value_heads (4)",
    ),
    case(
        "api-heads-not-a-multiple-of-kv-heads-tensors",
        lambda w: s2_attention(*qkv(6, 4), group_size=4),
        "query heads (6)",
        "multiple of the key/value heads (4)",
    ),
    case(
        "api-sliding-window-zero-at-load",
        lambda w: s2_model("mistral", sliding_window=0),
        "sliding_window",
        "positive int or None",
        "got 0",
    ),
    case(
        "api-interpolation-without-rope",
        gpt2_with_interpolation,
        "model_type 'gpt2' has no rope_parameters",
        "position interpolation needs RoPE",
    ),
    case(
        "api-interpolation-to-a-shorter-target",
        lambda w: extend_rope(w.llama(), 256),
        "above the original context of 512 tokens, got 256",
    ),
    case(
        "api-config-rope-option-not-positive",
        lambda w: LongLoraConfig(original_context=256, target_context=1024, rope_type="yarn",
                                 rope_options={"attention_factor": -1.0}),
        "rope_options['attention_factor'] must be a positive number, got -1.0",
    ),
    case(
        "api-config-target-below-original",
        lambda w: LongLoraConfig(original_context=4096, target_context=2048),
        "target_context must be larger than original_context (4096), got 2048",
    ),
    case(
        "api-modules-that-do-not-exist",
        lambda w: get_longlora_model(w.llama(), LongLoraConfig(target_modules=["q_proj", "qkv"])),
        "model_type 'llama' does not have: ['qkv']",
    ),
    case("api-lora-rank-zero", lambda w: LongLoraConfig(r=0), "r must be a positive int, got 0"),
    case("api-lora-dropout-above-one", lambda w: LongLoraConfig(lora_dropout=1.5), "lora_dropout", "[0, 1), got 1.5"),
    case(
        "api-load-onto-another-size",
        lambda w: load_longlora(w.llama(vocab_size=259, hidden_size=96), w.adapter),
        "hidden_size=64",
        "this base has hidden_size=96",
    ),
    case(
        "api-load-onto-another-architecture",
        lambda w: load_longlora(AutoModelForCausalLM.from_config(tiny_config("qwen2", vocab_size=259)), w.adapter),
        "model_type='llama'",
        "this base has model_type='qwen2'",
    ),
    case(
        "api-load-onto-other-kv-heads",
        lambda w: load_longlora(w.llama(vocab_size=259, num_key_value_heads=4), w.adapter),
        "num_key_value_heads=2",
        "this base has num_key_value_heads=4",
    ),
    case(
        "api-load-an-incomplete-folder",
        lambda w: load_longlora(w.llama(vocab_size=259), w.base),
        "is not a complete LongLoRA adapter folder",
        "longlora.json is missing",
    ),
]

GOOD_RECORD = {"instruction": "a", "output": "b"}
LONG_RECORD = {"instruction": "a " * 200, "output": "b"}  # 400+ byte tokens, context.target is 256
LATIN1_RECORD = '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")

RECIPE = [
    case("recipe-unknown-key", lambda w: w.load({"lora.rank": 8}), "unknown keys in 'lora': ['rank']", "allowed:"),
    case("recipe-unknown-section", lambda w: w.load({"optimizer.lr": 1.0}), "unknown sections ['optimizer']", "allowed:"),
    case(
        "recipe-unknown-training-key",
        lambda w: w.load({"training.learning_rte": 1e-3}),
        "unknown training keys ['learning_rte']",
        "fields of trl.SFTConfig",
    ),
    case(
        "recipe-reserved-training-key",
        lambda w: w.load({"training.max_length": 128}),
        "training.max_length is set from the recipe",
    ),
    case(
        "recipe-context-not-an-int",
        lambda w: w.load({"context.target": "4k"}),
        "context.target must be a positive int or None, got '4k'",
    ),
    case(
        "recipe-target-below-original",
        lambda w: w.load({"context.target": 32}),
        "context.target must be larger than context.original (64), got 32",
    ),
    case(
        "recipe-group-size-zero",
        lambda w: w.load({"s2.group_size": 0}),
        "s2.group_size must be a positive int or None, got 0",
    ),
    case(
        "recipe-group-size-above-target",
        lambda w: w.load({"s2.group_size": 1000}),
        "s2.group_size must be at most context.target (256), got 1000",
    ),
    case(
        "recipe-group-ratio-negative",
        lambda w: w.load({"s2.group_size": None, "s2.group_size_ratio": -0.5}),
        "s2.group_size_ratio must be a number in (0, 1], got -0.5",
    ),
    case("recipe-shift-not-bool", lambda w: w.load({"s2.shift": "no"}), "s2.shift must be True or False, got 'no'"),
    case("recipe-dtype-unknown", lambda w: w.load({"model.dtype": "fp16"}), "model.dtype must be one of", "got 'fp16'"),
    case("recipe-rope-type-unknown", lambda w: w.load({"context.rope_type": "ntk"}), "rope_type must be one of", "got 'ntk'"),
    case(
        "recipe-rope-option-of-another-type",
        lambda w: w.load({"context.rope_type": "yarn", "context.rope_options": {"high_freq_factor": 4.0}}),
        "context.rope_options must be 'yarn' parameters (['attention_factor'",
        "'high_freq_factor' is not one",
    ),
    case("recipe-lora-rank-zero", lambda w: w.load({"lora.r": 0}), "lora.r must be a positive int, got 0"),
    case("recipe-min-length-above-target", lambda w: w.load({"data.min_length": 100000}), "data.min_length must be",
         "got 100000"),
    case("recipe-logit-scale-zero", lambda w: w.load({"s2.logit_scale": 0}), "s2.logit_scale must be a positive finite number",
         "got 0"),
    case("recipe-selection-every-zero", lambda w: w.load({"selection.passkey_every": 0}),
         "selection.passkey_every must be a positive int or None, got 0"),
    case("recipe-selection-seed-not-int", lambda w: w.load({"selection.passkey_seed": "seven"}),
         "selection.passkey_seed must be an int, got 'seven'"),
    case("recipe-passkey-depth-unknown", lambda w: w.load({"data.passkey_depth": "middle"}),
         "data.passkey_depth must be one of", "got 'middle'"),
    case("recipe-too-long-policy-unknown", lambda w: w.load({"data.too_long": "ignore"}), "data.too_long", "got 'ignore'"),
    case("recipe-data-format-unknown", lambda w: w.build({"data.format": "alpaca"}), "'alpaca' is not one of", "'longalpaca'"),
    case(
        "data-record-missing-field",
        lambda w: w.build({"data.path": w.jsonl("missing.jsonl", {"instruction": "Echo."})}),
        "missing.jsonl: record 0 has no 'output' field",
    ),
    case(
        "data-record-empty-field",
        lambda w: w.build({"data.path": w.jsonl("empty-field.jsonl", GOOD_RECORD, {"instruction": "a", "output": " "})}),
        "empty-field.jsonl: record 1 has an empty 'output'",
    ),
    case(
        "data-record-not-a-string",
        lambda w: w.build({"data.path": w.jsonl("number.jsonl", {"instruction": 3, "output": "b"})}),
        "record 0 field 'instruction' must be a string, got int",
    ),
    case(
        "data-file-not-utf8",
        lambda w: w.build({"data.path": w.file("latin1.jsonl", LATIN1_RECORD)}),
        "latin1.jsonl: not UTF-8 at byte 20",
    ),
    case(
        "data-record-longer-than-context",
        lambda w: w.build({"data.too_long": "error", "data.path": w.jsonl("long.jsonl", LONG_RECORD)}),
        "long.jsonl: record 0 has",
        "more than context.target=256",
        "data.too_long",
    ),
    case("data-file-empty", lambda w: w.build({"data.path": w.file("empty.jsonl", "")}), "empty.jsonl holds no records"),
    case("data-file-without-records", lambda w: w.build({"data.path": w.file("none.json", "[]")}), "none.json holds no records"),
    case(
        "data-file-missing",
        lambda w: w.build({"data.path": str(w.folder / "absent.jsonl")}),
        "absent.jsonl does not exist",
        "local data file or a hub dataset name",
    ),
    case(
        "data-file-malformed-json",
        lambda w: w.build({"data.path": w.file("broken.jsonl", json.dumps(GOOD_RECORD) + '\n{"instruction": \n')}),
        "cannot read",
        "broken.jsonl as json",
    ),
    case(
        "recipe-tokenizer-without-pad-or-eos",
        lambda w: w.build({"model.tokenizer": w.tokenizer_without_pad_or_eos}),
        "tokenizer-without-pad-or-eos has neither a pad token nor an eos token",
        "set model.tokenizer",
    ),
    case(
        "recipe-base-folder-missing",
        lambda w: w.build({"model.name_or_path": str(w.folder / "no-such-base")}),
        "model.name_or_path",
        "no-such-base does not exist",
    ),
    case(
        "recipe-target-modules-that-do-not-exist",
        lambda w: w.build({"lora.target_modules": ["q_proj", "qkv"]}),
        "model_type 'llama' does not have: ['qkv']",
    ),
    case(
        "recipe-resume-from-another-run",
        lambda w: w.build({"training.resume_from_checkpoint": w.checkpoint, "lora.r": 4}),
        "checkpoint-1 comes from another run",
        "r=8 there, 4 here",
    ),
    case(
        "recipe-resume-onto-another-base",
        lambda w: w.build({"training.resume_from_checkpoint": w.checkpoint, "model.name_or_path": w.other_base}),
        "hidden_size=64",
        "this base has hidden_size=96",
    ),
    case(
        "recipe-resume-from-a-missing-checkpoint",
        lambda w: w.build({"training.resume_from_checkpoint": str(w.folder / "checkpoint-9")}),
        "checkpoint-9 is not a checkpoint folder",
    ),
    case(
        "recipe-resume-true-without-checkpoints",
        lambda w: w.build({"training.resume_from_checkpoint": True, "training.output_dir": str(w.folder / "fresh")}),
        "resume_from_checkpoint is true",
        "fresh holds no checkpoint-* folder",
    ),
]

def cli_case(case_id: str, trigger, *expected: str):
    """A bad command line: one line on stderr, ``longlora: error: ...``, exit status 2, no traceback."""
    return case(case_id, trigger, "longlora: error: ", *expected, error=SystemExit)


CLI = [
    cli_case("cli-train-missing-recipe", lambda w: cli(["train", str(w.folder / "absent.yaml")]), "no recipe file at", "absent.yaml"),
    cli_case(
        "cli-train-override-without-dashes",
        lambda w: cli(["train", str(w.recipe), "max_steps", "1"]),
        "expected --section.key value, got 'max_steps'",
    ),
    cli_case(
        "cli-train-unknown-override",
        lambda w: cli(["train", str(w.recipe), "--training.learning_rte", "1e-3"]),
        "unknown training keys ['learning_rte']",
    ),
    cli_case(
        "cli-train-bad-override-value",
        lambda w: cli(["train", str(w.recipe), "--s2.group_size", "0"]),
        "s2.group_size must be a positive int or None, got 0",
    ),
    cli_case(
        "cli-merge-missing-local-base",
        lambda w: cli(["merge", "--base", str(w.folder / "no-such-base"), "--adapter", w.adapter, "--output", "x"]),
        "--base", "no-such-base does not exist",
    ),
    cli_case(
        "cli-merge-onto-another-base",
        lambda w: cli(["merge", "--base", w.other_base, "--adapter", w.adapter, "--output", str(w.folder / "merged")]),
        "hidden_size=64",
        "this base has hidden_size=96",
    ),
    cli_case(
        "cli-merge-a-folder-that-is-no-adapter",
        lambda w: cli(["merge", "--base", str(w.base), "--adapter", str(w.base), "--output", str(w.folder / "merged")]),
        "is not a complete LongLoRA adapter folder",
    ),
    cli_case(
        "cli-eval-passkey-min-length-zero",  # the model does not exist: the check must come before loading it
        lambda w: cli(["eval", "passkey", "--model", str(w.folder / "absent"), "--min-length", "0", "--max-length", "64"]),
        "1 <= min-length <= max-length",
        "got 0, 64",
    ),
    cli_case(
        "cli-eval-passkey-trials-zero",
        lambda w: cli(["eval", "passkey", "--model", str(w.folder / "absent"), "--max-length", "64", "--min-length", "32",
                       "--trials", "0"]),
        "--trials must be at least 1, got 0",
    ),
    cli_case(
        "cli-eval-ppl-length-one",
        lambda w: cli(["eval", "ppl", "--model", str(w.folder / "absent"), "--data", "x.txt", "--lengths", "1", "64"]),
        "--lengths must all be at least 2",
        "got [1, 64]",
    ),
    case(  # argparse's own error: "longlora eval ppl: error: ...", exit status 2
        "cli-eval-ppl-lengths-not-int",
        lambda w: cli(["eval", "ppl", "--model", "m", "--data", "x.txt", "--lengths", "abc"]),
        "argument --lengths: invalid int value: 'abc'",
        error=SystemExit,
    ),
    case("cli-unknown-command", lambda w: cli(["trian"]), "invalid choice: 'trian'", "'train'", error=SystemExit),
]

TABLE = API + RECIPE + CLI


def test_the_table_is_large_enough_and_ids_are_unique():
    ids = [param.id for param in TABLE]
    assert len(ids) == len(set(ids))
    assert len(TABLE) >= 25 and len(CLI) >= 5 and len(RECIPE) >= 5


@pytest.mark.parametrize("trigger,error,expected", TABLE)
def test_bad_input_is_refused_early_and_named(world, nothing_expensive_runs, capsys, trigger, error, expected):
    with pytest.raises(error) as raised:
        trigger(world)
    if error is SystemExit:  # argparse: usage and the message on stderr, exit status 2
        assert raised.value.code == 2
        message = capsys.readouterr().err
    else:
        message = str(raised.value)
    for text in expected:
        assert text in message


def test_a_tokenizer_without_pad_pads_with_eos(world, tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(world.load({"model.tokenizer": str(tmp_path)}))
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_cli_errors_are_one_line_and_debug_shows_the_exception(capsys):
    bad = ["eval", "ppl", "--model", "m", "--data", "x.txt", "--lengths", "1"]
    with pytest.raises(SystemExit) as raised:
        cli(bad)
    error = capsys.readouterr().err
    assert raised.value.code == 2 and error.count("\n") == 1 and error.startswith("longlora: error: --lengths")
    with pytest.raises(ValueError, match="--lengths must all be at least 2"):
        cli(["--debug", *bad])
