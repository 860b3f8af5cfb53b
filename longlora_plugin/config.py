"""``LongLoraConfig``: LoRA on the attention projections plus fully trainable embeddings and norms (LoRA+).

A ``peft.LoraConfig`` subclass, so ``get_peft_model`` and TRL's ``SFTTrainer(peft_config=...)`` take it as it is.
``LongLoraConfig.for_model(model)`` finds the modules from the model itself (through the plugin hooks); a config
built without a model falls back to name patterns that cover the built-in families.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from peft import LoraConfig

from .builtin_plugin import is_norm_module
from .plugins import get_plugin_manager
from .rope import ROPE_TYPES, check_rope_options
from .settings import InvalidSetting, S2Settings, setting, validate_settings

__all__ = [
    "LongLoraConfig",
    "LongLoraModules",
    "find_longlora_modules",
    "trainable_parameter_report",
    "format_trainable_report",
]

# Without a model: attention projections of the built-in families, as a regex over full module names...
FALLBACK_TARGET_MODULES = (
    r".*\.(self_attn|attention|attn)\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|query_key_value|dense|out_proj)"
)
# ...and embedding / norm names, matched by suffix as peft matches modules_to_save ("norm" covers every *norm).
FALLBACK_EMBEDDINGS = ("embed_tokens", "embed_in", "wte")
FALLBACK_NORMS = ("norm", "ln_1", "ln_f")

# A config built without a model asks peft to keep tied embeddings tied; on an untied model peft then says that no
# tied modules were found, which is the expected case there, not news.
warnings.filterwarnings(
    "ignore", message="You have requested `ensure_weight_tying`, but no tied modules were found", category=UserWarning
)


@dataclass(frozen=True)
class LongLoraModules:
    """Full module names, as in ``model.named_modules()``."""

    embeddings: tuple[str, ...]
    norms: tuple[str, ...]
    attention_projections: tuple[str, ...]


def find_longlora_modules(model: torch.nn.Module) -> LongLoraModules:
    """Ask the plugins (the built-in one detects generically) for the modules LongLoRA trains."""
    hook = get_plugin_manager().hook
    found = LongLoraModules(
        embeddings=tuple(hook.longlora_embedding_modules(model=model) or ()),
        norms=tuple(hook.longlora_norm_modules(model=model) or ()),
        attention_projections=tuple(hook.longlora_attention_projections(model=model) or ()),
    )
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if not found.attention_projections:
        raise ValueError(
            f"found no attention projections in model_type '{model_type}': no Linear children of an *Attention "
            "module. Pass target_modules yourself, or install a plugin that implements longlora_attention_projections."
        )
    return found


def _shortest_unique_names(chosen: tuple[str, ...], all_names: list[str], matches) -> list[str]:
    """Leaf names if ``matches(key, leaf)`` picks exactly ``chosen`` among all modules, else the full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in chosen})
    picked = {key for key in all_names if any(matches(key, leaf) for leaf in leaves)}
    return leaves if picked == set(chosen) else sorted(chosen)


def _target_match(key: str, leaf: str) -> bool:  # peft's target_modules list semantics
    return key == leaf or key.endswith("." + leaf)


def _save_match(key: str, leaf: str) -> bool:  # peft's modules_to_save semantics
    return key.endswith(leaf)


def _with_s2_settings(cls: type) -> type:
    """Give the class one ``s2_<name>`` field per S2Settings field, with its default and help text."""
    for f in fields(S2Settings):
        key = S2Settings.config_key(f.name)
        cls.__annotations__[key] = f.type
        setattr(cls, key, dataclasses.field(default=f.default, metadata={"help": f.metadata["help"]}))
    return cls


# Fields that define what an adapter learned: a resumed run must share them with the run that wrote the checkpoint.
_ADAPTER_DEFINING = (
    "r", "lora_alpha", "target_modules", "modules_to_save", "trainable_embeddings", "trainable_norms",
    "original_context", "target_context", "rope_type", "rope_rounding", "rope_options",
)


