"""QLoRA: a 4-bit (bitsandbytes NF4/FP4) frozen base under LongLoRA's LoRA, embeddings and norms.

The recipe says ``model.quantization: {bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16}``.
The base loads through transformers' ``BitsAndBytesConfig`` and is prepared with peft's
``prepare_model_for_kbit_training``; the embeddings and norms LongLoRA trains stay in float32 (TRL casts every
trainable parameter of a quantized model to bfloat16, as the QLoRA paper does for the LoRA matrices; ours are cast
back). The adapter is saved as usual and merges onto the full-precision base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "QUANT_TYPES",
    "QuantizationSettings",
    "keep_trainable_modules_in_float32",
    "prepare_quantized_base",
    "quantization_from_recipe",
]

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class QuantizationSettings:
    bits: int = field(default=4, metadata={"help": "bits per frozen base weight; 4 (QLoRA)"})
    quant_type: str = field(default="nf4", metadata={"help": "'nf4' (the QLoRA paper's NormalFloat) or 'fp4'"})
    double_quant: bool = field(default=True, metadata={"help": "quantize the quantization constants too"})
    compute_dtype: str = field(default="bfloat16", metadata={"help": "dtype the 4-bit layers compute in"})

    def __post_init__(self) -> None:
        checks = [
            ("bits", self.bits, self.bits == 4 and not isinstance(self.bits, bool), "4"),
            ("quant_type", self.quant_type, self.quant_type in QUANT_TYPES, f"one of {QUANT_TYPES}"),
            ("double_quant", self.double_quant, isinstance(self.double_quant, bool), "true or false"),
            ("compute_dtype", self.compute_dtype, self.compute_dtype in COMPUTE_DTYPES, f"one of {COMPUTE_DTYPES}"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"model.quantization.{name} must be {allowed}, got {value!r}")

    def bnb_config(self):
        """transformers' ``BitsAndBytesConfig`` for these settings (needs bitsandbytes: the ``qlora`` extra)."""
        import torch
        from transformers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError(
                f"model.quantization needs bitsandbytes, which could not be imported ({error}); "
                "install the qlora extra: pip install 'longlora-plugin[qlora]'"
            ) from None
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_quant_storage=torch.uint8,
        )

    def describe(self) -> str:
        return f"{self.bits}-bit {self.quant_type}{' (double quant)' if self.double_quant else ''}, compute {self.compute_dtype}"


def quantization_from_recipe(value: Any, where: str = "recipe") -> QuantizationSettings | None:
    """``model.quantization`` of a recipe (a mapping or null) as settings; bad keys and values name themselves."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: model.quantization must be a mapping like {{bits: 4, quant_type: nf4}} or null, got {value!r}")
    allowed = ("bits", "quant_type", "double_quant", "compute_dtype")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown keys in model.quantization: {unknown}; allowed: {list(allowed)}")
    try:
        return QuantizationSettings(**value)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def prepare_quantized_base(model):
    """peft's k-bit preparation: non-quantized parameters (embeddings, norms, head) to float32, inputs that need
    gradients; checkpointing is left to the Trainer (non-reentrant, from the recipe)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_trainable_modules_in_float32(model) -> list[str]:
    """Cast the fully trained modules (peft's ``modules_to_save`` copies: embeddings, norms) back to float32.

    TRL casts every trainable parameter of a quantized model to bfloat16; the embeddings and norms are full
    parameters, not low-rank updates, and keep their precision. Returns the names of the parameters cast back.
    """
    import torch

    restored = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "modules_to_save" in name and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            restored.append(name)
    return restored
