"""Streaming WebDataset shards (the img2dataset layout) for training at scale: each process, and each
data worker within it, opens only its own shards and reads them front to back, so start-up costs the
same for 10 shards or 100,000 and no index of members is ever built.

    source_config("webdataset_stream", shards="gs://bucket/laion/{00000..09999}.tar",
                  shuffle_buffer=2000, open_shards=8, resampled=False)

Order, per (seed, epoch): the shard list is permuted (or, with `resampled=True`, drawn with replacement,
as open_clip's --dataset-resampled); shard g of that order goes to process g % P and, within it, to
worker (g // P) % W. A worker keeps `open_shards` shards open, takes one sample from each in turn, and
shuffles blocks of `shuffle_buffer` samples, so a batch mixes shards. A block is a deterministic
function of the position where it started, so the position saved in checkpoints is small: the cursor
into the shard order, each open shard's (epoch, slot, samples read) when the block began, the block
counter (which seeds the block's permutation) and how many of its samples were handed out.
"""
from __future__ import annotations

import json
import os
import tarfile
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from etils import epath

from siglip_jax.data.sources.webdataset import IMAGE_EXTENSIONS, _expand_braces, _split_key
from siglip_jax.runtime import storage

STATE_KIND = "shards"


def expand_patterns(shards: str | Sequence[str]) -> list[str]:
    """Shard names from brace ranges ("dir/{00000..09999}.tar") or a list of patterns, expanded from
    the names alone (nothing is listed, so it costs the same on a bucket); globs ("dir/*.tar") are
    listed and sorted. Checks only that the first shard exists: one request, whatever the count."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths: list[str] = []
    for pattern in patterns:
        for name in _expand_braces(os.fspath(pattern)):
            if any(char in name for char in "*?["):
                directory, glob_pattern = name.rsplit("/", 1) if "/" in name else (".", name)
                matches = sorted(str(path) for path in epath.Path(directory).glob(glob_pattern))
                if not matches:
                    raise FileNotFoundError(f"No shard matches {name!r}; check the directory and the pattern.")
                paths += matches
            else:
                paths.append(name)
    if not paths:
        raise ValueError(f"No shards given ({shards!r}); pass a pattern like 'dir/{{00000..00099}}.tar' or a list.")
    try:
        first_exists = storage.with_retries(epath.Path(paths[0]).exists, f"Looking up the first shard {paths[0]}")
    except Exception as error:  # noqa: BLE001 -- no credentials, no network: each library raises its own
        if not storage.is_remote(paths[0]):
            raise
        raise PermissionError(f"Cannot read the first shard {paths[0]!r} of {shards!r} ({type(error).__name__}: {error}). "
                              f"{storage.bucket_hint(paths[0])}") from error
    if not first_exists:
        raise FileNotFoundError(
            f"The first shard {paths[0]!r} of {shards!r} does not exist ({len(paths)} names from the pattern). "
            "Check the path, the brace range and, for gs:// or s3://, the bucket name and credentials."
        )
    return paths


def _record(key: str, parts: dict[str, bytes], shard: str) -> dict:
    """A record from one sample's members: image bytes, captions (a json "captions" list, else the .txt,
    else the json "caption") and id; with "error" set when the sample has no image or no caption."""
    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    metadata: Any = {}
    if "json" in parts:
        try:
            metadata = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            metadata = {}
        metadata = metadata if isinstance(metadata, dict) else {}
    captions = metadata.get("captions")
    if isinstance(captions, list) and captions:
        captions = [str(caption).strip() for caption in captions]
    elif "txt" in parts:
        captions = [parts["txt"].decode("utf-8", errors="replace").strip()]
    elif isinstance(metadata.get("caption"), str):
        captions = [metadata["caption"].strip()]
    else:
        captions = []
    record = {"image": image, "captions": captions, "id": str(metadata.get("id", key)), "shard": shard}
    if image is None:
        record["error"] = f"sample {key} of shard {shard} has no image member ({', '.join(sorted(parts))})"
    elif not captions:
        record["error"] = f"sample {key} of shard {shard} has no caption (.txt or .json)"
    return record


def read_shard(path: str, skip: int = 0) -> Iterator[dict]:
    """The records of one tar (or .tar.gz) shard, read sequentially, after the first `skip` samples
    (members sharing a key are one sample, as webdataset expects them adjacent). A truncated or
    unreadable shard ends early with one record whose "error" says so (it takes a sample's place in
    the position, so a resumed run does not count it twice); the samples read before stay valid."""
    key, parts, index = None, {}, 0
    try:
        opened = storage.with_retries(lambda: epath.Path(path).open("rb"), f"Opening shard {path}")
        with opened as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for info in archive:
                if not info.isfile():
                    continue
                member_key, extension = _split_key(info.name)
                if member_key != key:
                    if key is not None:
                        if index >= skip:
                            yield _record(key, parts, path)
                        index += 1
                    key, parts = member_key, {}
                if index >= skip:  # skipped samples are passed over without reading their bytes
                    parts[extension] = archive.extractfile(info).read()
            if archive.fileobj.tell() == archive.offset:
                # tarfile ends quietly at a missing header; a complete tar ends with a zero block instead
                raise tarfile.ReadError("no end-of-archive block: the file was cut short")
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        if index >= skip:
            yield {"image": None, "captions": [], "id": f"{path}#{index}", "shard": path,
                   "error": f"Shard {path} is truncated or unreadable after {index} samples ({type(error).__name__}: "
                            f"{error}); going on with the next shard"}
        return
    if key is not None and index >= skip:
        yield _record(key, parts, path)


def worker_order(num_shards: int, seed: int, epoch: int, resampled: bool, slot: int, num_slots: int) -> np.ndarray:
    """[positions in the epoch's global order, shard ids] of one worker: every num_slots-th of the
    epoch's permutation (or draw with replacement) of the shards, from `slot`."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.integers(0, num_shards, num_shards) if resampled else rng.permutation(num_shards)
    positions = np.arange(slot, num_shards, num_slots)
    return np.stack([positions, order[positions]])


class ShardStream(grain.IterDataset):
    """Endless (or `num_epochs`) records of one process's share of the shards; see the module doc."""

    def __init__(self, shard_paths: Sequence[str], *, seed: int, process_index: int, process_count: int,
                 shuffle_buffer: int, open_shards: int, resampled: bool, num_epochs: int = 0):
        super().__init__()
        self.shard_paths = list(shard_paths)
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.shuffle_buffer, self.open_shards = max(1, shuffle_buffer), max(1, open_shards)
        self.resampled, self.num_epochs = resampled, num_epochs
        self.worker_index, self.worker_count = 0, 1
        self._check_enough_shards()

    def _check_enough_shards(self) -> None:
        slots = self.process_count * self.worker_count
        if len(self.shard_paths) < slots:
            raise ValueError(
                f"{len(self.shard_paths)} shards cannot feed {self.process_count} processes x {self.worker_count} "
                "data workers: some would read nothing. Write more, smaller shards (tools/convert.py "
                "--shard_size) or lower data.num_workers."
            )

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's mp_prefetch gives worker i of W the slice (i, None, W): it reads every W-th of this
        process's shards."""
        del sequential_slice
        self.worker_index, self.worker_count = sl.start or 0, sl.step or 1
        self._check_enough_shards()

    @property
    def slot(self) -> tuple[int, int]:
        """(this worker's slot, number of slots) in the global shard order."""
        return self.process_index + self.process_count * self.worker_index, self.process_count * self.worker_count

    def __iter__(self) -> "ShardStreamIterator":
        return ShardStreamIterator(self)

    def __str__(self) -> str:
        return f"ShardStream({len(self.shard_paths)} shards, process {self.process_index}/{self.process_count})"


class ShardStreamIterator(grain.DatasetIterator):
    """Records with "epoch" and "seed" ([epoch, order position, sample], for per-example randomness)."""

    def __init__(self, stream: ShardStream):
        super().__init__()
        self._stream = stream
        self._orders: dict[int, np.ndarray] = {}
        self.set_state(fresh_state(0))

    # ---- position --------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            stream = self._stream
            self._orders = {epoch: worker_order(len(stream.shard_paths), stream.seed, epoch, stream.resampled, *stream.slot)}
        return self._orders[epoch]

    def _next_shard(self, cursor: list[int]) -> list[int] | None:
        """[epoch, index in the worker's order, samples read] of the shard at `cursor`, advancing it."""
        epoch, index = cursor
        if index >= self._order(epoch).shape[1]:
            epoch, index = epoch + 1, 0
        if self._stream.num_epochs and epoch >= self._stream.num_epochs:
            return None
        cursor[:] = [epoch, index + 1]
        return [epoch, index, 0]

    def _open(self, slot: list[int]) -> Iterator[dict]:
        epoch, index, read = slot
        position, shard = self._order(epoch)[:, index]
        path = self._stream.shard_paths[shard]
        for sample, record in enumerate(read_shard(path, skip=read), start=read):
            record["epoch"], record["seed"] = epoch, [epoch, int(position), sample]
            yield record

    def _fill(self) -> None:
        """Reads the block that starts at the saved position and permutes it."""
        state = self._state
        if state["slots"] is None:  # a fresh start: open the first shards
            self._readers = None
            state["slots"] = [slot for slot in (self._next_shard(state["cursor"]) for _ in range(self._stream.open_shards)) if slot]
        slots = [list(slot) for slot in state["slots"]]
        cursor, turn = list(state["cursor"]), state["turn"]
        if self._readers is not None:  # the shards stay open from one block to the next
            readers = self._readers
        else:  # after set_state: reopen each shard and pass over the samples already read
            readers = [self._open(slot) for slot in slots]
        block: list[dict] = []
        while len(block) < self._stream.shuffle_buffer and slots:
            turn %= len(slots)
            record = next(readers[turn], None)
            if record is None:  # this shard is done: the next one takes its place
                replacement = self._next_shard(cursor)
                if replacement is None:
                    del slots[turn], readers[turn]
                else:
                    slots[turn], readers[turn] = replacement, self._open(replacement)
                continue
            slots[turn][2] += 1
            block.append(record)
            turn += 1
        rng = np.random.default_rng([self._stream.seed, *self._stream.slot, state["block"]])
        self._block = [block[i] for i in rng.permutation(len(block))]
        self._after_block = {"cursor": cursor, "slots": slots, "turn": turn, "block": state["block"] + 1, "taken": 0}
        self._readers = readers

    def __next__(self) -> dict:
        if self._block is None:
            self._fill()
        if self._state["taken"] >= len(self._block):
            if not self._block:
                raise StopIteration
            self._state = json.loads(json.dumps({"kind": STATE_KIND, **self._after_block}))
            self._fill()
            if not self._block:
                raise StopIteration
        record = self._block[self._state["taken"]]
        self._state["taken"] += 1
        return record

    def get_state(self) -> dict[str, Any]:
        state = json.loads(json.dumps(self._state))
        state["process"] = [self._stream.process_index, self._stream.process_count]
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != STATE_KIND:
            raise ValueError(f"Not a shard stream position: {state!r}. Was the checkpoint made with another data.train?")
        self._state = json.loads(json.dumps({key: state[key] for key in ("kind", "cursor", "slots", "turn", "block", "taken")}))
        self._block, self._readers = None, None


def fresh_state(epoch: int) -> dict[str, Any]:
    """The position at the start of `epoch`, before any shard is open."""
    return {"kind": STATE_KIND, "cursor": [epoch, 0], "slots": None, "turn": 0, "block": 0, "taken": 0}


def state_epoch(state: dict[str, Any]) -> int:
    """The latest epoch a saved position has reached."""
    return max([state["cursor"][0]] + [slot[0] for slot in state["slots"] or ()])


class WebDatasetStreamSource:
    """Configuration of a streaming shard source; `stream(...)` gives a process its ShardStream.

    shards: brace pattern(s) or a list; shuffle_buffer: samples per shuffled block; open_shards: shards
    read at once by each worker; resampled: draw shards with replacement each epoch.
    """

    def __init__(self, shards: str | Sequence[str], shuffle_buffer: int = 1000, open_shards: int = 4,
                 resampled: bool = False):
        self.shard_paths = expand_patterns(shards)
        self.shuffle_buffer, self.open_shards, self.resampled = int(shuffle_buffer), int(open_shards), bool(resampled)

    def stream(self, *, seed: int, process_index: int, process_count: int, num_epochs: int = 0) -> ShardStream:
        return ShardStream(self.shard_paths, seed=seed, process_index=process_index, process_count=process_count,
                           shuffle_buffer=self.shuffle_buffer, open_shards=self.open_shards,
                           resampled=self.resampled, num_epochs=num_epochs)

    def __repr__(self) -> str:
        return f"WebDatasetStreamSource({len(self.shard_paths)} shards)"
