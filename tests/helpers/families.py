"""Tiny configs, one per model family that S2-Attn is tested on. The README's family table is checked against this."""

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

COMMON = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# model_type -> (config kwargs, what the family exercises)
FAMILIES = {
    "llama": (LLAMA_LIKE, "GQA"),
    "mistral": ({**LLAMA_LIKE, "sliding_window": 5}, "GQA, sliding window smaller than the group"),
    "mixtral": ({**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, "MoE, GQA"),
    "qwen2": (LLAMA_LIKE, "GQA, q/k/v bias"),
    "qwen3": ({**LLAMA_LIKE, "head_dim": 16}, "GQA, q_norm/k_norm"),
    "gemma": ({**LLAMA_LIKE, "head_dim": 16, "num_key_value_heads": 1}, "MQA, tied embeddings"),
    "gemma2": (
        {**LLAMA_LIKE, "head_dim": 16, "sliding_window": 4, "attn_logit_softcapping": 0.02, "query_pre_attn_scalar": 16},
        "softcap, alternating sliding-window layers, eager at inference",
    ),
    "phi3": ({**LLAMA_LIKE, "num_key_value_heads": 4}, "fused qkv_proj"),
    "gpt_neox": (
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5),
        "fused query_key_value, partial rotary, no num_key_value_groups",
    ),
    "olmo2": (LLAMA_LIKE, "GQA, q/k norms"),
    "gptj": (dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8), "parallel attention/MLP; transformers >= 5.24"),
}

# Families whose attention layers bypass transformers' attention interface.
UNSUPPORTED = {
    "falcon": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1),
    "bloom": dict(hidden_size=32, n_head=4, n_layer=1),
}


def tiny_config(model_type: str, **overrides):
    kwargs = FAMILIES[model_type][0] if model_type in FAMILIES else UNSUPPORTED[model_type]
    return AutoConfig.for_model(model_type, **{**COMMON, **kwargs, **overrides})


def uses_attention_interface(model_type: str) -> bool:
    """Whether the installed transformers runs this family's attention through AttentionInterface.

    GPT-J does from transformers 5.24 on; before, s2_attention refuses it at load like the UNSUPPORTED families.
    """
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(tiny_config(model_type))]._can_set_attn_implementation()


# What the installed transformers lets s2_attention train, and what it must refuse at load.
SUPPORTED_HERE = sorted(name for name in FAMILIES if uses_attention_interface(name))
REFUSED_HERE = sorted(set(UNSUPPORTED) | (set(FAMILIES) - set(SUPPORTED_HERE)))
