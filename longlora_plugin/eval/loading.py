"""Loading a model for evaluation (base, base + adapter, or merged), always with full attention."""

from __future__ import annotations

from typing import Any

__all__ = ["load_for_eval", "passkey_lengths"]


def passkey_lengths(minimum: int, maximum: int, interval: int) -> list[int]:
    if minimum < 1 or maximum < minimum or interval < 1:
        raise ValueError(f"need 1 <= min-length <= max-length and interval >= 1, got {minimum}, {maximum}, {interval}")
    lengths = list(range(minimum, maximum + 1, interval))
    return lengths if lengths[-1] == maximum else [*lengths, maximum]


def load_for_eval(model_name: str, *, adapter: str | None = None, tokenizer: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from ..data import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_name, dtype="auto")
    if adapter is not None:
        from ..adapter import load_longlora

        model = load_longlora(model, adapter)
    model.eval()  # S2-Attn is for training; evaluation runs full attention
    source = tokenizer or adapter or model_name
    return model, load_tokenizer(source)
