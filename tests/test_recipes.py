"""Recipes, data validation, the training entry point and the CLI, on CPU with a tiny saved model."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tests.helpers.families import tiny_config
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from longlora_plugin import S2_ATTENTION, read_longlora_settings
from longlora_plugin.cli import main as cli
from longlora_plugin.data import byte_tokenizer
from longlora_plugin.recipe import load_recipe, parse_overrides, recipe_from_dict
from longlora_plugin.train import build_trainer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=259, max_position_embeddings=64))
    model.save_pretrained(folder)
    return folder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ALPACA = [
    {"instruction": "Summarize.", "input": "A long story " * 3, "output": "A story."},
    {"instruction": "Say hi.", "output": "hi"},
    {"instruction": "Count.", "input": "", "output": "one two three"},
    {"instruction": "Name a colour.", "output": "green"},
]


def recipe_dict(base, data_path, **data):
    return {
        "model": {"name_or_path": str(base), "tokenizer": "bytes", "dtype": "float32"},
        "context": {"original": 64, "target": 512},
        "s2": {"group_size": 128},
        "data": {"format": "longalpaca", "path": str(data_path), **data},
        "training": {
            "output_dir": str(Path(data_path).parent / "run"),
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "bf16": False,
            "use_cpu": True,
            "gradient_checkpointing": False,
            "save_strategy": "no",
            "logging_steps": 1,
        },
    }


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.group_size <= recipe.context.target


def test_overrides_are_typed_and_dotted():
    assert parse_overrides(["--training.learning_rate", "1e-4", "--data.packing=false", "--s2.group_size", "64"]) == {
        "training.learning_rate": 1e-4,
        "data.packing": False,
        "s2.group_size": 64,
    }
    with pytest.raises(ValueError, match="expected --section.key value, got 'learning_rate'"):
        parse_overrides(["learning_rate", "1"])
    with pytest.raises(ValueError, match="name a section and a key"):
        parse_overrides(["--max_steps", "1"])
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--training.max_steps"])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r["lora"].update(rank=8), r"unknown keys in 'lora': \['rank'\]"),
        (lambda r: r.update(optimizer={}), r"unknown sections \['optimizer'\]"),
        (lambda r: r["training"].update(learning_rte=1.0), r"unknown training keys \['learning_rte'\]"),
        (lambda r: r["training"].update(max_length=10), "training.max_length is set from the recipe"),
        (lambda r: r["context"].update(target=32), r"context.target must be larger than context.original \(64\), got 32"),
        (lambda r: r["data"].update(too_long="ignore"), "data.too_long must be one of .* got 'ignore'"),
        (lambda r: r["s2"].update(group_size=1000), r"s2.group_size must be at most context.target \(512\), got 1000"),
        (lambda r: r.pop("data"), "needs a 'data' section"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, change, message):
    raw = recipe_dict(tmp_path, tmp_path / "d.jsonl")
    raw["lora"] = {}
    change(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load_recipe(path)


@pytest.mark.parametrize(
    "records,message",
    [
        ([{"instruction": "x"}], r"record 0 has no 'output' field"),
        ([ALPACA[0], {"instruction": "x", "output": "  "}], r"record 1 has an empty 'output'"),
        ([{"instruction": 3, "output": "y"}], r"record 0 field 'instruction' must be a string"),
        ([ALPACA[0], ALPACA[1], {"instruction": "long " * 100, "output": "y"}], r"record 2 has \d+ tokens, more than"),
    ],
)
def test_bad_records_fail_before_training_naming_file_and_index(tiny_base, tmp_path, records, message):
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=f"{data}: {message}"):
        build_trainer(recipe_from_dict(recipe_dict(tiny_base, data)))


def test_non_utf8_file_is_named(tiny_base, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"cannot read {data}"):
        build_trainer(recipe_from_dict(recipe_dict(tiny_base, data)))


@pytest.mark.parametrize("policy,kept", [("drop", 4), ("truncate", 5)])
def test_too_long_records_are_dropped_or_truncated_as_the_recipe_says(tiny_base, tmp_path, policy, kept, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", [*ALPACA, {"instruction": "Repeat.", "output": "y " * 250}])
    trainer = build_trainer(recipe_from_dict(recipe_dict(tiny_base, data, too_long=policy)))
    assert len(trainer.train_dataset) == kept
    assert ("1 records dropped" if policy == "drop" else "1 truncated") in caplog.text
    assert all(len(ids) <= 512 for ids in trainer.train_dataset["input_ids"])


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_file_formats_load(tiny_base, tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ALPACA))
    elif suffix == ".jsonl":
        write_jsonl(path, ALPACA)
    else:
        pd.DataFrame(ALPACA).to_parquet(path)
    trainer = build_trainer(recipe_from_dict(recipe_dict(tiny_base, path)))
    assert len(trainer.train_dataset) == len(ALPACA)
    # the prompt is masked out of the loss: only completion tokens are trained on
    first = trainer.train_dataset[0]
    trained = sum(label != -100 for label in first["labels"])
    assert 0 < trained < len(first["input_ids"]) and first["labels"][0] == -100


def test_text_format_joins_documents_with_eos_into_blocks(tiny_base, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"document number {i} " * 5 for i in range(60)))
    raw = recipe_dict(tiny_base, path, format="text", sample_by="line")
    trainer = build_trainer(recipe_from_dict(raw))
    blocks = trainer.train_dataset["input_ids"]
    assert len(blocks) >= 2 and all(len(b) == 512 for b in blocks)
    assert any(2 in b for b in blocks)  # EOS (id 2) between documents


def test_a_txt_file_is_one_document_unless_asked_otherwise(tiny_base, tmp_path):
    """A book's lines belong together: no EOS is put between them, and blocks run across line ends."""
    path = tmp_path / "book.txt"
    path.write_text("\n".join(f"line {i} of one long book." for i in range(200)))
    trainer = build_trainer(recipe_from_dict(recipe_dict(tiny_base, path, format="text")))
    blocks = trainer.train_dataset["input_ids"]
    assert len(blocks) >= 5 and not any(2 in b for b in blocks)
    assert any(b.count(ord("\n") + 3) > 5 for b in blocks)  # many line breaks inside one block


