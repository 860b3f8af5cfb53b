"""Where models, tokenizers and data come from: a local path, or a hub id that only loading can check."""

from __future__ import annotations

from pathlib import Path

from .data.tokenizer import BYTE_TOKENIZER

__all__ = ["check_local_source"]


def check_local_source(value: str | None, what: str) -> None:
    """A value that is plainly a path (absolute, ./, ../, ~, or with more than one '/') must exist.

    Anything else may be a hub id ('org/name'); transformers would answer a missing local folder with a confusing
    "Repo id must be ..." error.
    """
    if value is None or value == BYTE_TOKENIZER:
        return
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().exists():
        raise ValueError(f"{what} {value} does not exist (give a local folder or a hub id like 'org/name')")
