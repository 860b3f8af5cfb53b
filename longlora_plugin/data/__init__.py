"""Data for LongLoRA: a download-free byte-level tokenizer and the passkey-retrieval task."""

from .tokenizer import byte_tokenizer

__all__ = ["byte_tokenizer"]
