"""Faulty runs lose nothing: interrupted saves and merges, a full disk, resumes. The same seed gives the same run."""

import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from tests.helpers.families import tiny_config
from tests.helpers.launch_setup import make_base_and_data, write_recipe
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

import longlora_plugin.adapter as adapter
from longlora_plugin import get_longlora_model, load_longlora, merge_longlora, read_longlora_settings, save_longlora
from longlora_plugin.recipe import load_recipe
from longlora_plugin.train import build_trainer, train

IDS = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(1))


def base():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=64))


def longlora_model(seed: int):
    """An adapter whose LoRA B matrices are random, so that two seeds give two adapters with different outputs."""
    model = get_longlora_model(base(), original_context=64, target_context=256, s2_group_size=32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def staging_folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith("."))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def cleanup_never_runs(monkeypatch):
    """As after SIGKILL: the staging folder of an interrupted write stays where it is."""
    monkeypatch.setattr(adapter, "shutil", SimpleNamespace(rmtree=lambda *args, **kwargs: None))


def die_midway_through_save(monkeypatch, cls, weights_file: str, what: str) -> None:
    """cls.save_pretrained writes its files, then the process dies halfway through the weights file."""
    real_save = cls.save_pretrained

    def save_then_die(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        truncate(Path(folder) / weights_file)
        raise KeyboardInterrupt(f"killed while writing the {what}")

    monkeypatch.setattr(cls, "save_pretrained", save_then_die)


@pytest.fixture
def adapter_save_dies_midway(monkeypatch):
    die_midway_through_save(monkeypatch, PeftModel, "adapter_model.safetensors", "adapter")


@pytest.fixture
def merged_save_dies_midway(monkeypatch):
    die_midway_through_save(monkeypatch, PreTrainedModel, "model.safetensors", "merged model")


@pytest.mark.parametrize("killed", [False, True], ids=["exception", "killed"])
def test_interrupted_save_over_a_good_adapter_keeps_it(tmp_path, request, killed):
    good = longlora_model(seed=1)
    save_longlora(good, tmp_path / "adapter")
    expected = logits(good)
    if killed:
        request.getfixturevalue("cleanup_never_runs")
    request.getfixturevalue("adapter_save_dies_midway")
    with pytest.raises(KeyboardInterrupt):
        save_longlora(longlora_model(seed=2), tmp_path / "adapter")

    torch.testing.assert_close(logits(load_longlora(base(), tmp_path / "adapter")), expected)
    leftovers = staging_folders(tmp_path)
    assert len(leftovers) == (1 if killed else 0)
    for partial in leftovers:
        assert partial.name.startswith(".adapter.partial-")
        with pytest.raises(ValueError, match="not a complete LongLoRA adapter folder"):
            load_longlora(base(), partial)


@pytest.mark.parametrize("killed", [False, True], ids=["exception", "killed"])
def test_interrupted_merge_over_a_good_model_keeps_it(tmp_path, request, killed):
    good = longlora_model(seed=1)
    expected = logits(good)
    merge_longlora(good, tmp_path / "merged")
    if killed:
        request.getfixturevalue("cleanup_never_runs")
    request.getfixturevalue("merged_save_dies_midway")
    with pytest.raises(KeyboardInterrupt):
        merge_longlora(longlora_model(seed=2), tmp_path / "merged")

    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()), expected)
    leftovers = staging_folders(tmp_path)
    assert len(leftovers) == (1 if killed else 0)
    for partial in leftovers:
        assert partial.name.startswith(".merged.partial-")
        with pytest.raises(Exception, match="(?i)safetensors|header|deserializ"):
            AutoModelForCausalLM.from_pretrained(partial)


@pytest.mark.skipif(sys.platform != "linux", reason="the atomic swap is Linux's renameat2")
def test_replacing_a_folder_is_one_atomic_swap(tmp_path, monkeypatch):
    save_longlora(longlora_model(seed=1), tmp_path / "adapter")
    swaps = []
    real_exchange = adapter._exchange

    def recording_exchange(first, second):
        swaps.append(real_exchange(first, second))
        return swaps[-1]

    monkeypatch.setattr(adapter, "_exchange", recording_exchange)
    newer = longlora_model(seed=2)
    save_longlora(newer, tmp_path / "adapter")
    assert swaps == [True]  # no moment without a complete folder at the final name
    torch.testing.assert_close(logits(load_longlora(base(), tmp_path / "adapter")), logits(newer))
    assert staging_folders(tmp_path) == []


