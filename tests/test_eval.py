"""Sliding-window perplexity and the eval CLI."""

import csv
import json
import math

import pytest
import torch
from tests.helpers.families import tiny_config
from transformers import AutoModelForCausalLM

from longlora_plugin.cli import main as cli
from longlora_plugin.eval import perplexity_at_lengths, sliding_window_nll


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=259, max_position_embeddings=512)).eval()


def full_pass_nll(model, tokens):
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0, :-1].float(), dim=-1)
    return -log_probs.gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).sum().item()


def test_a_window_covering_the_document_equals_one_full_pass(model):
    tokens = torch.randint(3, 259, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, count = sliding_window_nll(model, tokens, 256, 64)
    assert count == 149
    assert nll == pytest.approx(full_pass_nll(model, tokens), rel=1e-5)


@pytest.mark.parametrize("length,stride", [(64, 16), (64, 64), (50, 7)])
def test_every_token_is_scored_once_with_its_window_of_context(model, length, stride):
    tokens = torch.randint(3, 259, (203,), generator=torch.Generator().manual_seed(2)).tolist()
    nll, count = sliding_window_nll(model, tokens, length, stride)
    later_windows = math.ceil((len(tokens) - length) / stride)
    # With stride == length each later window's first token has no context in its window and is skipped.
    assert count == (202 if stride < length else 202 - later_windows)
    # The first window alone is an ordinary pass over its tokens.
    first_nll, first_count = sliding_window_nll(model, tokens[:length], length, stride)
    assert first_count == length - 1
    assert first_nll == pytest.approx(full_pass_nll(model, tokens[:length]), rel=1e-5)


def test_perplexity_at_several_lengths_and_bad_arguments(model):
    docs = [torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (90, 300)]
    results = perplexity_at_lengths(model, docs, [32, 128], stride=16)
    assert set(results) == {32, 128} and all(1 < v < 1000 for v in results.values())
    with pytest.raises(ValueError, match="stride <= context_length"):
        sliding_window_nll(model, docs[0], 16, 32)
    with pytest.raises(ValueError, match="no document with at least two tokens"):
        perplexity_at_lengths(model, [[5]], [16], 8)


def test_eval_ppl_cli_writes_json_csv_and_plot(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * k}) + "\n" for k in (3, 9))
    )
    common = ["eval", "ppl", "--model", str(tmp_path / "model"), "--tokenizer", "bytes", "--data",
              str(tmp_path / "docs.jsonl"), "--lengths", "64", "256", "--stride", "32", "--quiet"]
    assert cli([*common, "--output", str(tmp_path / "ppl.json"), "--plot", str(tmp_path / "ppl.png")]) == 0
    saved = json.loads((tmp_path / "ppl.json").read_text())["perplexity"]
    assert set(saved) == {"64", "256"}
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    assert cli([*common, "--output", str(tmp_path / "ppl.csv")]) == 0
    rows = list(csv.reader((tmp_path / "ppl.csv").open()))
    assert rows[0] == ["length", "perplexity"] and len(rows) == 3


def test_eval_passkey_on_the_demo_base_with_a_depth_grid(tmp_path):
    """The committed 256-token base retrieves at 256 tokens and fails at 512: the evaluation sees both."""
    from pathlib import Path

    base = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "base"
    out = tmp_path / "passkey.json"
    assert cli(["eval", "passkey", "--model", str(base), "--tokenizer", "bytes", "--min-length", "256",
                "--max-length", "512", "--interval", "256", "--trials", "8", "--depths", "3", "--no-intro", "--quiet",
                "--output", str(out), "--plot", str(tmp_path / "passkey.png")]) == 0
    results = json.loads(out.read_text())["passkey"]
    assert results["256"] >= 0.75 and results["512"] <= 0.5
    assert (tmp_path / "passkey.png").is_file() and (tmp_path / "passkey-depth.png").is_file()


def test_eval_passkey_beyond_the_trained_length_extends_rope(tmp_path, capsys):
    from pathlib import Path

    base = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "base"
    assert cli(["eval", "passkey", "--model", str(base), "--tokenizer", "bytes", "--min-length", "512",
                "--max-length", "512", "--trials", "2", "--no-intro", "--quiet", "--extend-to", "1024"]) == 0
    assert "rope extended by a further x4 to 1024 tokens" in capsys.readouterr().out


def test_a_txt_file_is_scored_as_one_document_so_perplexity_depends_on_the_context(model, tmp_path):
    """Read line by line, no window could hold more than a line: every length >= a line's gave the same perplexity."""
    model.save_pretrained(tmp_path / "model")
    book = tmp_path / "book.txt"
    book.write_text("\n".join(f"Chapter {i % 7}: the river ran past the mill again." for i in range(40)))
    results = {}
    for unit in ("document", "line"):
        out = tmp_path / f"ppl-{unit}.json"
        assert cli(["eval", "ppl", "--model", str(tmp_path / "model"), "--tokenizer", "bytes", "--data", str(book),
                    "--lengths", "64", "256", "--stride", "32", "--quiet", "--sample-by", unit, "--output", str(out)]) == 0
        results[unit] = json.loads(out.read_text())["perplexity"]
    assert results["line"]["64"] == results["line"]["256"]  # lines are shorter than 64 tokens
    assert abs(results["document"]["64"] - results["document"]["256"]) > 1e-3
