"""``attn_implementation="s2_attention"``: S2-Attn registered with transformers' attention interface.

In training (``module.training`` and a query as long as its keys) layers attend with shifted sparse attention.
Otherwise (``model.eval()``, or decoding with a KV cache) they run the full causal attention transformers itself
would run for that model: SDPA, or the model's eager attention where SDPA cannot serve (e.g. gemma2's softcap).

The mask function registered under the same name returns an :class:`S2AttentionMask`: the cheap 2-D padding
mask for S2-Attn, plus what is needed to build, only when full attention asks for it, the exact mask transformers
would have built.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask
from transformers.utils import logging

from .ops import resolve_group_size, s2_attention
from .ops.shifted_sparse import _choose_backend

__all__ = [
    "S2_ATTENTION",
    "S2Settings",
    "S2AttentionMask",
    "configure_s2",
    "register_s2_attention",
    "s2_attention_forward",
    "s2_attention_mask",
    "s2_settings",
    "check_model_supports_s2",
]

S2_ATTENTION = "s2_attention"
_BACKENDS = ("auto", "sdpa", "flash")
# Under transformers' logger tree, so TRANSFORMERS_VERBOSITY=info shows that training took the S2-Attn path.
logger = logging.get_logger(f"transformers.{__name__}")
_announced: list[bool] = []  # one INFO line per process, on the first S2-Attn training forward


@dataclass(frozen=True)
class S2Settings:
    """S2-Attn settings, read from a model config's ``s2_*`` attributes.

    group_size: absolute G; when None, G = round(group_size_ratio * L) for a batch of length L.
    group_size_ratio: in (0, 1], 0.25 by default (the paper's N/4).
    shift: shift half of the heads by G // 2 (False: plain short attention, the paper's ablation).
    backend: "auto" (flash-attn varlen on CUDA when installed, else SDPA), "sdpa" or "flash".
    logit_scale: multiplies the attention logits inside the groups, in training only. 1.0 is the paper's S2-Attn.
        Below 1 the model learns to attend more sharply than a group of G keys needs, so that full attention at
        inference, over N / G times as many keys, stays as sharp (see docs/passkey-demo.md).
    """

    group_size: int | None = None
    group_size_ratio: float = 0.25
    shift: bool = True
    backend: str = "auto"
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        resolve_group_size(1, self.group_size, self.group_size_ratio)  # raises on a bad size or ratio
        if not isinstance(self.shift, bool):
            raise ValueError(f"s2_shift must be True or False, got {self.shift!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"s2_backend must be one of {_BACKENDS}, got {self.backend!r}")
        scale = self.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ValueError(f"s2_logit_scale must be a positive finite number (1.0: the paper's S2-Attn), got {scale!r}")

    def group_size_for(self, seq_len: int) -> int:
        return resolve_group_size(seq_len, self.group_size, self.group_size_ratio)


def s2_settings(config: Any) -> S2Settings:
    """Validated S2-Attn settings of a model config (defaults where unset)."""
    ratio = getattr(config, "s2_group_size_ratio", None)
    return S2Settings(
        group_size=getattr(config, "s2_group_size", None),
        group_size_ratio=0.25 if ratio is None else ratio,
        shift=getattr(config, "s2_shift", True),
        backend=getattr(config, "s2_backend", None) or "auto",
        logit_scale=getattr(config, "s2_logit_scale", 1.0),
    )


def configure_s2(
    model_or_config: Any,
    *,
    group_size: int | None = None,
    group_size_ratio: float | None = None,
    shift: bool | None = None,
    backend: str | None = None,
    logit_scale: float | None = None,
) -> S2Settings:
    """Set S2-Attn settings on a model (its config) or a config, validating them first. Returns the result."""
    config = getattr(model_or_config, "config", model_or_config)
    current = s2_settings(config)
    settings = S2Settings(
        group_size=group_size if group_size is not None else current.group_size,
        group_size_ratio=group_size_ratio if group_size_ratio is not None else current.group_size_ratio,
        shift=shift if shift is not None else current.shift,
        backend=backend if backend is not None else current.backend,
        logit_scale=logit_scale if logit_scale is not None else current.logit_scale,
    )
    config.s2_group_size = settings.group_size
    config.s2_group_size_ratio = settings.group_size_ratio
    config.s2_shift = settings.shift
    config.s2_backend = settings.backend
    config.s2_logit_scale = settings.logit_scale
    return settings


class S2AttentionMask:
    """What the model's mask builder hands to every layer under ``s2_attention``.

    ``padding_mask`` is (B, S) bool, True for real tokens, or None without padding: all S2-Attn needs.
    ``full(kind)`` builds, once, the mask transformers' own ``kind`` ("sdpa" or "eager") would have received.
    """

    def __init__(self, padding_mask: torch.Tensor | None, mask_kwargs: dict[str, Any]):
        self.padding_mask = padding_mask
        self._mask_kwargs = mask_kwargs
        self._full: dict[str, torch.Tensor | None] = {}

    def full(self, kind: str) -> torch.Tensor | None:
        if kind not in self._full:
            build = sdpa_mask if kind == "sdpa" else eager_mask
            self._full[kind] = build(**self._mask_kwargs)
        return self._full[kind]

    def __repr__(self) -> str:
        shape = None if self.padding_mask is None else tuple(self.padding_mask.shape)
        return f"S2AttentionMask(padding_mask={shape})"


def s2_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> S2AttentionMask:
    """The mask function registered for ``s2_attention``: O(S) work now, O(S^2) only if full attention needs it."""
    mask_kwargs = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )
    padding = flash_attention_mask(batch_size, q_length, kv_length, attention_mask=attention_mask)
    return S2AttentionMask(padding, mask_kwargs)


@functools.lru_cache(maxsize=None)
def _module_supports_sdpa(modeling_module: str) -> bool:
    """Whether the PreTrainedModel classes defined next to an attention layer allow SDPA."""
    module = sys.modules.get(modeling_module)
    if module is None:
        return True
    return all(
        cls._supports_sdpa
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.__module__ == modeling_module
    )


def _full_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exactly what transformers runs for this layer by default: SDPA, or the model's eager attention."""
    modeling_module = type(module).__module__
    use_sdpa = kwargs.get("softcap") is None and _module_supports_sdpa(modeling_module)
    kind = "sdpa" if use_sdpa else "eager"
    if isinstance(attention_mask, S2AttentionMask):
        attention_mask = attention_mask.full(kind)
    if use_sdpa:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager: Callable | None = getattr(sys.modules.get(modeling_module), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"s2_attention cannot run full attention for {type(module).__name__}: SDPA does not serve it and "
            f"{modeling_module} defines no eager_attention_forward"
        )
    return eager(module, query, key, value, attention_mask, **kwargs)


def _padding_mask(attention_mask: Any) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if isinstance(attention_mask, S2AttentionMask):
        return attention_mask.padding_mask
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        return attention_mask.bool()
    shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
    raise ValueError(
        f"s2_attention trains from a 2-D padding mask (batch, seq_len) or packed position_ids/cu_seq_lens; it got "
        f"an attention mask of shape {shape}. Pass a 2-D attention_mask instead of a custom 4-D mask."
    )


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``s2_attention``. query (B, H, S, D), key/value (B, H_kv, S_k, D)."""
    if not module.training or query.shape[2] != key.shape[2]:
        return _full_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if not getattr(module, "is_causal", True):
        raise ValueError(f"s2_attention is for causal language models; {type(module).__name__} is not causal")
    settings = s2_settings(module.config)
    if settings.logit_scale != 1.0:
        scaling = (query.shape[-1] ** -0.5 if scaling is None else scaling) * settings.logit_scale
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and not torch.equal(cu_q, cu_k):
        raise ValueError("s2_attention needs cu_seq_lens_q == cu_seq_lens_k (self-attention over packed documents)")
    group_size = settings.group_size_for(query.shape[2])
    if not _announced:
        _announced.append(True)
        backend = _choose_backend(settings.backend, query)
        logger.info(f"s2_attention: training with S2-Attn, G={group_size}, backend={backend}")
    out = s2_attention(
        query,
        key,
        value,
        group_size=group_size,
        shift=settings.shift,
        padding_mask=_padding_mask(attention_mask),
        position_ids=kwargs.get("position_ids"),
        cu_seqlens=cu_q,
        scaling=scaling,
        dropout=dropout,
        softcap=kwargs.get("softcap"),
        sliding_window=kwargs.get("sliding_window"),
        backend=settings.backend,  # type: ignore[arg-type]
    )
    return out, None


def check_model_supports_s2(model: PreTrainedModel) -> None:
    """Raise ValueError, naming the model type, when a model cannot train with S2-Attn (asks the plugins)."""
    from .plugins import get_plugin_manager

    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    support = get_plugin_manager().hook.longlora_s2_support(model=model)
    if support is not None and not support.supported:
        raise ValueError(f"s2_attention is not available for model_type '{model_type}' ({type(model).__name__}): {support.reason}")
    s2_settings(config)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        raise ValueError(
            f"s2_attention needs num_attention_heads ({heads}) to be a multiple of num_key_value_heads ({kv_heads}) "
            f"for model_type '{model_type}'"
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(
            f"s2_attention needs sliding_window to be a positive int or None for model_type '{model_type}', "
            f"got {window!r}"
        )


_original_get_correct_attn_implementation = PreTrainedModel.get_correct_attn_implementation


def _get_correct_attn_implementation(self, requested_attention=None, is_init_check=False):
    if requested_attention == S2_ATTENTION:
        check_model_supports_s2(self)
    return _original_get_correct_attn_implementation(self, requested_attention, is_init_check)


def register_s2_attention() -> None:
    """Register ``s2_attention`` (attention and mask functions) and its load-time model check. Idempotent."""
    AttentionInterface.register(S2_ATTENTION, s2_attention_forward)
    AttentionMaskInterface.register(S2_ATTENTION, s2_attention_mask)
    # transformers has no hook for custom names at load time; this wrapper lets unsupported models fail there.
    PreTrainedModel.get_correct_attn_implementation = _get_correct_attn_implementation
