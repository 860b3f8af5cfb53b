"""Recipes: commented YAML files that say what to train, read strictly (an unknown key is an error).

Sections: ``model``, ``context``, ``s2``, ``lora``, ``data`` and ``training`` (the keys of TRL's ``SFTConfig``, i.e.
the usual ``TrainingArguments``). Command-line overrides use dotted keys: ``--training.learning_rate 1e-4``; values
are read as YAML scalars, so ``false`` is False (the reference's ``type=bool`` flag read "False" as True).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .memory import MemorySection
from .quantization import quantization_from_recipe

__all__ = [
    "ContextSection",
    "DataSection",
    "LoraSection",
    "ModelSection",
    "Recipe",
    "S2Section",
    "apply_overrides",
    "load_recipe",
    "parse_overrides",
]

TOO_LONG_POLICIES = ("error", "truncate", "drop")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-4 (no dot) as a string; recipes mean a float, as YAML 1.2 does."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class ModelSection:
    name_or_path: str
    tokenizer: str | None = None  # defaults to name_or_path; "bytes" is the download-free byte tokenizer
    dtype: str = "auto"  # "auto", "bfloat16", "float16", "float32"
    trust_remote_code: bool = False
    quantization: dict | None = None  # QLoRA: {bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16}


@dataclass
class ContextSection:
    original: int
    target: int
    rope_type: str = "linear"
    rope_rounding: str = "exact"  # or "ceil", as the paper
    rope_options: dict | None = None  # further rope_parameters of rope_type, e.g. yarn's attention_factor


@dataclass
class S2Section:
    group_size: int | None = None  # absolute G; otherwise fixed from group_size_ratio * context.target
    group_size_ratio: float = 0.25
    shift: bool = True
    logit_scale: float = 1.0  # attention logits x this inside the groups in training; 1.0 is the paper's S2-Attn


@dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    trainable_embeddings: bool = True
    trainable_norms: bool = True
    target_modules: list[str] | None = None  # None: found from the model


@dataclass
class DataSection:
    format: str  # a dataset format name: "text" (continued pre-training), "longalpaca", "passkey"...
    path: str | None = None  # local .json/.jsonl/.parquet/.txt file, or a hub dataset name
    split: str = "train"
    text_field: str = "text"
    too_long: str = "error"  # "error", "truncate" or "drop" a record longer than context.target
    packing: bool = False  # TRL's padding-free packing (cu_seq_lens), which S2-Attn handles
    max_records: int | None = None
    num_samples: int = 1000  # for generated formats (passkey)
    min_length: int | None = None  # generated formats: shortest sample (default context.original)
    seed: int = 0


@dataclass
class Recipe:
    model: ModelSection
    context: ContextSection
    data: DataSection
    s2: S2Section = field(default_factory=S2Section)
    lora: LoraSection = field(default_factory=LoraSection)
    training: dict[str, Any] = field(default_factory=dict)
    memory: MemorySection = field(default_factory=MemorySection)
    source: str = "<dict>"

    @property
    def group_size(self) -> int:
        """The absolute G: the same grouping for every batch, whatever its length."""
        if self.s2.group_size is not None:
            return self.s2.group_size
        return max(1, round(self.s2.group_size_ratio * self.context.target))

    def validate(self) -> None:
        where = self.source
        for name in ("original", "target"):
            value = getattr(self.context, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: context.{name} must be a positive int, got {value!r}")
        if self.context.target <= self.context.original:
            raise ValueError(
                f"{where}: context.target ({self.context.target}) must be larger than context.original "
                f"({self.context.original})"
            )
        if self.data.too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"{where}: data.too_long must be one of {TOO_LONG_POLICIES}, got {self.data.too_long!r}")
        ratio = self.s2.group_size_ratio
        if not _is_number(ratio) or not 0 < ratio <= 1:
            raise ValueError(f"{where}: s2.group_size_ratio must be a number in (0, 1], got {ratio!r}")
        group = self.group_size
        if not _is_int(group) or not 1 <= group <= self.context.target:
            raise ValueError(f"{where}: s2.group_size must be an int in [1, context.target={self.context.target}], got {group!r}")
        self._validate_choices()
        self.memory.validate(where)
        quantization_from_recipe(self.model.quantization, where)
        from trl import SFTConfig

        allowed = {f.name for f in dataclasses.fields(SFTConfig)}
        unknown = sorted(set(self.training) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown training keys {unknown}; allowed are the fields of trl.SFTConfig")
        for reserved in ("max_length", "packing", "padding_free"):
            if reserved in self.training:
                raise ValueError(
                    f"{where}: training.{reserved} is set from the recipe (context.target, data.packing); remove it"
                )

    def _validate_choices(self) -> None:
        """Values that would otherwise only fail once the model is loaded."""
        from .rope import ROPE_TYPES, check_rope_options

        modules = self.lora.target_modules
        checks = [
            ("model.dtype", self.model.dtype, self.model.dtype in DTYPES, f"one of {DTYPES}"),
            ("context.rope_type", self.context.rope_type, self.context.rope_type in ROPE_TYPES, f"one of {ROPE_TYPES}"),
            ("context.rope_rounding", self.context.rope_rounding, self.context.rope_rounding in ("exact", "ceil"),
             "'exact' or 'ceil'"),
            ("lora.r", self.lora.r, _is_int(self.lora.r) and self.lora.r >= 1, "a positive int"),
            ("lora.alpha", self.lora.alpha, _is_number(self.lora.alpha) and self.lora.alpha > 0, "a positive number"),
            ("lora.dropout", self.lora.dropout, _is_number(self.lora.dropout) and 0 <= self.lora.dropout < 1,
             "a number in [0, 1)"),
            ("lora.target_modules", modules,
             modules is None or (isinstance(modules, list) and all(isinstance(m, str) for m in modules)),
             "a list of module names, or null to find them in the model"),
        ]
        for name in ("s2.shift", "lora.trainable_embeddings", "lora.trainable_norms", "data.packing",
                     "model.trust_remote_code"):
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            checks.append((name, value, isinstance(value, bool), "true or false"))
        scale = self.s2.logit_scale
        checks.append(("s2.logit_scale", scale, _is_number(scale) and 0 < scale < float("inf"), "a positive number"))
        low, target = self.data.min_length, self.context.target
        checks.append(("data.min_length", low, low is None or (_is_int(low) and 1 <= low <= target),
                       f"null or an int in [1, context.target={target}]"))
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{self.source}: {name} must be {allowed}, got {value!r}")
        try:  # rope_type is known here: the checks above refused any other
            check_rope_options(self.context.rope_type, self.context.rope_options)
        except ValueError as error:
            raise ValueError(f"{self.source}: context.{error}") from None


SECTIONS = {
    "model": ModelSection,
    "context": ContextSection,
    "s2": S2Section,
    "lora": LoraSection,
    "data": DataSection,
    "memory": MemorySection,
}


def _section(cls: type, values: Any, name: str, source: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{source}: section '{name}' must be a mapping, got {type(values).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"{source}: unknown keys in '{name}': {unknown}; allowed: {sorted(allowed)}")
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(f"{source}: section '{name}' needs {missing}")
    return cls(**values)


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a recipe is a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS) - {"training"})
    if unknown:
        raise ValueError(f"{source}: unknown sections {unknown}; allowed: {sorted([*SECTIONS, 'training'])}")
    for required in ("model", "context", "data"):
        if required not in raw:
            raise ValueError(f"{source}: the recipe needs a '{required}' section")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise ValueError(f"{source}: section 'training' must be a mapping")
    recipe = Recipe(
        **{name: _section(cls, raw.get(name), name, source) for name, cls in SECTIONS.items()},
        training=dict(training),
        source=source,
    )
    recipe.validate()
    return recipe


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """``["--training.learning_rate", "1e-4", "--data.packing=true"]`` -> {"training.learning_rate": 1e-4, ...}."""
    overrides: dict[str, Any] = {}
    position = 0
    while position < len(arguments):
        argument = arguments[position]
        if not argument.startswith("--"):
            raise ValueError(f"expected --section.key value, got {argument!r}")
        key, has_value, value = argument[2:].partition("=")
        if not has_value:
            if position + 1 >= len(arguments):
                raise ValueError(f"override --{key} needs a value")
            position += 1
            value = arguments[position]
        if "." not in key:
            raise ValueError(f"override keys name a section and a key, like --training.learning_rate; got --{key}")
        overrides[key] = _read_yaml(value)
        position += 1
    return overrides


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    result = {name: dict(section) if isinstance(section, dict) else section for name, section in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        result.setdefault(section, {})
        if not isinstance(result[section], dict):
            raise ValueError(f"cannot override {dotted}: section '{section}' is not a mapping")
        result[section][key] = value
    return result


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no recipe file at {path}")
    raw = _read_yaml(path.read_text()) or {}
    raw = apply_overrides(raw, overrides or {})
    for section, key in (("model", "name_or_path"), ("model", "tokenizer"), ("data", "path")):
        value = (raw.get(section) or {}).get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (path.parent / value).exists():
            raw[section][key] = str(path.parent / value)  # paths next to the recipe travel with it
    return recipe_from_dict(raw, source=str(path))
