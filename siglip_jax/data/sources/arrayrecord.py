"""ArrayRecord shards (ours, from tools/convert.py) and TFDS data sets in array_record format.

Our record format, one ArrayRecord record per example: a msgpack map
    {"format": 1, "id": str, "captions": [str, ...], "image": bytes}
where "image" holds the encoded file exactly as found (JPEG/PNG/WebP; arrays are stored as
lossless PNG). msgpack because it stores bytes without base64's 33% and needs no schema compiler;
the "format" field lets a later layout stay readable next to this one.
"""
from __future__ import annotations

import glob
import os
from typing import Mapping, Sequence

import msgpack
import numpy as np

from siglip_jax.data.images import encode_image

RECORD_FORMAT = 1
_RECORD_KEYS = {"format", "id", "captions", "image"}


def encode_record(record: Mapping) -> bytes:
    """A source record {"image", "captions", "id"} -> bytes in our ArrayRecord format."""
    image = record["image"]
    if isinstance(image, np.ndarray):
        image = encode_image(image, "png")
    captions = record["captions"]
    if isinstance(captions, str) or not captions:
        raise ValueError(f"Record {record.get('id')!r}: 'captions' must be a non-empty list of "
                         f"strings, got {captions!r}.")
    return msgpack.packb({"format": RECORD_FORMAT, "id": str(record["id"]),
                          "captions": [str(c) for c in captions], "image": bytes(image)},
                         use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """Bytes written by encode_record -> {"image": bytes, "captions": [...], "id": str}."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as error:
        raise ValueError(f"Not a siglip_jax record ({len(data)} bytes): {error}. Was the file "
                         "written by tools/convert.py?") from error
    if not isinstance(record, dict) or set(record) != _RECORD_KEYS:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"Record has keys {keys}, expected {sorted(_RECORD_KEYS)}; it was not "
                         "written by tools/convert.py.")
    if record["format"] != RECORD_FORMAT:
        raise ValueError(f"Record format {record['format']} is not readable by this version "
                         f"(reads format {RECORD_FORMAT}); upgrade siglip_jax or re-convert.")
    return {"image": record["image"], "captions": record["captions"], "id": record["id"]}


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Files from a path, a glob or a list of those; sorted within each glob."""
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    expanded: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [path for path in matches if not os.path.isfile(path)]
        if not matches or missing:
            raise FileNotFoundError(f"No ArrayRecord file at {pattern!r}; pass a path, a glob "
                                    "like 'dir/train-*.array_record' or a list of paths.")
        expanded += matches
    return expanded


class ArrayRecordSource:
    """Records from ArrayRecord files written by tools/convert.py (format in the module doc)."""

    def __init__(self, paths: str | Sequence[str]):
        import grain.python as grain

        self.paths = expand_paths(paths)
        self._source = grain.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Index {index} out of range for a source of {len(self)} records.")
        return decode_record(self._source[index % len(self)])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


def _lookup(example: Mapping, key: str):
    """example["a"]["b"] for key "a/b" (TFDS nests features, e.g. coco's captions/text)."""
    value = example
    for part in key.split("/"):
        value = value[part]
    return value


def _as_text_list(value) -> list[str]:
    """A TFDS Text feature (bytes) or Sequence(Text) (array of bytes) -> list of str."""
    values = [value] if isinstance(value, (bytes, str)) else list(np.asarray(value).reshape(-1))
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _skip_image_decoding(features, image_key: str):
    """A TFDS decoders dict that leaves the image feature encoded, or None if it isn't an Image.

    Bytes keep decoding in one place (images.decode_image, which the pipeline guards with
    skip-and-count) and avoid TFDS decoding every image twice when the pipeline crops it.
    """
    import tensorflow_datasets as tfds

    parts = image_key.split("/")
    feature = features
    for part in parts:
        feature = feature[part]
    if not isinstance(feature, tfds.features.Image):
        return None
    decoders = tfds.decode.SkipDecoding()
    for part in reversed(parts):
        decoders = {part: decoders}
    return decoders


class TfdsSource:
    """A TFDS data set prepared in array_record format, read through `tfds.data_source` (no
    TensorFlow needed). `image_key`/`caption_key` name the features ("a/b" for nested ones);
    `id_key` names a feature to use as id, else the id is "split/index"."""

    def __init__(self, name: str, split: str, data_dir=None, image_key: str = "image",
                 caption_key: str = "caption", id_key: str | None = None):
        import tensorflow_datasets as tfds

        data_dir = os.fspath(data_dir) if data_dir is not None else None
        try:
            probe = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as error:
            raise ValueError(
                f"Cannot open TFDS data set {name!r} split {split!r} in data_dir={data_dir!r}: "
                f"{error}. It must be prepared already (download_and_prepare with "
                "file_format='array_record'); nothing is downloaded here.") from error
        features = probe.dataset_info.features
        for key in filter(None, (image_key, caption_key, id_key)):
            try:
                _lookup(features, key)
            except (KeyError, TypeError):
                raise ValueError(f"TFDS data set {name!r} has no feature {key!r}; its features "
                                 f"are {list(features.keys())}.") from None
        decoders = _skip_image_decoding(features, image_key)
        self._source = (tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
                        if decoders else probe)
        self.name, self.split = name, split
        self.image_key, self.caption_key, self.id_key = image_key, caption_key, id_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Index {index} out of range for a source of {len(self)} records.")
        index %= len(self)
        example = self._source[index]
        image = _lookup(example, self.image_key)
        record_id = (_as_text_list(_lookup(example, self.id_key))[0] if self.id_key
                     else f"{self.split}/{index}")
        return {"image": image if isinstance(image, np.ndarray) else bytes(image),
                "captions": _as_text_list(_lookup(example, self.caption_key)), "id": record_id}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"
