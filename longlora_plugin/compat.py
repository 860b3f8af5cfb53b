"""The one place where supported releases of our dependencies differ. Nothing else checks versions.

Each shim names the releases it exists for; delete it when the floor in pyproject.toml passes that release.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

__all__ = ["activation_checkpointing_name", "checkpointing_arguments"]

# --- Shim 1: TrainingArguments.activation_checkpointing --------------------------------------------------------------
# Exists for transformers < 5.23, where the field is only called gradient_checkpointing. From 5.23 on,
# gradient_checkpointing is a deprecated alias (a FutureWarning, removal announced for v6). Delete when the
# transformers floor is >= 5.23 and write activation_checkpointing directly.
_CHECKPOINTING_NAMES = ("activation_checkpointing", "gradient_checkpointing")


@functools.lru_cache(maxsize=None)
def activation_checkpointing_name() -> str:
    """The TrainingArguments field that switches activation (gradient) checkpointing on this transformers."""
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    return next(name for name in _CHECKPOINTING_NAMES if name in fields)


def checkpointing_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` with either spelling of the checkpointing switch (and its ``_kwargs``) renamed to the one the
    installed transformers has. Giving both spellings is a ValueError."""
    current = activation_checkpointing_name()
    renamed = dict(arguments)
    for suffix in ("", "_kwargs"):
        given = [name + suffix for name in _CHECKPOINTING_NAMES if name + suffix in arguments]
        if len(given) > 1:
            raise ValueError(f"give one of {given}, not both: they name the same TrainingArguments setting")
        if given and given[0] != current + suffix:
            renamed[current + suffix] = renamed.pop(given[0])
    return renamed
