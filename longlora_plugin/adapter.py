"""A LongLoRA model's life cycle: prepare a base model, save the adapter, reload it, merge it into a plain HF model.

Everything a saved adapter needs travels in its folder: the LoRA weights and the fully trained embeddings and
norms (peft's ``modules_to_save``), the ``LongLoraConfig`` (``adapter_config.json``), and ``longlora.json`` with
the context extension (original and target length, the exact ``rope_parameters``) and the S2-Attn settings.
Folders are written atomically: a save that is interrupted leaves no folder under the final name.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists

from .config import LongLoraConfig
from .hf_attention import S2_ATTENTION, check_model_supports_s2
from .rope import extend_rope, refresh_rotary_embeddings
from .settings import S2Settings

__all__ = [
    "LONGLORA_FILE",
    "get_longlora_model",
    "load_longlora",
    "merge_longlora",
    "read_longlora_settings",
    "save_longlora",
    "write_longlora_settings",
    "prepare_base",
    "atomic_folder",
    "base_record",
    "check_base_matches",
]

LONGLORA_FILE = "longlora.json"
FORMAT_VERSION = 1
# What a base must share with the one an adapter was trained on; a key a record lacks (older saves) is not checked.
BASE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
_RENAME_EXCHANGE = 2  # Linux renameat2 flag: swap two paths atomically


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step where the OS offers it (Linux); False where it does not."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # no renameat2 in this C library, or no C library to ask
        return False
    at_cwd = -100
    return renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE) == 0


@contextmanager
def atomic_folder(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder next to ``destination``; on success it replaces ``destination`` by renames.

    If the body raises (or the process dies) the destination keeps its previous content, and the staging folder,
    named ``.<name>.partial-*``, is removed or left clearly partial. Replacing an existing destination is one atomic
    swap on Linux; elsewhere it is two renames, and a kill between them leaves the previous content in
    ``.<name>.previous-*``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"cannot save into {destination}: it exists and is not a folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        if destination.exists() and _exchange(staging, destination):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous content
            return
        previous = None
        if destination.exists():
            previous = destination.with_name(f".{destination.name}.previous-{staging.name.rsplit('-', 1)[-1]}")
            os.replace(destination, previous)
        os.replace(staging, destination)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _config_of(model: Any):
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.config


def _check_module_names(model: torch.nn.Module, config: LongLoraConfig) -> None:
    """Every name listed in target_modules / modules_to_save must match a module, by peft's own matching.

    peft itself only refuses a config none of whose names match; a typo next to a good name would go unnoticed.
    """
    keys = [name for name, _ in model.named_modules() if name]
    missing = []
    if not isinstance(config.target_modules, str):  # a regex is matched as a whole, by peft
        for name in config.target_modules or ():
            one = copy.copy(config)
            one.target_modules, one.modules_to_save = {name}, None
            if not any(check_target_module_exists(one, key) is True for key in keys):
                missing.append(name)
    if list(config.modules_to_save or ()) != config._fallback_modules_to_save():  # fallback names span families
        missing += [name for name in config.modules_to_save or () if not any(key.endswith(name) for key in keys)]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"LongLoraConfig names modules that model_type '{model_type}' does not have: {sorted(missing)}")


def prepare_base(model: torch.nn.Module, config: LongLoraConfig) -> None:
    """Ready a base model for a LongLoRA config before peft wraps it: check the names the config lists, extend the
    context (unless already extended) and switch on S2-Attn with the config's settings."""
    check_model_supports_s2(model)
    _check_module_names(model, config)
    model_config = model.config
    if config.target_context is not None and model_config.max_position_embeddings != config.target_context:
        extend_rope(
            model,
            config.target_context,
            original_length=config.original_context,
            rope_type=config.rope_type,
            rounding=config.rope_rounding,  # type: ignore[arg-type]
            rope_options=config.rope_options,
        )
    settings = S2Settings.from_config(config)
    context = model_config.max_position_embeddings
    if settings.group_size is not None and isinstance(context, int) and settings.group_size > context:
        raise ValueError(
            f"s2_group_size ({settings.group_size}) must be at most the model's context of {context} tokens "
            "(max_position_embeddings, after any extension)"
        )
    settings.apply_to(model_config)
    if model_config._attn_implementation != S2_ATTENTION:
        model.set_attn_implementation(S2_ATTENTION)


def get_longlora_model(model: torch.nn.Module, config: LongLoraConfig | None = None, **config_kwargs: Any) -> PeftModel:
    """Prepare a base causal LM for LongLoRA training and wrap it with peft.

    Applies position interpolation (``original_context`` -> ``target_context``), sets S2-Attn, and resolves the
    LoRA / embedding / norm modules from the model when the config was not built with ``for_model``.
    """
    if config is None:
        config = LongLoraConfig.for_model(model, **config_kwargs)
    elif config_kwargs:
        raise ValueError(f"pass either a config or config keyword arguments, not both (got {sorted(config_kwargs)})")
    prepare_base(model, config)
    return get_peft_model(model, config)


