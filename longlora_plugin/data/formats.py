"""The built-in dataset formats and the loader of local files and hub datasets.

- ``text``: continued pre-training in the paper's style: documents joined with EOS and cut into blocks of the target
  context (the remainder is dropped).
- ``longalpaca``: SFT records ``{instruction, [input], output}`` (LongAlpaca-12k, LongQA). The prompt template is
  ``ALPACA_PROMPT`` / ``ALPACA_PROMPT_WITH_INPUT``; the prompt is masked out of the loss (TRL's completion-only loss).
- ``passkey``: generated passkey-retrieval samples between ``data.min_length`` (default: the original length) and the
  target length; the loss is on the key, or on every token with ``training.completion_only_loss: false``.

``datasets`` is imported where records are loaded, so that naming a format costs nothing.

Records are checked before training starts: a missing or empty field is an error naming the file and the record
index; a record longer than the context is an error, truncated, or dropped with a count, as ``data.too_long`` says.
"""

from __future__ import annotations

import codecs
import logging
import random
from pathlib import Path
from typing import Any

from ..hookspecs import DatasetFormat
from ..hookspecs import hookimpl
from .passkey import make_passkey_sample
from .tokenizer import text_encoder

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "BuiltinDatasetFormats",
    "alpaca_prompt",
    "load_records",
]

logger = logging.getLogger(__name__)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def load_records(
    path: str | None, *, split: str = "train", max_records: int | None = None, sample_by: str = "document"
):
    """A ``datasets.Dataset`` of the raw records: a local file by its extension, else a hub dataset name.

    A .txt file gives one record per document (the whole file), paragraph or line, as ``sample_by`` says: a book read
    line by line would never show a model more context than a line.
    """
    from datasets import load_dataset

    if not path:
        raise ValueError("data.path must name a local file or a hub dataset, got nothing")
    source = Path(path)
    if source.exists():
        builder = FILE_BUILDERS.get(source.suffix.lower())
        if builder is None or not source.is_file():
            raise ValueError(f"data.path {source} must be a file ending in one of {sorted(FILE_BUILDERS)}")
        if source.stat().st_size < 64 and source.read_bytes().strip() in (b"", b"[]", b"{}"):
            raise ValueError(f"data.path {source} holds no records")
        if builder in ("json", "text"):
            _check_utf8(source)
        options = {"sample_by": sample_by} if builder == "text" else {}
        try:
            records = load_dataset(builder, data_files=str(source), split="train", **options)
        except Exception as error:  # datasets wraps parse errors deeply; name the file and the root cause
            raise ValueError(f"cannot read {source} as {builder}: {error} ({_root_cause(error)})") from error
    elif source.suffix.lower() in FILE_BUILDERS or source.is_absolute():
        raise ValueError(f"data.path {source} does not exist (give a local data file or a hub dataset name)")
    else:
        records = load_dataset(path, split=split)
    if len(records) == 0:
        raise ValueError(f"data.path {path} holds no records")
    if max_records is not None:
        records = records.select(range(min(max_records, len(records))))
    return records


def _recipe_records(data: Any):
    return load_records(data.path, split=data.split, max_records=data.max_records, sample_by=data.sample_by)


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def _check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Decode the file in chunks, so that a bad byte is reported with its file and offset before anything else."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise ValueError(f"cannot read {path}: not UTF-8 at byte {offset + error.start}") from error
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise ValueError(f"cannot read {path}: it ends inside a UTF-8 character") from error


def _text_field(record: dict, name: str, source: str, index: int, *, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise ValueError(f"{source}: record {index} has no '{name}' field")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{source}: record {index} field '{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{source}: record {index} has an empty '{name}'")
    return value


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def prepare_longalpaca(recipe: Any, tokenizer: Any):
    from datasets import Dataset

    data, target = recipe.data, recipe.context.target
    records = _recipe_records(data)
    prompts, completions, dropped, truncated = [], [], 0, 0
    eos = tokenizer.eos_token or ""
    encode = text_encoder(tokenizer)
    for index, record in enumerate(records):
        instruction = _text_field(record, "instruction", data.path, index)
        output = _text_field(record, "output", data.path, index)
        prompt = alpaca_prompt(instruction, _text_field(record, "input", data.path, index, required=False))
        completion = " " + output.strip() + eos
        prompt_length, completion_length = len(encode(prompt)), len(encode(completion))
        if prompt_length + completion_length > target:
            if data.too_long == "error":
                raise ValueError(
                    f"{data.path}: record {index} has {prompt_length + completion_length} tokens, more than "
                    f"context.target={target} (set data.too_long to 'truncate' or 'drop')"
                )
            if data.too_long == "drop" or prompt_length >= target:
                dropped += 1
                continue
            truncated += 1  # SFTTrainer cuts it at max_length = context.target
        prompts.append(prompt)
        completions.append(completion)
    if dropped or truncated:
        logger.warning("%s: %d records dropped and %d truncated as longer than %d tokens", data.path, dropped, truncated, target)
    if not prompts:
        raise ValueError(f"{data.path}: no usable records")
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def prepare_text(recipe: Any, tokenizer: Any):
    from datasets import Dataset

    data, target = recipe.data, recipe.context.target
    records = _recipe_records(data)
    if tokenizer.eos_token_id is None:
        raise ValueError("continued pre-training joins documents with EOS, but the tokenizer has no eos_token")
    stream: list[int] = []
    encode = text_encoder(tokenizer)
    for index, record in enumerate(records):
        stream += encode(_text_field(record, data.text_field, data.path, index)) + [tokenizer.eos_token_id]
    blocks = [stream[start : start + target] for start in range(0, len(stream) - target + 1, target)]
    if not blocks:
        raise ValueError(f"{data.path}: {len(stream)} tokens in all, less than one block of context.target={target}")
    return Dataset.from_dict({"input_ids": blocks})


def prepare_passkey(recipe: Any, tokenizer: Any):
    from datasets import Dataset

    rng = random.Random(recipe.data.seed)
    high = recipe.context.target
    low = recipe.data.min_length if recipe.data.min_length is not None else recipe.context.original
    reach = recipe.group_size if recipe.data.passkey_depth == "s2_reach" else None
    encode = text_encoder(tokenizer)
    prompts, completions = [], []
    for _ in range(recipe.data.num_samples):
        sample = make_passkey_sample(encode, rng.randint(low, high), rng, intro="", reach_group_size=reach)
        prompts.append(tokenizer.decode(sample.prompt_ids))
        completions.append(sample.key)
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


BUILTIN_FORMATS = (
    DatasetFormat("text", ("text",), prepare_text, "continued pre-training: documents joined with EOS, cut into blocks"),
    DatasetFormat(
        "longalpaca",
        ("instruction", "output"),
        prepare_longalpaca,
        "SFT on {instruction, [input], output} with the Alpaca prompt, prompt masked out of the loss",
        ("input",),
    ),
    DatasetFormat("passkey", (), prepare_passkey, "generated passkey retrieval between the original and target length"),
)


class BuiltinDatasetFormats:
    """Default plugin: the dataset formats recipes can name out of the box."""

    @hookimpl
    def longlora_dataset_formats(self):
        return list(BUILTIN_FORMATS)
