"""The data objects a config names: its sources and its tokenizer, built the same way for training,
evaluation and export."""
from __future__ import annotations

from typing import Any, Callable

import ml_collections

from siglip_jax.data import sources, tokenizers


def build_source(source: ml_collections.ConfigDict) -> Any:
    """The source of a `source_config(kind, **args)` entry."""
    return sources.make_source(source.kind, **source.args.to_dict())


def missing_data_error(error: FileNotFoundError, key: str, source: ml_collections.ConfigDict) -> FileNotFoundError:
    """`error` (a source's missing file or folder) with the config key that named it and how to set it."""
    location_args = [arg for arg in source.args.keys() if any(word in arg for word in ("path", "dir", "file", "shards"))]
    arg = location_args[0] if location_args else "path"
    return FileNotFoundError(
        f"{str(error).rstrip('.')}: the data of config key {key!r} (source kind {source.kind!r}) is not there. "
        f"Point it at the data with --config.{key}.args.{arg}=/path/to/data or edit the recipe."
    )


def build_tokenizer(config: ml_collections.ConfigDict) -> Callable:
    """The tokenizer of `config.data`, checked against the model's vocabulary."""
    tokenizer = tokenizers.make_tokenizer(
        config.data.tokenizer,
        max_len=config.model.text.max_len,
        lowercase=config.data.lowercase,
        path=config.data.tokenizer_path or None,
    )
    return check_vocabulary(tokenizer, config)


def check_vocabulary(tokenizer: Callable, config: ml_collections.ConfigDict) -> Callable:
    """`tokenizer`, refused when it has more ids than the model's text embedding has rows."""
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but model.text.vocab_size is "
            f"{config.model.text.vocab_size}; set model.text.vocab_size >= {tokenizer.vocab_size}."
        )
    return tokenizer
