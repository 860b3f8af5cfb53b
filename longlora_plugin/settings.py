"""Settings declared once: each field carries its default, help text and rule, and :class:`S2Settings` is the one
declaration of the S2-Attn settings.

Every other spelling of an S2-Attn setting derives from :class:`S2Settings`: the ``s2_*`` attributes of a model
config and the ``s2_*`` fields of ``LongLoraConfig`` (:meth:`S2Settings.config_key`), the recipe's ``s2`` section,
the ``s2`` record in ``longlora.json``, what a merge removes and what a resumed run must share. Adding a field here
is the whole change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .ops import BACKENDS

__all__ = ["InvalidSetting", "S2Settings", "setting", "validate_settings"]


class InvalidSetting(ValueError):
    """A setting whose value breaks its rule. ``allowed`` may name other settings as ``{key}``, so that each edge
    (the Python API, a recipe) spells every key its own way (:meth:`message`)."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(self.message())

    def message(self, spell: Callable[[str], str] = str) -> str:
        class Spelled(dict):
            def __missing__(self, name: str) -> str:
                return spell(name)

        name, bracket, index = self.key.partition("[")  # "rope_options['beta_fast']": spell the setting's name
        return f"{spell(name)}{bracket}{index} must be {self.allowed.format_map(Spelled())}, got {self.value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an int", _is_int),
    "positive int": ("a positive int", lambda v: _is_int(v) and v >= 1),
    "positive int or None": ("a positive int or None", lambda v: v is None or (_is_int(v) and v >= 1)),
    "bool": ("True or False", lambda v: isinstance(v, bool)),
    "ratio": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "probability": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "positive number": ("a positive number", lambda v: _is_number(v) and v > 0),
    "positive finite number": ("a positive finite number", lambda v: _is_number(v) and 0 < v < math.inf),
}


def setting(default: Any, help: str, rule: str | None = None, *, choices: Iterable | None = None, **metadata: Any):
    """A dataclass field with its help text and its rule: one of ``RULES`` or a tuple of ``choices``."""
    if choices is not None:
        choices = tuple(choices)
        metadata["check"] = (f"one of {choices}", choices.__contains__)
    elif rule is not None:
        metadata["check"] = RULES[rule]
    return field(default=default, metadata={"help": help, **metadata})


def validate_settings(obj: Any, names: Iterable[str] | None = None, key: Callable[[str], str] = str) -> None:
    """Check every field of dataclass ``obj`` (or those in ``names``) against its rule; InvalidSetting if broken."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is None or (names is not None and f.name not in names):
            continue
        allowed, valid = check
        value = getattr(obj, f.name)
        if not valid(value):
            raise InvalidSetting(key(f.name), value, allowed)


@dataclass(frozen=True)
class S2Settings:
    """S2-Attn settings. On a model config and in LongLoraConfig each is spelled ``s2_<name>``."""

    group_size: int | None = setting(
        None, "Absolute S2-Attn group size G in tokens; None: G = round(group_size_ratio * L) for a batch of length L.",
        "positive int or None",
    )
    group_size_ratio: float = setting(
        0.25, "G as a fraction of the batch length when group_size is None (the paper's N/4).", "ratio"
    )
    shift: bool = setting(
        True, "Shift the groups of half of the heads by G // 2 (False: plain short attention, the paper's ablation).",
        "bool",
    )
    logit_scale: float = setting(
        1.0,
        "Attention logits x this inside the groups, in training only (1.0: the paper's S2-Attn). Below 1 the model "
        "learns sharper attention than a group of G keys needs, for full attention over N / G times as many keys at "
        "inference (docs/passkey-demo.md).",
        "positive finite number",
    )
    backend: str = setting(
        "auto",
        "Kernel: 'auto' picks the fastest one that can serve the layer; or force 'sdpa' or a varlen kernel.",
        choices=BACKENDS,
        portable=False,  # a property of the machine, not of the trained adapter: not recorded, not compared on resume
    )

    def __post_init__(self) -> None:
        validate_settings(self, key=self.config_key)

    @staticmethod
    def config_key(name: str) -> str:
        return f"s2_{name}"

    @classmethod
    def names(cls, *, portable_only: bool = False) -> tuple[str, ...]:
        return tuple(
            f.name for f in dataclasses.fields(cls) if not portable_only or f.metadata.get("portable", True)
        )

    @classmethod
    def config_keys(cls, *, portable_only: bool = False) -> tuple[str, ...]:
        return tuple(cls.config_key(name) for name in cls.names(portable_only=portable_only))

    @classmethod
    def from_config(cls, config: Any) -> "S2Settings":
        """The settings of a model config (or a LongLoraConfig); defaults where an attribute is unset or None."""
        values = {name: getattr(config, cls.config_key(name), None) for name in cls.names()}
        return cls(**{name: value for name, value in values.items() if value is not None})

    def apply_to(self, config: Any) -> None:
        for name in self.names():
            setattr(config, self.config_key(name), getattr(self, name))

    @classmethod
    def remove_from(cls, config: Any) -> None:
        for key in cls.config_keys():
            if hasattr(config, key):
                delattr(config, key)

    def updated(self, **changes: Any) -> "S2Settings":
        """A copy with ``changes`` applied (a None value keeps the current one); unknown names are refused."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown S2-Attn settings {unknown}; known: {list(self.names())}")
        return dataclasses.replace(self, **{name: value for name, value in changes.items() if value is not None})

    def to_record(self) -> dict[str, Any]:
        """The portable settings, as ``longlora.json`` records them."""
        return {name: getattr(self, name) for name in self.names(portable_only=True)}

    def with_record(self, record: Mapping[str, Any]) -> "S2Settings":
        """These settings with a record's portable ones applied (a record from an older version may lack some)."""
        portable = self.names(portable_only=True)
        return dataclasses.replace(self, **{name: record[name] for name in portable if name in record})

    def group_size_for(self, seq_len: int) -> int:
        """G for a batch of length ``seq_len``: the absolute size if set, else the ratio of the length, at least 1."""
        if self.group_size is not None:
            return self.group_size
        return max(1, round(self.group_size_ratio * seq_len))
