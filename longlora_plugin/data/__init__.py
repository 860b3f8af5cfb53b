"""Data for LongLoRA: a download-free byte-level tokenizer and the tokenizer loader, dataset formats, the passkey task."""

from .tokenizer import BYTE_ID_OFFSET, byte_tokenizer, load_tokenizer

__all__ = ["BYTE_ID_OFFSET", "byte_tokenizer", "load_tokenizer"]
