"""Training batches from record streams (shard streams, mixtures, random-access sources read in epochs):
records -> examples (bad records skipped, counted and named in the log) -> batches, with a position that
checkpoints save and restore through grain's iterator-state handler, like the index-based pipeline.

A stream is anything with `stream(seed=, process_index=, process_count=, num_epochs=)` returning a grain
IterDataset of records whose iterator has get_state/set_state; each record carries "seed" (a list of
ints, unique in the stream) from which its caption choice and crop are drawn, so a resumed run makes
the same examples.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Sequence

import grain
import numpy as np

from siglip_jax.data import preprocess
from siglip_jax.data.sources import shard_stream

logger = logging.getLogger(__name__)

MAP_STATE_KIND = "map_epochs"


def is_stream(source: Any) -> bool:
    return hasattr(source, "stream")


class MapRecordStream(grain.IterDataset):
    """A random-access source read as a stream: a fresh permutation each epoch, record i of it to
    process i % P (and worker (i // P) % W); for mixing such sources with shard streams."""

    def __init__(self, source: Any, *, seed: int, process_index: int, process_count: int, num_epochs: int = 0):
        super().__init__()
        if len(source) < process_count:
            raise ValueError(f"A source of {len(source)} records cannot feed {process_count} processes.")
        self.source, self.seed, self.num_epochs = source, seed, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.worker_index, self.worker_count = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice
        self.worker_index, self.worker_count = sl.start or 0, sl.step or 1

    def __iter__(self) -> "_MapRecordIterator":
        return _MapRecordIterator(self)


class _MapRecordIterator(grain.DatasetIterator):
    def __init__(self, stream: MapRecordStream):
        super().__init__()
        self._stream = stream
        self._epoch, self._index, self._order = 0, 0, None

    def _positions(self) -> np.ndarray:
        if self._order is None:
            stream = self._stream
            order = np.random.default_rng([stream.seed, self._epoch]).permutation(len(stream.source))
            slot, num_slots = stream.process_index + stream.process_count * stream.worker_index, stream.process_count * stream.worker_count
            self._order = order[slot::num_slots]
        return self._order

    def __next__(self) -> dict:
        if self._index >= len(self._positions()):
            if self._stream.num_epochs and self._epoch + 1 >= self._stream.num_epochs:
                raise StopIteration
            self._epoch, self._index, self._order = self._epoch + 1, 0, None
        record = dict(self._stream.source[int(self._positions()[self._index])])
        record["epoch"], record["seed"] = self._epoch, [self._epoch, int(self._positions()[self._index])]
        self._index += 1
        return record

    def get_state(self) -> dict[str, Any]:
        return {"kind": MAP_STATE_KIND, "epoch": self._epoch, "index": self._index}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._index, self._order = int(state["epoch"]), int(state["index"]), None


UNNAMED_SOURCE = "(no shard)"  # where a skipped record that came from no shard (a random-access source) is counted


class StreamExamples(grain.IterDataset):
    """Records -> examples {"images", "tokens", "num_skipped", "skipped_shards", "epoch"}; an unusable
    record (no image, no caption, an unreadable or non-image member, a truncated or unreadable shard) is
    named in the log and passed over, and the next example counts it in "num_skipped" and names its
    shard in "skipped_shards" (one line per skipped record, "" when none), so batches keep their size
    and the trainer can count skips per shard."""

    def __init__(self, records: grain.IterDataset, make: Callable[[dict, np.random.Generator], dict | str], seed: int):
        super().__init__(records)
        self.make, self.seed = make, seed

    def __iter__(self) -> "_ExamplesIterator":
        return _ExamplesIterator(self._parent.__iter__(), self)


class _ExamplesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, dataset: StreamExamples):
        super().__init__(parent)
        self._dataset = dataset

    def __next__(self) -> dict:
        def make(record: dict) -> dict | str:
            example = record.get("error") or self._dataset.make(record, np.random.default_rng([self._dataset.seed, *record["seed"]]))
            if not isinstance(example, str):
                example["epoch"] = np.int32(record["epoch"])
            return example

        example, passed_over = preprocess.first_usable_example(self._parent, make)
        example["skipped_shards"] = np.str_("\n".join(record.get("shard", UNNAMED_SOURCE) for record in passed_over))
        return example

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()  # skipping is deterministic: the records' position is the whole state

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def stream_batches(
    source: Any,
    *,
    tokenizer: Callable,
    options: preprocess.ImageOptions,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
) -> grain.DatasetIterator:
    """An endless iterator of this process's batches {"images", "tokens", "num_skipped", "skipped_shards",
    "epoch"} from a stream source (see StreamExamples); `get_state()` / `set_state()` save and restore its
    exact position."""
    records = source.stream(seed=seed, process_index=process_index, process_count=process_count)

    def make(record: dict, rng: np.random.Generator) -> dict | str:
        return preprocess.make_example(record, rng, tokenizer, options)

    batches = StreamExamples(records, make, seed).batch(local_batch_size, drop_remainder=True)
    if num_workers > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(batches)


def count_skipped_by_shard(skipped_shards: np.ndarray, counts: collections.Counter) -> None:
    """Adds a batch's "skipped_shards" ([batch] strings, one shard name a line per skipped record) to
    `counts` (shard name -> records skipped)."""
    for names in skipped_shards.reshape(-1):
        counts.update(name for name in str(names).split("\n") if name)


# ---- A changed process count on resume ------------------------------------------------------------


def is_stream_state(state: Any) -> bool:
    return isinstance(state, dict) and state.get("kind") in (shard_stream.STATE_KIND, MAP_STATE_KIND, "mixture")


def stream_state_epoch(state: dict[str, Any]) -> int:
    if state["kind"] == shard_stream.STATE_KIND:
        return shard_stream.state_epoch(state)
    if state["kind"] == MAP_STATE_KIND:
        return int(state["epoch"])
    return max(stream_state_epoch(child) for child in state["sources"].values())


def _at_epoch(state: dict[str, Any], epoch: int) -> dict[str, Any]:
    if state["kind"] == shard_stream.STATE_KIND:
        return shard_stream.fresh_state(epoch)
    if state["kind"] == MAP_STATE_KIND:
        return {"kind": MAP_STATE_KIND, "epoch": epoch, "index": 0}
    return {**state, "count": 0, "sources": {name: _at_epoch(child, epoch) for name, child in state["sources"].items()}}


def redistribute_stream_states(states: dict[int, Any], process_count: int) -> list[Any]:
    """Positions for `process_count` processes after a run with another number of processes stopped at
    `states`: every process starts the epoch after the latest one any saved process had reached (shards
    are assigned by process count, so a partly read epoch cannot be split anew). Nothing is read twice;
    the rest of the interrupted epoch is left out. The same holds for each source of a mixture."""
    for index, state in states.items():
        if not is_stream_state(state):
            raise ValueError(
                f"Cannot move process {index}'s data position {state!r} to {process_count} processes; with "
                "data.num_workers > 0 resume with the saved process count, or set data.num_workers=0 first."
            )
    next_epoch = max(stream_state_epoch(state) for state in states.values()) + 1
    template = states[min(states)]
    return [_at_epoch(template, next_epoch) for _ in range(process_count)]


__all__: Sequence[str] = ["MapRecordStream", "StreamExamples", "count_skipped_by_shard", "is_stream", "redistribute_stream_states",
                          "stream_batches"]
