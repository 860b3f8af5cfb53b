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
from typing import Any, Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask
from transformers.utils import logging

from .ops import TokenLayout, s2_attention, token_layout
from .ops.shifted_sparse import _choose_backend
from .sequence_parallel import check_sequence_parallel_padding, ulysses_heads
from .settings import S2Settings

__all__ = [
    "S2_ATTENTION",
    "S2AttentionMask",
    "check_model_supports_s2",
    "configure_s2",
    "register_s2_attention",
    "s2_attention_forward",
]

S2_ATTENTION = "s2_attention"
# Under transformers' logger tree, so TRANSFORMERS_VERBOSITY=info shows that training took the S2-Attn path.
logger = logging.get_logger(f"transformers.{__name__}")
_announced: list[bool] = []  # one INFO line per process, on the first S2-Attn training forward


def configure_s2(model_or_config: Any, **settings: Any) -> S2Settings:
    """Set S2-Attn settings (fields of ``S2Settings``: ``group_size=...``, ``shift=...``) on a model's config or on a
    config, validating them first; a refused change leaves the config as it was. Returns the settings in force."""
    config = getattr(model_or_config, "config", model_or_config)
    updated = S2Settings.from_config(config).updated(**settings)
    updated.apply_to(config)
    return updated


class S2AttentionMask:
    """What the model's mask builder hands to every layer under ``s2_attention``, once per forward.

    ``padding_mask`` is (B, S) bool, True for real tokens, or None without padding. ``settings`` are the S2-Attn
    settings, resolved once for all layers from the config the mask builder passes (None if it passed none);
    ``layout(...)`` finds the batch's documents once for all layers.
    ``full(kind)`` builds, once, the mask transformers' own ``kind`` ("sdpa" or "eager") would have received.
    """

    def __init__(
        self, padding_mask: torch.Tensor | None, mask_kwargs: dict[str, Any], settings: S2Settings | None = None
    ):
        self.padding_mask = padding_mask
        self.settings = settings
        self._mask_kwargs = mask_kwargs
        self._full: dict[str, torch.Tensor | None] = {}
        self._layout: tuple[tuple, TokenLayout] | None = None

    def full(self, kind: str) -> torch.Tensor | None:
        if kind not in self._full:
            build = sdpa_mask if kind == "sdpa" else eager_mask
            self._full[kind] = build(**self._mask_kwargs)
        return self._full[kind]

    def layout(
        self, batch: int, seq_len: int, position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, device
    ) -> TokenLayout:
        """The documents of the batch; every layer of one forward passes the same tensors, so this runs once."""
        key = (batch, seq_len, id(position_ids), id(cu_seqlens), str(device))
        if self._layout is None or self._layout[0] != key:
            layout = token_layout(
                batch, seq_len, padding_mask=self.padding_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
                device=device,
            )
            self._layout = (key, layout)
        return self._layout[1]

    def __repr__(self) -> str:
        shape = None if self.padding_mask is None else tuple(self.padding_mask.shape)
        return f"S2AttentionMask(padding_mask={shape}, settings={self.settings})"


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
    check_sequence_parallel_padding(attention_mask)
    padding = flash_attention_mask(batch_size, q_length, kv_length, attention_mask=attention_mask)
    config = kwargs.get("config")
    return S2AttentionMask(padding, mask_kwargs, None if config is None else S2Settings.from_config(config))


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
    """A bare call's (B, S) padding mask; anything but a 2-D mask is refused rather than ignored."""
    if attention_mask is None:
        return None
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
    batch, _, seq_len, _ = query.shape
    position_ids = kwargs.get("position_ids")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and not torch.equal(cu_q, cu_k):
        raise ValueError("s2_attention needs cu_seq_lens_q == cu_seq_lens_k (self-attention over packed documents)")
    if isinstance(attention_mask, S2AttentionMask):
        settings = attention_mask.settings or S2Settings.from_config(module.config)
        layout = attention_mask.layout(batch, seq_len, position_ids, cu_q, query.device)
    else:  # no mask from our mask function (a bare call, or a sequence-parallel wrapper): resolve here
        settings = S2Settings.from_config(module.config)
        layout = token_layout(
            batch, seq_len, padding_mask=_padding_mask(attention_mask), position_ids=position_ids, cu_seqlens=cu_q,
            device=query.device,
        )
    if settings.logit_scale != 1.0:
        scaling = (query.shape[-1] ** -0.5 if scaling is None else scaling) * settings.logit_scale
    head_offset, total_heads = ulysses_heads(module, query, kwargs)  # a rank's head block under Ulysses
    group_size = settings.group_size_for(seq_len)
    if not _announced:
        _announced.append(True)
        backend = _choose_backend(
            settings.backend, query, key, rows_are_documents=layout.rows_are_documents, scaling=scaling,
            dropout=dropout, softcap=kwargs.get("softcap"), sliding_window=kwargs.get("sliding_window"),
        )
        logger.info(f"s2_attention: training with S2-Attn, G={group_size}, backend={backend}")
    out = s2_attention(
        query,
        key,
        value,
        group_size=group_size,
        shift=settings.shift,
        layout=layout,
        scaling=scaling,
        dropout=dropout,
        softcap=kwargs.get("softcap"),
        sliding_window=kwargs.get("sliding_window"),
        backend=settings.backend,  # type: ignore[arg-type]
        head_offset=head_offset,
        total_heads=total_heads,
    )
    return out, None


def check_model_supports_s2(model: PreTrainedModel) -> None:
    """Raise ValueError, naming the model type, when a model cannot train with S2-Attn (asks the plugins)."""
    from .kernel_check import forced_backend_gaps
    from .plugins import get_plugin_manager  # here, not at the top: registration at import stays light

    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    support = get_plugin_manager().hook.longlora_s2_support(model=model)
    if support is not None and not support.supported:
        raise ValueError(f"s2_attention is not available for model_type '{model_type}' ({type(model).__name__}): {support.reason}")
    settings = S2Settings.from_config(config)  # raises on a bad setting
    gaps = forced_backend_gaps(config, settings.backend, settings.logit_scale)
    if gaps:
        raise ValueError(f"s2_backend={settings.backend!r} cannot serve model_type '{model_type}'; it needs " + "; ".join(gaps))
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