@dataclass
@_with_s2_settings
class LongLoraConfig(LoraConfig):
    """LoRA+ of the LongLoRA paper: LoRA (r=8, alpha=16, dropout 0) on the attention projections, embeddings and all
    norms fully trainable, with the context extension and S2-Attn settings (``s2_<name>`` for each field of
    ``S2Settings``) that belong to the adapter."""

    r: int = setting(8, "LoRA rank (paper: 8).", "positive int")
    lora_alpha: int = setting(16, "LoRA alpha (paper: 16).", "positive number")
    lora_dropout: float = setting(0.0, "LoRA dropout (paper: 0).", "probability")
    trainable_embeddings: bool = setting(
        True, "Train the input embeddings fully (paper: yes; without it LoRA fails to adapt).", "bool"
    )
    trainable_norms: bool = setting(
        True, "Train every normalization layer fully (paper: yes), q/k norms included.", "bool"
    )
    original_context: int | None = setting(
        None, "Context length the base model was trained for, in tokens.", "positive int or None"
    )
    target_context: int | None = setting(
        None, "Context length to extend to by position interpolation, in tokens.", "positive int or None"
    )
    rope_type: str = setting("linear", "RoPE scaling used for the extension.", choices=ROPE_TYPES)
    rope_rounding: str = setting(
        "exact", "'exact' factor target/original, or 'ceil' to round it up as the paper did.", choices=("exact", "ceil")
    )
    rope_options: dict | None = setting(
        None,
        "Further rope_parameters of rope_type, as transformers reads them: yarn's attention_factor, beta_fast, "
        "beta_slow, ...; llama3's low_freq_factor and high_freq_factor.",
    )

    def __post_init__(self) -> None:
        validate_settings(self, names=[f.name for f in fields(LongLoraConfig) if "check" in f.metadata])
        self._check_context()
        settings = S2Settings.from_config(self)  # raises on a bad s2_* field
        group, target = settings.group_size, self.target_context
        if group is not None and target is not None and group > target:
            raise InvalidSetting("s2_group_size", group, f"at most {{target_context}} ({target})")
        if self.target_modules is None:
            self.target_modules = FALLBACK_TARGET_MODULES
        if self.modules_to_save is None:
            self.modules_to_save = self._fallback_modules_to_save()
            # Without a model we cannot tell whether its input and output embeddings are tied; peft ties them where
            # they are, and does nothing where they are not.
            if self.trainable_embeddings:
                self.ensure_weight_tying = True
        super().__post_init__()

    def _check_context(self) -> None:
        original, target = self.original_context, self.target_context
        if (original is None) != (target is None):
            key, value = ("original_context", original) if target is None else ("target_context", target)
            other = "target_context" if target is None else "original_context"
            raise InvalidSetting(other, None, f"set together with {{{key}}} ({value})")
        if target is not None and target <= original:
            raise InvalidSetting("target_context", target, f"larger than {{original_context}} ({original})")
        if target is None and (self.rope_type != "linear" or self.rope_options):
            asked = "rope_options" if self.rope_options else "rope_type"
            raise InvalidSetting(
                "target_context", None, f"set for {{{asked}}} to have any effect ({asked} is given)"
            )
        check_rope_options(self.rope_type, self.rope_options)

    def _fallback_modules_to_save(self) -> list[str] | None:
        return [
            *(FALLBACK_EMBEDDINGS if self.trainable_embeddings else ()),
            *(FALLBACK_NORMS if self.trainable_norms else ()),
        ] or None

    @classmethod
    def resume_keys(cls) -> tuple[str, ...]:
        """The fields a resumed run must share with the run that wrote its checkpoint."""
        return (*_ADAPTER_DEFINING, *S2Settings.config_keys(portable_only=True))

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "LongLoraConfig":
        # peft maps peft_type "LORA" to a plain LoraConfig, dropping our fields; keep the class we were asked for.
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            warnings.warn(f"LongLoraConfig ignores keys this version does not know: {unknown}", stacklevel=2)
        return cls(**{key: value for key, value in kwargs.items() if key in names})

    @classmethod
    def for_model(cls, model: torch.nn.Module, **kwargs: Any) -> "LongLoraConfig":
        """A config whose target_modules / modules_to_save are the modules found in ``model``.

        Explicit ``target_modules`` or ``modules_to_save`` in kwargs win. Tied input/output embeddings stay tied.
        """
        modules = find_longlora_modules(model)
        all_names = [name for name, _ in model.named_modules() if name]
        trainable_embeddings = kwargs.get("trainable_embeddings", True)
        trainable_norms = kwargs.get("trainable_norms", True)
        if "target_modules" not in kwargs:
            kwargs["target_modules"] = _shortest_unique_names(modules.attention_projections, all_names, _target_match)
        if "modules_to_save" not in kwargs:
            to_save = (*(modules.embeddings if trainable_embeddings else ()), *(modules.norms if trainable_norms else ()))
            kwargs["modules_to_save"] = _shortest_unique_names(to_save, all_names, _save_match) if to_save else None
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        if tied and trainable_embeddings:
            kwargs.setdefault("ensure_weight_tying", True)
        kwargs.setdefault("task_type", "CAUSAL_LM")
        return cls(**kwargs)


def trainable_parameter_report(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Trainable parameters split into LoRA / embeddings / norms / other, with counts and % of all parameters."""
    counts = {"lora": 0, "embeddings": 0, "norms": 0, "other": 0}
    total = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied weights count once
            seen.add(id(param))
            total += param.numel()
            if not param.requires_grad:
                continue
            if "lora_" in f"{name}.{param_name}":
                counts["lora"] += param.numel()
            elif isinstance(module, torch.nn.Embedding):
                counts["embeddings"] += param.numel()
            elif is_norm_module(module):
                counts["norms"] += param.numel()
            else:
                counts["other"] += param.numel()
    trainable = sum(counts.values())
    report = {kind: {"count": n, "percent": 100.0 * n / total if total else 0.0} for kind, n in counts.items()}
    report["trainable"] = {"count": trainable, "percent": 100.0 * trainable / total if total else 0.0}
    report["all"] = {"count": total, "percent": 100.0}
    return report


def format_trainable_report(report: dict[str, dict[str, float]]) -> str:
    lines = [f"{'':12s}{'parameters':>14s}{'% of all':>10s}"]
    for kind in ("lora", "embeddings", "norms", "other", "trainable", "all"):
        lines.append(f"{kind:12s}{int(report[kind]['count']):>14,d}{report[kind]['percent']:>9.3f}%")
    return "\n".join(lines)
