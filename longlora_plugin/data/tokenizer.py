"""A byte-level tokenizer that needs no download (256 byte tokens plus pad, bos and eos), and the tokenizer loader.

The tokenizers/transformers imports sit in the functions: the constants here are read by light code (the CLI).
"""

from __future__ import annotations

__all__ = [
    "BYTE_ID_OFFSET",
    "BYTE_TOKENIZER",
    "SPECIAL_TOKENS",
    "byte_ids",
    "byte_tokenizer",
    "load_tokenizer",
    "text_encoder",
]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
BYTE_ID_OFFSET = len(SPECIAL_TOKENS)  # byte b has id b + BYTE_ID_OFFSET
BYTE_TOKENIZER = "bytes"  # the name recipes and the CLI give the byte tokenizer


def byte_ids(text: str) -> list[int]:
    """``text`` as the byte tokenizer encodes it, without special tokens (no tokenizer object needed)."""
    return [b + BYTE_ID_OFFSET for b in text.encode()]


def text_encoder(tokenizer):
    """``text -> token ids`` under ``tokenizer``, without special tokens: how generated and evaluated text is encoded."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The tokenizer called ``name`` ("bytes", a folder or a hub id), padding with EOS when it has no pad token."""
    if name == BYTE_TOKENIZER:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {name} has neither a pad token nor an eos token to pad with; set model.tokenizer"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` mapping each UTF-8 byte to one token (id = byte + BYTE_ID_OFFSET)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes used by byte-level BPE
    byte_to_char = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab |= {byte_to_char[b]: b + BYTE_ID_OFFSET for b in range(256)}
    assert set(byte_to_char.values()) == set(alphabet)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=10**9
    )
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """The standard byte -> printable character table of byte-level BPE (GPT-2's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
