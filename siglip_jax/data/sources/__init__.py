"""Data sources: grain random-access sources of image-caption records.

A record is {"image": encoded bytes (or an [H, W, 3] uint8 array), "captions": list[str] (one or
more), "id": str}. `make_source(kind, **kwargs)` builds one by name from the table below, which
is the whole registry: adding a source is one class plus one line there.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from siglip_jax.data.demo import DemoSource
from siglip_jax.data.mixture import MixtureSource
from siglip_jax.data.sources.arrayrecord import (ArrayRecordSource, TfdsSource, decode_record,
                                                 encode_record)
from siglip_jax.data.sources.image_folder import ImageFolderSource
from siglip_jax.data.sources.decoded_cache import DecodedRecordCache
from siglip_jax.data.sources.captions import (CaptionFolderSource, CocoCaptionsSource, KarpathySplitSource,
                                              coco2017, flickr8k, read_caption_table)
from siglip_jax.data.sources.shard_stream import WebDatasetStreamSource
from siglip_jax.data.sources.webdataset import (WebDatasetSource, expand_shard_paths,
                                                shard_paths_for)


def mixture(sources: Mapping[str, Mapping[str, Any]], on_exhausted: str = "restart") -> MixtureSource:
    """A MixtureSource whose entries are built from this table (data/mixture.py)."""
    return MixtureSource(sources, on_exhausted, make_source=make_source)


SOURCES: dict[str, Callable] = {
    "demo": DemoSource,                     # split in train/eval, size, image_size, seed (generated)
    "caption_folder": CaptionFolderSource,  # image_dir, captions_file, split_file, on_missing
    "coco_captions": CocoCaptionsSource,    # image_dir, annotations_json, on_missing
    "flickr8k": flickr8k,                   # path, split in train/dev/test/all
    "coco2017": coco2017,                   # path, split in train/val
    "karpathy_split": KarpathySplitSource,  # image_dir, karpathy_json (dataset_coco.json), split in train/val/test/all
    "webdataset": WebDatasetSource,         # shards (path, glob, {000..009} range or list)
    "webdataset_stream": WebDatasetStreamSource,  # shards ({00000..09999} ranges, lists), shuffle_buffer, open_shards, resampled
    "mixture": mixture,                     # sources {name: dict(kind, weight, args)}, on_exhausted restart/end
    "arrayrecord": ArrayRecordSource,       # paths (path, glob or list)
    "image_folder": ImageFolderSource,      # path (root/<class>/<image>), max_per_class, synsets; for classification
    "tfds": TfdsSource,                     # name, split, data_dir, image_key, caption_key, id_key
}
SOURCE_KINDS = tuple(SOURCES)


def make_source(kind: str, **kwargs):
    """The source named `kind` (one of SOURCE_KINDS) built with `kwargs`; errors list the valid
    kinds, or the arguments that kind accepts."""
    if kind not in SOURCES:
        raise ValueError(f"Unknown source kind {kind!r}; valid kinds: {list(SOURCE_KINDS)}.")
    factory = SOURCES[kind]
    parameters = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    missing = sorted(name for name, parameter in parameters.items()
                     if parameter.default is inspect.Parameter.empty and name not in kwargs)
    if unknown or missing:
        raise TypeError(f"Source kind {kind!r} takes arguments {list(parameters)}; got unknown "
                        f"{unknown} and is missing required {missing}.")
    return factory(**kwargs)


def parse_source_args(pairs: Sequence[str]) -> dict[str, str]:
    """["path=/data", "split=test"] (command-line --arg flags) -> {"path": "/data", "split": "test"}."""
    kwargs = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise ValueError(f"Source argument {pair!r} is not of the form name=value.")
        kwargs[name.strip()] = value
    return kwargs


def iter_captions(source) -> Iterator[str]:
    """Every caption of a source; uses source.all_captions() where it exists, which skips
    reading images."""
    if hasattr(source, "all_captions"):
        yield from source.all_captions()
        return
    for index in range(len(source)):
        yield from source[index]["captions"]


__all__: Iterable[str] = [
    "ArrayRecordSource", "CaptionFolderSource", "DecodedRecordCache", "ImageFolderSource", "CocoCaptionsSource", "SOURCES", "SOURCE_KINDS",
    "TfdsSource", "WebDatasetSource", "WebDatasetStreamSource", "coco2017", "decode_record", "encode_record",
    "expand_shard_paths", "flickr8k", "iter_captions", "make_source", "parse_source_args",
    "read_caption_table", "shard_paths_for",
]
