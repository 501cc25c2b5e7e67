"""The data objects a config names: its sources and its tokenizer, built the same way for training,
evaluation and export."""
from __future__ import annotations

from typing import Any, Callable

import ml_collections

from siglip_jax.data import sources, tokenizers


def build_source(source: ml_collections.ConfigDict) -> Any:
    """The source of a `source_config(kind, **args)` entry."""
    return sources.make_source(source.kind, **source.args.to_dict())


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
