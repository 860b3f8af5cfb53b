"""Load-time check of a forced S2 kernel backend ("flash" or "varlen") against a model config.

What can be known before any tensor exists: whether the kernel imports in this environment, and what the model's
attention layers need from it (GQA, head_dim, softcap, dropout, sliding window, a non-default softmax scale).
Device and dtype are checked per call, in ``longlora_plugin.ops``.
"""

from __future__ import annotations

from typing import Any

from .ops import layer_gaps

__all__ = ["forced_backend_gaps"]


def forced_backend_gaps(config: Any, backend: str, logit_scale: float = 1.0) -> list[str]:
    """What the forced kernel ``backend`` lacks for the attention layers of ``config``; [] for "auto"/"sdpa"."""
    if backend not in ("flash", "varlen"):
        return []
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        return layer_gaps(backend, num_heads=1, num_kv_heads=1, head_dim=8)[:1]  # only the import can be checked
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    scaling = head_dim**-0.5
    pre_attn_scalar = getattr(config, "query_pre_attn_scalar", None)  # gemma2/gemma3
    if pre_attn_scalar:
        scaling = pre_attn_scalar**-0.5
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    return layer_gaps(
        backend,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        scaling=scaling * logit_scale,
        dropout=float(dropout),
        softcap=getattr(config, "attn_logit_softcapping", None),
        sliding_window=getattr(config, "sliding_window", None),
    )
