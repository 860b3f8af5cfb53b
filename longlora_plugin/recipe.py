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
from trl import SFTConfig

from .compat import checkpointing_arguments
from .config import LongLoraConfig
from .settings import InvalidSetting, S2Settings, setting, validate_settings

from .sequence_parallel import ParallelSection

from .eval.selection import SelectionSection
from .memory import MemorySection
from .quantization import quantization_from_recipe

__all__ = [
    "ContextSection",
    "DataSection",
    "LoraSection",
    "ModelSection",
    "RECIPE_TO_CONFIG",
    "Recipe",
    "apply_overrides",
    "load_recipe",
    "parse_overrides",
]

TOO_LONG_POLICIES = ("error", "truncate", "drop")
DTYPES = ("auto", "bfloat16", "float16", "float32")
TEXT_UNITS = ("document", "paragraph", "line")
PASSKEY_DEPTHS = ("uniform", "s2_reach")


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
    dtype: str = setting("auto", "Weights dtype.", choices=DTYPES)
    trust_remote_code: bool = setting(False, "Allow model code from the hub.", "bool")
    quantization: dict | None = None  # QLoRA: {bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16}


# The adapter settings a recipe gives, as LongLoraConfig fields: LongLoraConfig holds their defaults and rules.
RECIPE_TO_CONFIG = {
    "context.original": "original_context",
    "context.target": "target_context",
    "context.rope_type": "rope_type",
    "context.rope_rounding": "rope_rounding",
    "context.rope_options": "rope_options",
    "lora.r": "r",
    "lora.alpha": "lora_alpha",
    "lora.dropout": "lora_dropout",
    "lora.trainable_embeddings": "trainable_embeddings",
    "lora.trainable_norms": "trainable_norms",
    "lora.target_modules": "target_modules",
    **{f"s2.{name}": S2Settings.config_key(name) for name in S2Settings.names()},
}
_CONFIG_TO_RECIPE = {config_key: recipe_key for recipe_key, config_key in RECIPE_TO_CONFIG.items()}


@dataclass
class ContextSection:  # None: LongLoraConfig's default
    original: int
    target: int
    rope_type: str | None = None  # "linear" unless set
    rope_rounding: str | None = None  # "exact", or "ceil" as the paper
    rope_options: dict | None = None  # further rope_parameters of rope_type, e.g. yarn's attention_factor


@dataclass
class LoraSection:  # None: LongLoraConfig's default (the paper's r=8, alpha=16, dropout 0, embeddings and norms)
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    trainable_embeddings: bool | None = None
    trainable_norms: bool | None = None
    target_modules: list[str] | None = None  # None: found from the model


@dataclass
class DataSection:
    format: str  # a dataset format name: "text" (continued pre-training), "longalpaca", "passkey"...
    path: str | None = None  # local .json/.jsonl/.parquet/.txt file, or a hub dataset name
    split: str = "train"
    text_field: str = "text"
    too_long: str = setting("error", "What to do with a record longer than context.target.", choices=TOO_LONG_POLICIES)
    packing: bool = setting(False, "TRL's padding-free packing (cu_seq_lens), which S2-Attn handles.", "bool")
    max_records: int | None = setting(None, "Use at most this many records.", "positive int or None")
    num_samples: int = setting(1000, "How many samples a generated format (passkey) makes.", "positive int")
    min_length: int | None = setting(
        None, "Generated formats: the shortest sample (default context.original).", "positive int or None"
    )
    sample_by: str = setting(
        "document", "A .txt file is one document, or one per paragraph, or one per line.", choices=TEXT_UNITS
    )
    passkey_depth: str = setting(
        "uniform",
        "Generated passkeys: the key anywhere, or only where the answer sees it in one layer under S2-Attn's groups.",
        choices=PASSKEY_DEPTHS,
    )
    seed: int = 0


def recipe_spelling(config_key: str) -> str:
    """How a recipe writes a LongLoraConfig field (``s2_group_size`` -> ``s2.group_size``)."""
    return _CONFIG_TO_RECIPE.get(config_key, config_key)


@dataclass
class Recipe:
    model: ModelSection
    context: ContextSection
    data: DataSection
    s2: S2Settings = field(default_factory=S2Settings)
    lora: LoraSection = field(default_factory=LoraSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    training: dict[str, Any] = field(default_factory=dict)
    memory: MemorySection = field(default_factory=MemorySection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    source: str = "<dict>"

    @property
    def group_size(self) -> int:
        """The absolute G: fixed against context.target, so that every batch groups alike, whatever its length."""
        return self.s2.group_size_for(self.context.target)

    def longlora_kwargs(self) -> dict[str, Any]:
        """The LongLoraConfig keyword arguments this recipe gives (unset keys keep the config's defaults)."""
        sections = {"context": self.context, "lora": self.lora, "s2": self.s2}
        kwargs = {}
        for recipe_key, config_key in RECIPE_TO_CONFIG.items():
            section, key = recipe_key.split(".")
            value = getattr(sections[section], key)
            if value is not None:
                kwargs[config_key] = value
        kwargs[S2Settings.config_key("group_size")] = self.group_size
        return kwargs

    def longlora_config(self):
        """The adapter's LongLoraConfig, without a model (modules fall back to name patterns); validates the recipe's
        adapter settings with the config's own rules and names a bad one by its recipe key."""
        try:
            return LongLoraConfig(**self.longlora_kwargs())
        except InvalidSetting as error:
            raise ValueError(f"{self.source}: {error.message(recipe_spelling)}") from None

    def validate(self) -> None:
        where = self.source
        for name in ("model", "data"):
            validate_settings(getattr(self, name), key=lambda key, name=name: f"{where}: {name}.{key}")
        low, target = self.data.min_length, self.context.target
        if low is not None and isinstance(target, int) and low > target:
            raise ValueError(f"{where}: data.min_length must be at most context.target ({target}), got {low!r}")
        self.longlora_config()
        self.memory.validate(where)
        self.selection.validate(where)
        quantization_from_recipe(self.model.quantization, where)
        allowed = {f.name for f in dataclasses.fields(SFTConfig)}
        unknown = sorted(set(checkpointing_arguments(self.training)) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown training keys {unknown}; allowed are the fields of trl.SFTConfig")
        for reserved in ("max_length", "packing", "padding_free"):
            if reserved in self.training:
                raise ValueError(
                    f"{where}: training.{reserved} is set from the recipe (context.target, data.packing); remove it"
                )


SECTIONS = {
    "model": ModelSection,
    "context": ContextSection,
    "s2": S2Settings,
    "lora": LoraSection,
    "data": DataSection,
    "parallel": ParallelSection,
    "memory": MemorySection,
    "selection": SelectionSection,
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
    try:
        sections = {name: _section(cls, raw.get(name), name, source) for name, cls in SECTIONS.items()}
    except InvalidSetting as error:  # the s2 section checks its values as it is built
        raise ValueError(f"{source}: {error.message(recipe_spelling)}") from None
    recipe = Recipe(**sections, training=dict(training), source=source)
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