def test_without_the_swap_two_renames_still_replace_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter, "_exchange", lambda first, second: False)
    save_longlora(longlora_model(seed=1), tmp_path / "adapter")
    newer = longlora_model(seed=2)
    save_longlora(newer, tmp_path / "adapter")
    torch.testing.assert_close(logits(load_longlora(base(), tmp_path / "adapter")), logits(newer))
    assert staging_folders(tmp_path) == []


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_base_and_data(tmp_path_factory.mktemp("runs"), records=16)


@pytest.fixture
def training_forbidden(monkeypatch):
    def training_started(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(transformers.Trainer, "train", training_started)


@pytest.mark.parametrize("limit,kept", [(None, 3), (2, 2), (1, 1)])
def test_a_disk_without_room_for_the_checkpoints_kept_fails_at_start(folder, monkeypatch, training_forbidden, limit, kept):
    """3 steps saving every step keep 3 checkpoints, or save_total_limit of them."""
    Usage = namedtuple("Usage", "total used free")
    almost_full = Usage(total=2**30, used=2**30 - 4096, free=4096)
    monkeypatch.setattr("longlora_plugin.train.shutil.disk_usage", lambda path: almost_full)
    recipe = write_recipe(folder, "full-disk", use_cpu=True, save_strategy="steps", save_steps=1,
                          save_total_limit=limit)
    message = rf"full-disk has 0\.0 MiB free, but {kept} checkpoint\(s\) and the final adapter need about \d+\.\d MiB"
    with pytest.raises(ValueError, match=message):
        build_trainer(load_recipe(recipe))


def test_room_for_one_checkpoint_is_enough_only_when_one_is_kept(folder, monkeypatch, training_forbidden):
    from longlora_plugin.train import _check_free_space

    trainer = build_trainer(load_recipe(write_recipe(folder, "one-kept", use_cpu=True, save_strategy="steps",
                                                     save_steps=1, save_total_limit=1)))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    one_checkpoint_and_adapter = trainable * 4 * 2 + trainable * 8  # fp32 adapter twice, two fp32 Adam moments
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("longlora_plugin.train.shutil.disk_usage",
                        lambda path: Usage(2**40, 0, one_checkpoint_and_adapter + 1024))
    _check_free_space(trainer)  # fits
    trainer.args.save_total_limit = None  # now all 3 checkpoints stay
    with pytest.raises(ValueError, match=r"3 checkpoint\(s\)"):
        _check_free_space(trainer)


@pytest.fixture(scope="module")
def runs(folder):
    """Three short runs through the real entry point: two with seed 0, one with seed 1. Each saves at step 2."""
    losses, trainers = {}, {}
    for name, seed in (("first", 0), ("again", 0), ("other-seed", 1)):
        recipe = write_recipe(
            folder, name, use_cpu=True, max_steps=4, seed=seed, data_seed=seed, save_strategy="steps", save_steps=2
        )
        trainers[name] = train(load_recipe(recipe))
        losses[name] = [entry["loss"] for entry in trainers[name].state.log_history if "loss" in entry]
    return losses, trainers


def test_the_same_seed_gives_the_same_loss_curve(runs):
    losses, _ = runs
    assert len(losses["first"]) == 4
    assert losses["again"] == losses["first"]  # exactly: same floats
    assert losses["other-seed"] != losses["first"]


def test_a_checkpoint_is_a_complete_adapter_and_resumes_with_its_own_recipe(folder, runs, training_forbidden):
    checkpoint = folder / "first" / "checkpoint-2"
    settings = read_longlora_settings(checkpoint)
    assert settings == read_longlora_settings(folder / "first" / "adapter")
    model = load_longlora(AutoModelForCausalLM.from_pretrained(folder / "base"), checkpoint)
    assert model.peft_config["default"].target_context == 256

    recipe = write_recipe(folder, "first", use_cpu=True, max_steps=4, save_strategy="steps", save_steps=2)
    build_trainer(load_recipe(recipe, {"training.resume_from_checkpoint": str(checkpoint)}))  # the same run: accepted

