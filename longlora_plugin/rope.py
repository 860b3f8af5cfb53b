"""Position interpolation for transformers 5 ``rope_parameters``.

LongLoRA extends a model from its original context to a target one by scaling RoPE positions, linearly by
``factor = target / original`` in the paper (rounded up there: Llama-2 4k -> 32k is 8, 100k is 25).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch

from .settings import InvalidSetting

__all__ = [
    "ROPE_OPTIONS",
    "ROPE_TYPES",
    "check_rope_options",
    "extend_rope",
    "refresh_rotary_embeddings",
    "rope_parameters_for",
]

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
Rounding = Literal["exact", "ceil"]

# The keys transformers' own RoPE initialisers read for each type, beyond factor and the original length.
ROPE_OPTIONS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "dynamic": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
}


def check_rope_options(rope_type: str, options: dict | None) -> dict:
    """``options`` as a plain dict, or an InvalidSetting naming the key or value that ``rope_type`` does not take."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidSetting("rope_options", options, f"a mapping of {rope_type!r} parameters")
    allowed = ROPE_OPTIONS.get(rope_type, ())
    for key, value in options.items():
        if key not in allowed:
            raise InvalidSetting(
                "rope_options", options, f"{rope_type!r} parameters ({list(allowed) or 'none'}); {key!r} is not one"
            )
        if key == "truncate":
            if not isinstance(value, bool):
                raise InvalidSetting(f"rope_options[{key!r}]", value, "true or false")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidSetting(f"rope_options[{key!r}]", value, "a positive number")
    return dict(options)


def _nested_layer_types(rope_parameters: dict) -> list[str]:
    return [key for key, value in rope_parameters.items() if isinstance(value, dict)]


def _scaled(params: dict, factor: float, rope_type: str, original: int, options: dict) -> dict:
    """One rope-parameter dict scaled by factor, composed with a linear factor it already has."""
    previous_type = params.get("rope_type", "default")
    if previous_type not in ("default", "linear", rope_type):
        raise ValueError(
            f"cannot extend a model whose rope_type is {previous_type!r} with {rope_type!r} scaling; "
            f"allowed from 'default', 'linear' or {rope_type!r}"
        )
    result = dict(params)  # keeps rope_theta, partial_rotary_factor and anything model-specific
    result["rope_type"] = rope_type
    result["factor"] = float(params.get("factor", 1.0)) * factor if previous_type != "default" else float(factor)
    if rope_type in ("yarn", "llama3"):
        result.setdefault("original_max_position_embeddings", original)
    if rope_type == "llama3":
        result.setdefault("low_freq_factor", 1.0)
        result.setdefault("high_freq_factor", 4.0)
    result.update(options)
    return result


def rope_parameters_for(
    config: Any,
    target_length: int,
    *,
    original_length: int | None = None,
    rope_type: str = "linear",
    rounding: Rounding = "exact",
    rope_options: dict | None = None,
) -> tuple[dict, float]:
    """The rope_parameters that extend ``config`` to ``target_length``, and the factor applied (not composed).

    ``rope_options`` are further parameters of ``rope_type`` as transformers reads them, e.g. yarn's
    ``attention_factor``, ``beta_fast`` and ``beta_slow`` or llama3's ``low_freq_factor`` and ``high_freq_factor``.
    """
    params = getattr(config, "rope_parameters", None)
    model_type = getattr(config, "model_type", type(config).__name__)
    if not params:
        raise ValueError(
            f"position interpolation needs RoPE, but model_type '{model_type}' has no rope_parameters "
            "(it uses learned or no position embeddings)"
        )
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rounding not in ("exact", "ceil"):
        raise ValueError(f"rounding must be 'exact' or 'ceil', got {rounding!r}")
    options = check_rope_options(rope_type, rope_options)
    original = original_length if original_length is not None else getattr(config, "max_position_embeddings", None)
    if not isinstance(original, int) or original < 1:
        raise ValueError(f"original_length must be a positive int (or the config's max_position_embeddings), got {original!r}")
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length <= original:
        raise ValueError(
            f"target_length must be an int above the original context of {original} tokens, got {target_length!r}"
        )
    factor = target_length / original
    if rounding == "ceil":
        factor = float(math.ceil(factor))
    nested = _nested_layer_types(params)
    if nested:
        new = {key: (_scaled(value, factor, rope_type, original, options) if key in nested else value) for key, value in params.items()}
    else:
        new = _scaled(params, factor, rope_type, original, options)
    return new, factor


def refresh_rotary_embeddings(model: torch.nn.Module) -> int:
    """Rebuild every rotary-embedding module from the model's (changed) config. Returns how many were rebuilt.

    transformers computes ``inv_freq`` when the module is built; changing ``config.rope_parameters`` afterwards does
    nothing to a live model until its rotary modules are rebuilt.
    """
    rebuilt = 0
    for name, module in list(model.named_modules()):
        if not (type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq")):
            continue
        fresh = type(module)(config=module.config).to(module.inv_freq.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
        rebuilt += 1
    return rebuilt


def extend_rope(
    model_or_config: Any,
    target_length: int,
    *,
    original_length: int | None = None,
    rope_type: str = "linear",
    rounding: Rounding = "exact",
    rope_options: dict | None = None,
) -> float:
    """Extend a model (or a config) from its original context to ``target_length`` by RoPE position interpolation.

    Sets ``rope_parameters`` to ``rope_type`` scaling with factor ``target / original`` (``rounding="ceil"`` rounds
    the factor up, as the paper did), composing with a linear factor already there, keeping ``rope_theta``, plus any
    ``rope_options`` of that type; sets ``max_position_embeddings`` to the target. A model's rotary modules are
    rebuilt. Returns the factor applied.
    """
    config = getattr(model_or_config, "config", model_or_config)
    new_params, factor = rope_parameters_for(
        config, target_length, original_length=original_length, rope_type=rope_type, rounding=rounding,
        rope_options=rope_options,
    )
    # Assign a new dict: transformers 5 keeps rope_theta inside rope_parameters (setting rope_scaling loses it).
    config.rope_parameters = copy.deepcopy(new_params)
    config.max_position_embeddings = target_length
    if isinstance(model_or_config, torch.nn.Module):
        for module in model_or_config.modules():
            sub_config = getattr(module, "config", None)
            if sub_config is not None and sub_config is not config and getattr(sub_config, "rope_parameters", None):
                sub_config.rope_parameters = copy.deepcopy(new_params)
                sub_config.max_position_embeddings = target_length
        refresh_rotary_embeddings(model_or_config)
    return factor
