"""Plugin discovery through entry points, the env var that limits it, hook docs, and auto-registration."""

import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tests.helpers.families import tiny_config
from transformers import AutoModelForCausalLM

from longlora_plugin import hookspecs
from longlora_plugin.config import find_longlora_modules
from longlora_plugin.plugins import PLUGINS_ENV_VAR, get_plugin_manager, installed_plugins, reset_plugin_manager

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """A plugin 'installed' as a distribution with an entry point: a module plus its .dist-info on sys.path."""
    (tmp_path / "fake_longlora_family.py").write_text(
        textwrap.dedent(
            """
            from longlora_plugin import hookimpl

            @hookimpl
            def longlora_attention_projections(model):
                if model.config.model_type != "llama":
                    return None
                return [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
            """
        )
    )
    info = tmp_path / "fake_longlora_family-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-longlora-family\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[longlora_plugin]\nfake_family = fake_longlora_family\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_plugin_manager()
    yield
    sys.modules.pop("fake_longlora_family", None)
    reset_plugin_manager()


def projections(model):
    return {n.rsplit(".", 1)[-1] for n in find_longlora_modules(model).attention_projections}


def test_an_installed_plugin_is_discovered_and_overrides_the_default(fake_distribution, monkeypatch):
    monkeypatch.delenv(PLUGINS_ENV_VAR, raising=False)
    assert get_plugin_manager().get_plugin("fake_family") is not None
    assert {"name": "fake_family", "distribution": "fake-longlora-family", "version": "1.2.3"} in installed_plugins()
    llama = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert projections(llama) == {"q_proj", "v_proj"}
    neox = AutoModelForCausalLM.from_config(tiny_config("gpt_neox"))
    assert projections(neox) == {"query_key_value", "dense"}  # the plugin declines; the default answers


@pytest.mark.parametrize("value,loaded", [("none", False), ("0", False), ("other_plugin", False), ("fake_family", True), ("all", True)])
def test_env_var_limits_loading(fake_distribution, monkeypatch, value, loaded):
    monkeypatch.setenv(PLUGINS_ENV_VAR, value)
    reset_plugin_manager()
    assert (get_plugin_manager().get_plugin("fake_family") is not None) is loaded
    llama = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert projections(llama) == ({"q_proj", "v_proj"} if loaded else {"q_proj", "k_proj", "v_proj", "o_proj"})


def hook_names():
    return sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("longlora_"))


def test_every_hook_is_documented():
    docs = (ROOT / "docs" / "plugin_hooks.md").read_text()
    documented = sorted(re.findall(r"^### (longlora_\w+)$", docs, re.M))
    assert documented == hook_names()
    for name in hook_names():
        assert inspect.getdoc(getattr(hookspecs, name)), f"{name} has no docstring"


def test_builtin_plugin_implements_every_hook_but_dataset_formats():
    manager = get_plugin_manager()
    builtin = manager.get_plugin("longlora.builtin.families")
    implemented = {impl.name for impl in manager.get_hookcallers(builtin)}
    assert implemented == set(hook_names()) - {"longlora_dataset_formats"}


def run_python(code, **env):
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment)


UNCHANGED_SCRIPT = """
    import sys
    assert "longlora_plugin" not in sys.modules and "torch" not in sys.modules  # nothing at interpreter start
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="s2_attention")
    print(model.config._attn_implementation)
"""


def test_a_script_that_only_imports_transformers_can_use_s2_attention():
    result = run_python(UNCHANGED_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "s2_attention"


def test_auto_registration_is_switched_off_by_the_env_var():
    result = run_python(UNCHANGED_SCRIPT, LONGLORA_AUTOREGISTER="0")
    assert result.returncode != 0 and "s2_attention" in result.stderr


def test_python_start_without_transformers_imports_nothing_of_ours():
    result = run_python(
        """
        import sys
        print(sorted(m for m in sys.modules if m.startswith(("longlora_plugin", "torch", "transformers"))))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['longlora_plugin_autoload']"  # only the finder, torch and transformers untouched


def test_longlora_info_lists_name_families_plugins_and_versions(fake_distribution, monkeypatch):
    monkeypatch.delenv(PLUGINS_ENV_VAR, raising=False)
    from longlora_plugin.cli import main

    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert main(["info"]) == 0
    text = "\n".join(lines)
    assert "s2_attention" in text and "registered: yes" in text
    assert "llama" in text and "gpt_neox" in text and "falcon" in text
    assert "fake_family (fake-longlora-family 1.2.3)" in text
    assert f"torch {torch.__version__}" in text and "transformers" in text and "peft" in text
