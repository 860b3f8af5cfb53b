"""LongLoRA for the Hugging Face stack: S2-Attn as ``attn_implementation="s2_attention"``, LoRA+ as a PEFT config,
position interpolation, and save / reload / merge that lose nothing.

Importing the package registers the attention implementation with transformers. The peft-based parts (config,
adapter life cycle) load on first use, so that registering stays light.
"""

from importlib import import_module
from typing import Any

from .hf_attention import S2_ATTENTION, configure_s2, register_s2_attention
from .hookspecs import hookimpl
from .ops import s2_attention
from .rope import extend_rope
from .settings import S2Settings

__version__ = "0.1.0"

register_s2_attention()

_LAZY = {
    "LongLoraConfig": "config",
    "find_longlora_modules": "config",
    "format_trainable_report": "config",
    "trainable_parameter_report": "config",
    "get_longlora_model": "adapter",
    "load_longlora": "adapter",
    "merge_longlora": "adapter",
    "read_longlora_settings": "adapter",
    "save_longlora": "adapter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LongLoraConfig",
    "S2_ATTENTION",
    "S2Settings",
    "__version__",
    "configure_s2",
    "extend_rope",
    "find_longlora_modules",
    "format_trainable_report",
    "get_longlora_model",
    "hookimpl",
    "load_longlora",
    "merge_longlora",
    "read_longlora_settings",
    "register_s2_attention",
    "s2_attention",
    "save_longlora",
    "trainable_parameter_report",
]
