"""``LongLoraConfig``: LoRA on the attention projections plus fully trainable embeddings and norms (LoRA+).

A ``peft.LoraConfig`` subclass, so ``get_peft_model`` and TRL's ``SFTTrainer(peft_config=...)`` take it as it is.
``LongLoraConfig.for_model(model)`` finds the modules from the model itself (through the plugin hooks); a config
built without a model falls back to name patterns that cover the built-in families.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from peft import LoraConfig

from .hf_attention import S2Settings
from .builtin_plugin import is_norm_module
from .plugins import get_plugin_manager
from .rope import ROPE_TYPES, check_rope_options

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


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


@dataclass
class LongLoraConfig(LoraConfig):
    """LoRA+ of the LongLoRA paper: LoRA (r=8, alpha=16, dropout 0) on the attention projections, embeddings and all
    norms fully trainable, with the context extension and S2-Attn settings that belong to the adapter."""

    r: int = field(default=8, metadata={"help": "LoRA rank (paper: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (paper: 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (paper: 0)."})
    trainable_embeddings: bool = field(
        default=True, metadata={"help": "Train the input embeddings fully (paper: yes; without it LoRA fails to adapt)."}
    )
    trainable_norms: bool = field(
        default=True, metadata={"help": "Train every normalization layer fully (paper: yes), q/k norms included."}
    )
    original_context: int | None = field(
        default=None, metadata={"help": "Context length the base model was trained for, in tokens."}
    )
    target_context: int | None = field(
        default=None, metadata={"help": "Context length to extend to by position interpolation, in tokens."}
    )
    rope_type: str = field(
        default="linear", metadata={"help": f"RoPE scaling used for the extension, one of {ROPE_TYPES}."}
    )
    rope_rounding: str = field(
        default="exact", metadata={"help": "'exact' factor target/original, or 'ceil' to round it up as the paper did."}
    )
    rope_options: dict | None = field(
        default=None,
        metadata={"help": "Further rope_parameters of rope_type, as transformers reads them: yarn's attention_factor, "
                          "beta_fast, beta_slow, ...; llama3's low_freq_factor and high_freq_factor."},
    )
    s2_group_size: int | None = field(
        default=None, metadata={"help": "Absolute S2-Attn group size G; None uses s2_group_size_ratio."}
    )
    s2_group_size_ratio: float = field(
        default=0.25, metadata={"help": "G as a fraction of the batch length when s2_group_size is None (paper: 1/4)."}
    )
    s2_shift: bool = field(default=True, metadata={"help": "Shift half of the heads by G/2 (False: ablation)."})
    s2_logit_scale: float = field(
        default=1.0,
        metadata={"help": "Attention logits x this inside S2 groups in training (1.0: the paper; < 1 trains sharper "
                          "attention for full attention over N / G times more keys at inference)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the LoRA rank) must be a positive int, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for name in ("trainable_embeddings", "trainable_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _positive_int_or_none("original_context", self.original_context)
        _positive_int_or_none("target_context", self.target_context)
        if (self.original_context is None) != (self.target_context is None):
            raise ValueError(
                "original_context and target_context go together: got "
                f"original_context={self.original_context!r}, target_context={self.target_context!r}"
            )
        if self.target_context is not None and self.target_context <= self.original_context:
            raise ValueError(
                f"target_context ({self.target_context}) must be larger than original_context ({self.original_context})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.rope_rounding not in ("exact", "ceil"):
            raise ValueError(f"rope_rounding must be 'exact' or 'ceil', got {self.rope_rounding!r}")
        check_rope_options(self.rope_type, self.rope_options)
        self.s2_settings()  # validates the S2-Attn fields
        group, target = self.s2_group_size, self.target_context
        if group is not None and target is not None and group > target:
            raise ValueError(f"s2_group_size ({group}) must be at most target_context ({target})")
        if self.target_modules is None:
            self.target_modules = FALLBACK_TARGET_MODULES
        if self.modules_to_save is None:
            self.modules_to_save = self._fallback_modules_to_save()
        super().__post_init__()

    def _fallback_modules_to_save(self) -> list[str] | None:
        return [
            *(FALLBACK_EMBEDDINGS if self.trainable_embeddings else ()),
            *(FALLBACK_NORMS if self.trainable_norms else ()),
        ] or None

    def uses_fallback_modules_to_save(self) -> bool:
        """True when modules_to_save are the name patterns of a config built without a model."""
        return self.modules_to_save is not None and list(self.modules_to_save) == self._fallback_modules_to_save()

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "LongLoraConfig":
        # peft maps peft_type "LORA" to a plain LoraConfig, dropping our fields; keep the class we were asked for.
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            warnings.warn(f"LongLoraConfig ignores keys this version does not know: {unknown}", stacklevel=2)
        return cls(**{key: value for key, value in kwargs.items() if key in names})

    def s2_settings(self) -> S2Settings:
        return S2Settings(
            group_size=self.s2_group_size,
            group_size_ratio=self.s2_group_size_ratio,
            shift=self.s2_shift,
            logit_scale=self.s2_logit_scale,
        )

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
