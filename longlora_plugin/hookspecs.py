"""The hooks through which plugins tell LongLoRA about model families and data formats.

Each hook is documented in docs/plugin_hooks.md (a test checks it). Implement one with::

    from longlora_plugin import hookimpl

    @hookimpl
    def longlora_attention_projections(model):
        ...

and expose the module under the ``longlora_plugin`` entry-point group. Plugins registered later are asked first,
so a third-party plugin overrides the built-in defaults for the models it recognises and returns None for others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

PROJECT = "longlora_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "DatasetFormat", "FamilyInfo", "S2Support", "hookimpl", "hookspec"]


@dataclass(frozen=True)
class S2Support:
    """The answer of ``longlora_s2_support``."""

    supported: bool
    reason: str = ""
    caveats: tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilyInfo:
    """One entry of ``longlora_model_families``."""

    model_type: str
    s2_attention: str  # "supported" or "refused at load"
    notes: str = ""


@dataclass(frozen=True)
class DatasetFormat:
    """A data format a recipe can name. ``prepare(recipe, tokenizer)`` returns the dataset SFTTrainer trains on."""

    name: str
    required_fields: tuple[str, ...]
    prepare: Callable[[Any, Any], Any]
    description: str = ""
    optional_fields: tuple[str, ...] = field(default_factory=tuple)


@hookspec(firstresult=True)
def longlora_embedding_modules(model):
    """Names (as in ``model.named_modules()``) of the input embedding modules LongLoRA trains fully.

    Return None to leave the decision to other plugins.
    """


@hookspec(firstresult=True)
def longlora_norm_modules(model):
    """Names of every normalization module LongLoRA trains fully (RMSNorm/LayerNorm, q/k norms included).

    Return None to leave the decision to other plugins.
    """


@hookspec(firstresult=True)
def longlora_attention_projections(model):
    """Names of the attention projection Linear modules that receive LoRA (e.g. q/k/v/o_proj, query_key_value).

    Return None to leave the decision to other plugins.
    """


@hookspec(firstresult=True)
def longlora_s2_support(model):
    """Whether ``model`` can train with S2-Attn: a ``longlora_plugin.hookspecs.S2Support``, or None if unknown.

    ``S2Support(supported=False, reason=...)`` makes loading with ``attn_implementation="s2_attention"`` fail with
    that reason; ``caveats`` are shown by ``longlora info``.
    """


@hookspec
def longlora_model_families():
    """A list of ``longlora_plugin.hookspecs.FamilyInfo`` this plugin knows, for ``longlora info`` and the docs."""


@hookspec
def longlora_dataset_formats():
    """A list of ``longlora_plugin.hookspecs.DatasetFormat`` that recipes can name in ``data.format``."""


@hookspec(firstresult=True)
def longlora_tiled_mlp(model, shards):
    """Make the model's MLP modules run on ``shards`` slices of the sequence (the recipe's ``memory.tiled_mlp``).

    Return the names of the modules tiled, or None when this plugin does not know the family.
    ``longlora_plugin.memory.tile_mlp_forward(module, shards)`` tiles one token-wise module with DeepSpeed's
    ``TiledMLP``.
    """
