"""The data objects a config names: its sources and its tokenizer, built the same way for training,
evaluation and export."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import ml_collections

from siglip_jax.data import sources, streaming, tokenizers


def build_source(source: ml_collections.ConfigDict) -> Any:
    """The source of a `source_config(kind, **args)` entry."""
    return sources.make_source(source.kind, **source.args.to_dict())


def cached_source(source: Any, data: ml_collections.ConfigDict) -> Any:
    """The training `source` with its decoded images kept in memory up to `data.cache_decoded_mb`; a stream,
    which reads each record once an epoch in shard order, is refused with the fix."""
    if streaming.is_stream(source):
        raise ValueError(
            f"data.cache_decoded_mb={data.cache_decoded_mb} keeps decoded images of a random-access source, but "
            f"data.train ({data.train.kind}) streams its records; set --config.data.cache_decoded_mb=0.")
    return sources.DecodedRecordCache(source, max_bytes=data.cache_decoded_mb * 2**20)


def missing_data_error(error: FileNotFoundError, key: str, source: ml_collections.ConfigDict) -> FileNotFoundError:
    """`error` (a source's missing file or folder) with the config key that named it and how to set it."""
    # Arguments that hold locations: their names say so and their values are paths (open_shards is a count).
    location_args = [arg for arg in source.args.keys() if any(word in arg for word in ("path", "dir", "file", "shards"))
                     and isinstance(source.args[arg], (str, os.PathLike, list, tuple))]
    # The argument whose value the error names (a missing image_dir is not the captions_file's fault).
    named = [arg for arg in location_args if str(source.args[arg]) and str(source.args[arg]) in str(error)]
    arg = (named or location_args or ["path"])[0]
    return FileNotFoundError(
        f"{str(error).rstrip('.')}: the data of config key {key!r} (source kind {source.kind!r}) is not there. "
        f"Point it at the data with --config.{key}.args.{arg}=/path/to/data or edit the recipe."
    )


def build_tokenizer(config: ml_collections.ConfigDict) -> Callable:
    """The tokenizer of `config.data`, checked against the model's vocabulary. A SentencePiece file that does
    not exist yet is first trained on the training captions where `data.tokenizer_vocab_size` asks for it."""
    if _vocabulary_to_train(config.data):
        train_vocabulary(config)
    tokenizer = tokenizers.make_tokenizer(
        config.data.tokenizer,
        max_len=config.model.text.max_len,
        lowercase=config.data.lowercase,
        path=config.data.tokenizer_path or None,
    )
    return check_vocabulary(tokenizer, config)


def _vocabulary_to_train(data: ml_collections.ConfigDict) -> bool:
    return (data.tokenizer == "sentencepiece" and data.tokenizer_vocab_size > 0 and bool(data.tokenizer_path)
            and not os.path.exists(os.path.expanduser(data.tokenizer_path)))


def train_vocabulary(config: ml_collections.ConfigDict) -> str:
    """Trains the config's SentencePiece vocabulary on the captions of `data.train` and writes it to
    `data.tokenizer_path` (folders created, the file written whole); returns the path. The same captions give
    the same file, so runs starting at once may each train it."""
    data = config.data
    path = os.path.expanduser(data.tokenizer_path)
    source = build_source(data.train)
    if not hasattr(source, "__len__") and not hasattr(source, "all_captions"):
        raise ValueError(f"data.tokenizer_path {path!r} does not exist and data.train ({data.train.kind}) streams "
                         "its records, so there is no caption list to train a vocabulary on here. Train one with "
                         "tools/train_tokenizer.py from the same data and set data.tokenizer_path to it.")
    logging.getLogger(__name__).warning(
        "Training a %d-piece SentencePiece vocabulary on the captions of data.train (%s), once: it is cached at %s.",
        data.tokenizer_vocab_size, data.train.kind, path)
    try:
        tokenizers.train_sentencepiece(sources.iter_captions(source), path, data.tokenizer_vocab_size,
                                       lowercase=data.lowercase)
    except OSError as error:  # a read-only or full disk, a folder we may not write
        raise OSError(f"Cannot write the vocabulary to {path!r} ({error.strerror or error}); point "
                      "--config.data.tokenizer_path at a writable file.") from error
    return path


def check_vocabulary(tokenizer: Callable, config: ml_collections.ConfigDict) -> Callable:
    """`tokenizer`, refused when it has more ids than the model's text embedding has rows."""
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but model.text.vocab_size is "
            f"{config.model.text.vocab_size}; set model.text.vocab_size >= {tokenizer.vocab_size}."
        )
    return tokenizer
