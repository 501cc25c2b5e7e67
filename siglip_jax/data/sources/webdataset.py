"""Random access into WebDataset tar shards as written by img2dataset.

A sample is the tar members sharing a key (the member path up to the first "." of its file name):
`key.jpg|jpeg|png|webp` plus `key.txt` (the caption) and/or `key.json` (with "caption", or
"captions" as a list, which takes precedence so several captions per image survive). We index each uncompressed shard once (tar headers only, no image data is
read) and then read a member with one seek, which is what grain's global shuffle needs.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from typing import NamedTuple, Sequence

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class _Member(NamedTuple):
    shard: int
    offset: int
    size: int


class _Sample(NamedTuple):
    key: str
    image: _Member
    text: _Member | None
    json: _Member | None


def _expand_braces(pattern: str) -> list[str]:
    """Expands img2dataset/webdataset numeric ranges: "s-{00000..00002}.tar" -> 3 names."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first)
    expanded = []
    for number in range(int(first), int(last) + 1):
        expanded += _expand_braces(pattern[: match.start()] + str(number).zfill(width)
                                   + pattern[match.end():])
    return expanded


def expand_shard_paths(shards: str | Sequence[str]) -> list[str]:
    """Shard paths from a path, a glob ("dir/*.tar"), a brace range ("dir/{00000..00009}.tar") or
    a list of those; globs are sorted so every process sees the same order."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths: list[str] = []
    for pattern in patterns:
        for name in _expand_braces(os.fspath(pattern)):
            matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
            if not matches:
                raise FileNotFoundError(f"No shard matches {name!r}.")
            paths += matches
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}.")
    if not paths:
        raise ValueError(f"No shards given ({shards!r}); pass a path, glob or list of .tar files.")
    return paths


def shard_paths_for(shard_paths: Sequence[str], process_index: int, process_count: int
                    ) -> list[str]:
    """The shards that process `process_index` of `process_count` should index: every
    process_count-th one, so each host indexes and reads only 1/process_count of the data.

    Use it when shards are many (indexing is per shard); grain's own sharding of record indices
    (ShardByJaxProcess) works too but has every host index every shard. The same function splits a
    host's shards over its data workers (worker index, worker count).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    if len(shard_paths) < process_count:
        raise ValueError(
            f"{len(shard_paths)} shards cannot be split over {process_count} processes: some "
            "would get none. Write more shards (tools/convert.py --num_shards) or shard records "
            "instead (grain ShardByJaxProcess).")
    return list(shard_paths[process_index::process_count])


def _split_key(name: str) -> tuple[str, str]:
    """("dir/000123", "jpg") from "dir/000123.jpg": the webdataset rule, split at the first "."
    of the file name so "a.b.c.json" has key "a" and extension "b.c.json"."""
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


def _index_shard(path: str, shard: int) -> tuple[list[_Sample], int]:
    """(complete samples, number of incomplete samples) of one shard, in tar order."""
    if path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        raise ValueError(f"Shard {path!r} is compressed; random access needs plain .tar shards. "
                         "Decompress it (images are already compressed, so little is lost).")
    members: dict[str, dict[str, _Member]] = {}
    with tarfile.open(path, mode="r:") as archive:
        for info in archive:
            if not info.isfile():
                continue
            key, extension = _split_key(info.name)
            members.setdefault(key, {})[extension] = _Member(shard, info.offset_data, info.size)
    samples, incomplete = [], 0
    for key, parts in members.items():
        image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image is None or ("txt" not in parts and "json" not in parts):
            incomplete += 1
            continue
        samples.append(_Sample(key, image, parts.get("txt"), parts.get("json")))
    return samples, incomplete


class WebDatasetSource:
    """Records {"image": bytes, "captions": [...], "id": key} from img2dataset-style tar shards.

    Samples lacking an image or a caption file are left out at indexing and counted in
    `num_incomplete`. A caption file that turns out empty or unreadable gives captions == [""]
    (the contract promises at least one caption; the pipeline may count and skip those).
    """

    def __init__(self, shards: str | Sequence[str]):
        self.shard_paths = expand_shard_paths(shards)
        self._samples: list[_Sample] = []
        self.num_incomplete = 0
        for shard, path in enumerate(self.shard_paths):
            samples, incomplete = _index_shard(path, shard)
            self._samples += samples
            self.num_incomplete += incomplete
        self._open_files: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def _read(self, member: _Member) -> bytes:
        file = self._open_files.get(member.shard)
        if file is None:
            file = self._open_files[member.shard] = open(self.shard_paths[member.shard], "rb")
        file.seek(member.offset)
        return file.read(member.size)

    def _metadata(self, sample: _Sample) -> dict:
        if sample.json is None:
            return {}
        try:
            metadata = json.loads(self._read(sample.json))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return metadata if isinstance(metadata, dict) else {}

    def _captions(self, sample: _Sample, metadata: dict) -> list[str]:
        """A json "captions" list (all of an image's captions, as tools/convert.py writes), else
        the .txt caption, else the json "caption"."""
        captions = metadata.get("captions")
        if isinstance(captions, list) and captions:
            return [str(caption).strip() for caption in captions]
        if sample.text is not None:
            return [self._read(sample.text).decode("utf-8", errors="replace").strip()]
        caption = metadata.get("caption")
        return [caption.strip()] if isinstance(caption, str) else [""]

    def __getitem__(self, index: int) -> dict:
        """{"image": bytes, "captions": [...], "id": the json "id" if any, else the tar key}."""
        if not -len(self._samples) <= index < len(self._samples):
            raise IndexError(f"Index {index} out of range for a source of {len(self)} records.")
        sample = self._samples[index]
        metadata = self._metadata(sample)
        return {"image": self._read(sample.image), "captions": self._captions(sample, metadata),
                "id": str(metadata.get("id", sample.key))}

    def __getstate__(self) -> dict:
        # Open file handles cannot cross into grain's worker processes; each reopens its own.
        state = dict(self.__dict__)
        state["_open_files"] = {}
        return state

    def __del__(self):
        for file in getattr(self, "_open_files", {}).values():
            file.close()

    def __repr__(self) -> str:
        return (f"WebDatasetSource({len(self.shard_paths)} shards, {len(self)} samples, "
                f"{self.num_incomplete} incomplete)")
