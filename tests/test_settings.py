"""S2Settings is the one declaration of the S2-Attn settings: everything else derives from it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import longlora_plugin.hf_attention as hf_attention
from longlora_plugin import S2_ATTENTION, LongLoraConfig, S2Settings, configure_s2
from longlora_plugin.recipe import RECIPE_TO_CONFIG
from tests.helpers.families import tiny_config

ROOT = Path(__file__).resolve().parent.parent

NEW_FIELD = '''
    test_only_window: int = setting(7, "A setting added by tests/test_settings.py.", "positive int")
'''

EXERCISE_THE_NEW_FIELD = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from longlora_plugin import LongLoraConfig, configure_s2, get_longlora_model, load_longlora, merge_longlora, save_longlora
from longlora_plugin.adapter import read_longlora_settings
from longlora_plugin.recipe import RECIPE_TO_CONFIG, recipe_from_dict
sys.path.insert(0, {root!r})
from tests.helpers.families import tiny_config

out = Path({out!r})
def base():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=64))

assert LongLoraConfig().s2_test_only_window == 7
assert "tests/test_settings.py" in LongLoraConfig.__dataclass_fields__["s2_test_only_window"].metadata["help"]
try:
    LongLoraConfig(s2_test_only_window=0)
except ValueError as error:
    assert "s2_test_only_window must be a positive int, got 0" in str(error), error
else:
    raise AssertionError("a bad value of the new setting was accepted")
config = LongLoraConfig.for_model(base(), original_context=64, target_context=256, s2_test_only_window=11)
model = get_longlora_model(base(), config)
assert model.get_base_model().config.s2_test_only_window == 11, "config -> model config"
save_longlora(model, out / "adapter")
assert read_longlora_settings(out / "adapter")["s2"]["test_only_window"] == 11, "record"
reloaded = load_longlora(base(), out / "adapter")
assert reloaded.get_base_model().config.s2_test_only_window == 11, "record -> reloaded model"
assert "s2_test_only_window" in LongLoraConfig.resume_keys(), "resume"
merge_longlora(reloaded, out / "merged")
assert "s2_test_only_window" not in json.loads((out / "merged" / "config.json").read_text()), "merge"
assert RECIPE_TO_CONFIG["s2.test_only_window"] == "s2_test_only_window", "recipe"
recipe = recipe_from_dict({{
    "model": {{"name_or_path": "x"}}, "context": {{"original": 64, "target": 256}}, "data": {{"format": "text"}},
    "s2": {{"test_only_window": 5}},
}})
assert recipe.longlora_config().s2_test_only_window == 5
try:
    recipe_from_dict({{"model": {{"name_or_path": "x"}}, "context": {{"original": 64, "target": 256}},
                      "data": {{"format": "text"}}, "s2": {{"test_only_window": -1}}}})
except ValueError as error:
    assert "s2.test_only_window must be a positive int, got -1" in str(error), error
else:
    raise AssertionError("the recipe took a bad value of the new setting")
assert configure_s2(base(), test_only_window=3).test_only_window == 3, "configure_s2"
print("NEW SETTING REACHED EVERY PLACE")
"""


@pytest.mark.slow
def test_a_new_s2_setting_is_one_edit(tmp_path):
    """Copy the package, add one field to S2Settings and nothing else: config, record, merge, resume, recipe and
    configure_s2 all carry it."""
    package = tmp_path / "src" / "longlora_plugin"
    shutil.copytree(ROOT / "longlora_plugin", package, ignore=shutil.ignore_patterns("__pycache__"))
    settings = package / "settings.py"
    source = settings.read_text()
    anchor = '        "positive finite number",\n    )\n'
    assert source.count(anchor) == 1, "the logit_scale field moved; update the anchor"
    settings.write_text(source.replace(anchor, anchor + NEW_FIELD))
    script = tmp_path / "exercise.py"
    script.write_text(EXERCISE_THE_NEW_FIELD.format(root=str(ROOT), out=str(tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": str(package.parent), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "NEW SETTING REACHED EVERY PLACE" in result.stdout


def test_every_s2_setting_has_one_spelling_in_each_place():
    names = S2Settings.names()
    assert names == ("group_size", "group_size_ratio", "shift", "logit_scale", "backend")
    config_fields = LongLoraConfig.__dataclass_fields__
    for name in names:
        key = S2Settings.config_key(name)
        declared = S2Settings.__dataclass_fields__[name]
        assert config_fields[key].default == declared.default and config_fields[key].metadata["help"]
        assert RECIPE_TO_CONFIG[f"s2.{name}"] == key
    assert set(S2Settings().to_record()) == set(names) - {"backend"}  # the kernel is the machine's, not the adapter's
    assert set(LongLoraConfig.resume_keys()) >= set(S2Settings.config_keys(portable_only=True))
    assert "s2_backend" not in LongLoraConfig.resume_keys()


def test_configure_s2_refuses_an_unknown_setting_and_keeps_the_config():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=S2_ATTENTION)
    with pytest.raises(ValueError, match=r"unknown S2-Attn settings \['group'\]; known: \['group_size'"):
        configure_s2(model, group=4)
    with pytest.raises(ValueError, match="s2_group_size_ratio must be a number in"):
        configure_s2(model, group_size=8, group_size_ratio=3.0)
    assert S2Settings.from_config(model.config) == S2Settings()


def test_settings_and_token_layout_are_resolved_once_per_forward(monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=3, s2_group_size=4),
                                             attn_implementation=S2_ATTENTION).train()
    resolved, layouts = [], []
    real_from_config, real_layout = S2Settings.from_config.__func__, hf_attention.token_layout
    monkeypatch.setattr(S2Settings, "from_config", classmethod(lambda cls, c: resolved.append(1) or real_from_config(cls, c)))
    monkeypatch.setattr(hf_attention, "token_layout", lambda *a, **k: layouts.append(1) or real_layout(*a, **k))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    model(input_ids=torch.randint(3, 90, (2, 12)), attention_mask=mask, use_cache=False).logits.sum().backward()
    assert (len(resolved), len(layouts)) == (1, 1)
