"""compat.py: the checkpointing switch reaches the installed TrainingArguments under either spelling."""

import warnings

import pytest
from transformers import TrainingArguments

from longlora_plugin.compat import activation_checkpointing_name, checkpointing_arguments


@pytest.mark.parametrize("spelling", ["activation_checkpointing", "gradient_checkpointing"])
@pytest.mark.parametrize("value", [True, False])
def test_either_spelling_switches_checkpointing_without_a_deprecation(tmp_path, spelling, value):
    arguments = checkpointing_arguments({spelling: value, "output_dir": str(tmp_path), "use_cpu": True})
    assert set(arguments) == {activation_checkpointing_name(), "output_dir", "use_cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = TrainingArguments(**arguments)
    assert getattr(args, activation_checkpointing_name()) is value


def test_kwargs_follow_the_switch_and_both_spellings_are_refused():
    name = activation_checkpointing_name()
    renamed = checkpointing_arguments({"gradient_checkpointing_kwargs": {"use_reentrant": False}})
    assert renamed == {f"{name}_kwargs": {"use_reentrant": False}}
    with pytest.raises(ValueError, match="activation_checkpointing.*gradient_checkpointing.*not both"):
        checkpointing_arguments({"activation_checkpointing": True, "gradient_checkpointing": False})
    untouched = {"learning_rate": 1e-4}
    assert checkpointing_arguments(untouched) == untouched
