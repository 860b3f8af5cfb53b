"""LongLoRA for the Hugging Face stack: S2-Attn as ``attn_implementation="s2_attention"``, LoRA+ as a PEFT config,
position interpolation, and save / reload / merge that lose nothing.

Importing the package registers the attention implementation with transformers.
"""

from .adapter import get_longlora_model, load_longlora, merge_longlora, read_longlora_settings, save_longlora
from .attention import (
    S2_ATTENTION,
    S2AttentionMask,
    S2Settings,
    check_model_supports_s2,
    configure_s2,
    register_s2_attention,
    s2_attention_forward,
    s2_settings,
)
from .config import LongLoraConfig, find_longlora_modules, format_trainable_report, trainable_parameter_report
from .hookspecs import hookimpl
from .ops import s2_attention
from .rope import extend_rope

__version__ = "0.1.0"

register_s2_attention()

__all__ = [
    "LongLoraConfig",
    "S2_ATTENTION",
    "S2AttentionMask",
    "S2Settings",
    "__version__",
    "check_model_supports_s2",
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
    "s2_attention_forward",
    "s2_settings",
    "save_longlora",
    "trainable_parameter_report",
]
