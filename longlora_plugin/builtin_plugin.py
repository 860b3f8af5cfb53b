"""The built-in default plugin for model families: finds embeddings, norms and attention projections in any transformers model.

Detection looks at the model's modules, not at one family's names: the input embedding is
``model.get_input_embeddings()``; norms are modules whose class is a LayerNorm/GroupNorm or whose class name ends
in "Norm" (LlamaRMSNorm, Qwen3RMSNorm's q_norm/k_norm...); attention projections are the Linear children of modules
whose class name ends in "Attention".
"""

from __future__ import annotations

import torch

from .hookspecs import FamilyInfo, S2Support, hookimpl

__all__ = [
    "BUILTIN_FAMILIES",
    "BuiltinFamilies",
    "find_attention_projections",
    "find_embedding_modules",
    "find_mlp_modules",
    "find_norm_modules",
    "is_norm_module",
]


def _names_of(model: torch.nn.Module, predicate) -> list[str]:
    return [name for name, module in model.named_modules() if name and predicate(module)]


def find_embedding_modules(model: torch.nn.Module) -> list[str]:
    embeddings = model.get_input_embeddings()
    return [name for name, module in model.named_modules() if module is embeddings][:1]


def is_norm_module(module: torch.nn.Module) -> bool:
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)):
        return True
    name = type(module).__name__
    return name.endswith("Norm") and any(p.ndim == 1 for p in module.parameters(recurse=False))


def find_norm_modules(model: torch.nn.Module) -> list[str]:
    return _names_of(model, is_norm_module)


def find_attention_projections(model: torch.nn.Module) -> list[str]:
    projections = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention"):
            projections += [
                f"{name}.{child}" if name else child
                for child, sub in module.named_children()
                if isinstance(sub, torch.nn.Linear)
            ]
    return projections


def find_mlp_modules(model: torch.nn.Module) -> list[str]:
    """Dense MLP blocks that take and return one hidden-state tensor: modules whose class name ends in "MLP"
    (LlamaMLP, Qwen2MLP, Phi3MLP, GPTNeoXMLP...), outermost only. MoE blocks (they also return router logits) are
    not among them."""
    found: list[str] = []
    for name, module in model.named_modules():
        if name and type(module).__name__.endswith("MLP") and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    return found


BUILTIN_FAMILIES = (
    FamilyInfo("llama", "supported", "GQA"),
    FamilyInfo("mistral", "supported", "GQA, sliding window applied inside groups"),
    FamilyInfo("mixtral", "supported", "MoE, GQA"),
    FamilyInfo("qwen2", "supported", "GQA, q/k/v bias"),
    FamilyInfo("qwen3", "supported", "GQA, q_norm/k_norm trained as norms"),
    FamilyInfo("gemma", "supported", "MQA, tied embeddings stay tied"),
    FamilyInfo("gemma2", "supported", "softcap and sliding window applied; eager attention at inference"),
    FamilyInfo("phi3", "supported", "fused qkv_proj"),
    FamilyInfo("gpt_neox", "supported", "fused query_key_value, partial rotary"),
    FamilyInfo("olmo2", "supported", "GQA, q/k norms"),
    FamilyInfo("gptj", "supported", "parallel attention/MLP; transformers >= 5.24 (refused at load before)"),
    FamilyInfo("falcon", "refused at load", "attention outside transformers' generic interface"),
    FamilyInfo("bloom", "refused at load", "attention outside transformers' generic interface"),
)


class BuiltinFamilies:
    """Default plugin: generic module detection and the families this project tests."""

    @hookimpl
    def longlora_embedding_modules(self, model):
        return find_embedding_modules(model)

    @hookimpl
    def longlora_norm_modules(self, model):
        return find_norm_modules(model)

    @hookimpl
    def longlora_attention_projections(self, model):
        return find_attention_projections(model)

    @hookimpl
    def longlora_s2_support(self, model):
        if not type(model)._can_set_attn_implementation():
            return S2Support(
                supported=False,
                reason="its attention layers do not use transformers' generic attention interface, "
                "so they would ignore S2-Attn",
            )
        return S2Support(supported=True)

    @hookimpl
    def longlora_tiled_mlp(self, model, shards):
        from .memory import tile_mlp_forward

        names = find_mlp_modules(model)
        modules = dict(model.named_modules())
        for name in names:
            tile_mlp_forward(modules[name], shards)
        return names or None

    @hookimpl
    def longlora_model_families(self):
        return list(BUILTIN_FAMILIES)
