"""LongLoRA for the Hugging Face stack: S2-Attn as ``attn_implementation="s2_attention"``.

Importing the package registers the attention implementation with transformers.
"""

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
from .ops import s2_attention

__version__ = "0.1.0"

register_s2_attention()

__all__ = [
    "S2_ATTENTION",
    "S2AttentionMask",
    "S2Settings",
    "__version__",
    "check_model_supports_s2",
    "configure_s2",
    "register_s2_attention",
    "s2_attention",
    "s2_attention_forward",
    "s2_settings",
]