def test_train_cli_writes_a_complete_adapter_then_merge_and_eval(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, data)))
    assert cli(["train", str(path), "--training.max_steps", "2"]) == 0
    adapter = tmp_path / "run" / "adapter"
    settings = read_longlora_settings(adapter)
    assert settings["rope_parameters"]["factor"] == 8.0 and settings["s2"]["group_size"] == 128
    assert cli(["merge", "--base", str(tiny_base), "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.rope_parameters["factor"] == 8.0
    out = tmp_path / "passkey.json"
    assert cli(["eval", "passkey", "--model", str(tmp_path / "merged"), "--tokenizer", "bytes", "--min-length", "128",
                "--max-length", "256", "--interval", "128", "--trials", "2", "--no-intro", "--quiet", "--output", str(out)]) == 0
    assert set(json.loads(out.read_text())["passkey"]) == {"128", "256"}
    # perplexity of base + adapter (loaded with its rope extension) equals that of the merged model
    results = {}
    for name, extra in (("adapter", ["--model", str(tiny_base), "--adapter", str(adapter)]),
                        ("merged", ["--model", str(tmp_path / "merged")])):
        target = tmp_path / f"ppl-{name}.json"
        assert cli(["eval", "ppl", *extra, "--tokenizer", "bytes", "--data", str(data), "--text-field", "output",
                    "--lengths", "64", "--stride", "16", "--quiet", "--output", str(target)]) == 0
        results[name] = json.loads(target.read_text())["perplexity"]["64"]
    assert results["adapter"] == pytest.approx(results["merged"], rel=1e-4)


def test_unwritable_output_dir_fails_at_start(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    raw = recipe_dict(tiny_base, data)
    raw["training"]["output_dir"] = str(blocker / "run")
    with pytest.raises((ValueError, OSError), match="file-not-folder"):
        build_trainer(recipe_from_dict(raw))


def test_packed_step_gives_the_loss_of_the_unpacked_batch():
    """TRL's padding-free collator (one row, restarting position_ids) vs the padded batch, with S2."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", vocab_size=259, s2_group_size=8), attn_implementation=S2_ATTENTION
    ).train()
    tokenizer = byte_tokenizer()
    examples = [{"input_ids": tokenizer(text)["input_ids"]} for text in ("short one", "a somewhat longer text here", "mid size")]
    losses = []
    for padding_free in (True, False):
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(examples)
        # One row whose position_ids restart per document (TRL >= 1.16 adds cu_seq_lens_q/k; 1.14 leaves them out).
        assert batch["input_ids"].shape[0] == (1 if padding_free else len(examples))
        if padding_free:
            assert int((batch["position_ids"] == 0).sum()) == len(examples)
        losses.append(model(**batch, use_cache=False).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)


def test_passkey_samples_lie_between_min_length_and_target_and_can_train_on_every_token(tiny_base, tmp_path):
    recipe = recipe_from_dict(recipe_dict(tiny_base, tmp_path / "unused.jsonl", format="passkey", path=None,
                                          min_length=400, num_samples=12))
    recipe.training["completion_only_loss"] = False
    trainer = build_trainer(recipe)
    lengths = [len(row["input_ids"]) for row in trainer.train_dataset]
    assert min(lengths) >= 400 - 8 and max(lengths) <= 512 + 1, lengths  # prompt + key + EOS, cut at bytes
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert (batch["labels"] != -100).sum() > 300  # not only the key's digits
