"""Loading a model for evaluation (base, base + adapter, or merged), always with full attention."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM

from ..adapter import load_longlora
from ..data import load_tokenizer

__all__ = ["load_for_eval"]


def load_for_eval(model_name: str, *, adapter: str | None = None, tokenizer: str | None = None) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype="auto")
    if adapter is not None:
        model = load_longlora(model, adapter)
    model.eval()  # S2-Attn is for training; evaluation runs full attention
    source = tokenizer or adapter or model_name
    return model, load_tokenizer(source)