def base_record(base_config: Any) -> dict[str, Any]:
    """The architecture and size of a base model, as ``longlora.json`` records them."""
    return {key: getattr(base_config, key, None) for key in BASE_KEYS}


def _settings_record(model: PeftModel, config: LongLoraConfig) -> dict[str, Any]:
    base_config = _config_of(model)
    return {
        "format_version": FORMAT_VERSION,
        **base_record(base_config),
        "original_context": config.original_context,
        "target_context": config.target_context,
        "max_position_embeddings": base_config.max_position_embeddings,
        "rope_parameters": base_config.rope_parameters,
        "s2": S2Settings.from_config(base_config).to_record(),
        "trained_on_quantized_base": _quantization_record(base_config),
    }


def _quantization_record(base_config: Any) -> dict[str, Any] | None:
    """The base's bitsandbytes settings when the adapter was trained on a quantized (QLoRA) base, else None."""
    quantization = getattr(base_config, "quantization_config", None)
    if quantization is None:
        return None
    record = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)
    return {key: value for key, value in record.items() if isinstance(value, (str, int, float, bool, type(None)))}


def write_longlora_settings(model: PeftModel, folder: str | os.PathLike) -> None:
    """Write ``longlora.json`` (context extension, S2-Attn settings, the base's size) into an adapter folder."""
    config = model.peft_config["default"]
    (Path(folder) / LONGLORA_FILE).write_text(json.dumps(_settings_record(model, config), indent=2))


def save_longlora(
    model: PeftModel, folder: str | os.PathLike, tokenizer: Any = None, state_dict: dict | None = None
) -> Path:
    """Save the adapter (LoRA + embeddings + norms), its config and ``longlora.json`` atomically.

    ``state_dict``: a full, gathered state dict (e.g. ``accelerator.get_state_dict(model)`` under DeepSpeed ZeRO-3,
    where each rank holds only shards); the adapter's tensors are taken from it.
    """
    if not isinstance(model, PeftModel) or not isinstance(model.peft_config.get("default"), LongLoraConfig):
        raise ValueError(f"save_longlora needs a PeftModel made with a LongLoraConfig, got {type(model).__name__}")
    with atomic_folder(folder) as staging:
        model.save_pretrained(staging, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_longlora_settings(model, staging)  # last: a folder with this file is complete
    return Path(folder)


def read_longlora_settings(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / LONGLORA_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a complete LongLoRA adapter folder: {LONGLORA_FILE} is missing "
            "(an interrupted save, or not saved with save_longlora)"
        )
    record = json.loads(path.read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {record.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    return record


def check_base_matches(base_config: Any, record: dict[str, Any], folder: Any) -> None:
    """Refuse a base whose architecture or size differs from the one recorded in ``folder``'s longlora.json."""
    for key in BASE_KEYS:
        have, want = getattr(base_config, key, None), record.get(key)
        if want is not None and have != want:
            raise ValueError(
                f"the adapter in {folder} was trained on a base with {key}={want!r}, but this base has {key}={have!r}"
            )


def load_longlora(base_model: torch.nn.Module, folder: str | os.PathLike, *, is_trainable: bool = False) -> PeftModel:
    """Load a LongLoRA adapter onto a fresh base model: the recorded RoPE extension, S2-Attn, then the weights."""
    record = read_longlora_settings(folder)
    base_config = base_model.config
    check_base_matches(base_config, record, folder)
    base_config.rope_parameters = record["rope_parameters"]
    base_config.max_position_embeddings = record["max_position_embeddings"]
    refresh_rotary_embeddings(base_model)
    S2Settings.from_config(base_config).with_record(record["s2"]).apply_to(base_config)
    base_model.set_attn_implementation(S2_ATTENTION)
    config = LongLoraConfig.from_pretrained(str(folder))
    return PeftModel.from_pretrained(base_model, str(folder), config=config, is_trainable=is_trainable)


def merge_longlora(model: PeftModel, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Merge the adapter into its base (in place) and write a plain HF model folder, atomically.

    ``AutoModelForCausalLM.from_pretrained(folder)`` then loads it with full attention and with the extended
    ``rope_parameters`` in its config.json. The S2-Attn settings are dropped from the merged config.
    """
    if not isinstance(model, PeftModel):
        raise ValueError(f"merge_longlora needs a PeftModel, got {type(model).__name__}")
    if getattr(model.get_base_model(), "is_quantized", False):
        raise ValueError(
            "merge_longlora needs the full-precision base: this one is quantized, and merging would round the "
            "adapter into 4-bit weights; load the base without quantization_config and load_longlora onto it"
        )
    merged = model.merge_and_unload()
    S2Settings.remove_from(merged.config)
    merged.set_attn_implementation("sdpa" if merged._supports_sdpa else "eager")
    with atomic_folder(folder) as staging:
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(folder)
