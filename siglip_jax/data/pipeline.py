"""grain input pipelines: records from a source -> one sampled caption -> decoded, transformed image
-> token ids -> per-process batches. Training is index-based and seeded end to end (shuffle, caption
choice, crops), so a position in the stream is a small iterator state that checkpoints save and restore.

A record that cannot be used (an unreadable image, no non-empty caption) is skipped, named in the log
and counted in the "num_skipped" of the example that stands in for it (preprocess.first_usable_example),
never a crash.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable, Iterator

import grain
import numpy as np

from siglip_jax.data import images, preprocess, streaming

logger = logging.getLogger(__name__)


class TrainExamples:
    """Global stream position -> {"images": uint8 [s, s, 3], "tokens": int32 [l], "num_skipped": int32}.

    One non-empty caption is drawn at random, and the crop and flip, from a generator seeded by (seed,
    position): a different caption each epoch, and the same example whatever the number of processes
    (the position is global, counted before the stream is split). An unusable record (an unreadable image,
    no non-empty caption) is named in the log and replaced by the record one epoch further at the same
    position, a different and equally random one, so batches keep their size; "num_skipped" counts the
    records it replaced (preprocess.first_usable_example).
    """

    def __init__(self, records: grain.MapDataset, num_records: int, tokenizer: Callable,
                 options: preprocess.ImageOptions, seed: int, local_crops_from: int = 0):
        self.records = records
        self.num_records = num_records
        self.tokenizer = tokenizer
        self.options = options
        self.seed = seed
        self.local_crops_from = local_crops_from  # global position of the first example with real local crops

    def __call__(self, position: int, record: dict) -> dict:
        rng = np.random.default_rng([self.seed, position])
        # The record at this position, then the ones one, two, ... epochs further at the same position.
        later = (self.records[position + epochs * self.num_records] for epochs in itertools.count(1))
        local_crops = position >= self.local_crops_from
        example, _ = preprocess.first_usable_example(
            itertools.chain([record], later),
            lambda record: preprocess.make_example(record, rng, self.tokenizer, self.options, local_crops))
        return example


def train_batches(
    source: Any,
    *,
    tokenizer: Callable,
    options: preprocess.ImageOptions,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    prefetch_batches: int = 2,
    local_crops_from_batch: int = 0,
) -> grain.DatasetIterator:
    """An endless iterator of this process's batches {"images", "tokens", "num_skipped"} (the last, per
    example, the unusable records it replaced); `get_state()` / `set_state()` save and restore its
    position: {"next_index": batches read} with no workers. With `options.local_crops` also "local_images",
    zeros before global batch `local_crops_from_batch` (SigLIP 2's distillation reads them from its start step).

    Global batch b is positions [b x G, (b + 1) x G) of one global, per-epoch reshuffled order (G =
    n x local_batch_size), and process p of n reads its block [b x G + p x L, b x G + (p + 1) x L): the
    rows its devices hold when sharding.host_local_to_global stacks the processes' batches in process
    order. So a global batch holds the same examples in the same rows whatever n is (a multi-process run
    computes what one process computes, bit for bit), together the processes see every record once per
    epoch, and after b batches each they have used exactly the first b x G positions.
    """
    if streaming.is_stream(source):  # shard streams and mixtures: sequential, positioned by shard
        return streaming.stream_batches(
            source, tokenizer=tokenizer, options=options, local_batch_size=local_batch_size, seed=seed,
            process_index=process_index, process_count=process_count, num_workers=num_workers,
        )
    if len(source) < process_count * local_batch_size:
        raise ValueError(
            f"The training source has {len(source)} records, fewer than one global batch "
            f"({process_count} x {local_batch_size}); use a smaller data.batch_size or more data."
        )
    records = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    local_from = local_crops_from_batch * process_count * local_batch_size  # a global stream position
    examples = records.map_with_index(TrainExamples(records, len(source), tokenizer, options, seed, local_from))
    # Batching here, before the iterator, makes a whole batch one unit of work for the reading threads
    # and workers: the per-element cost of an iterator pipeline is larger than decoding a small image.
    # Batching before taking this process's share gives it a contiguous block of each global batch (lazily:
    # only its own blocks are ever decoded).
    batches = examples.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
    iterable = batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(iterable)


def redistribute_positions(states: dict[int, Any], process_count: int) -> list[Any]:
    """Data positions for `process_count` processes that go on with the training stream where the saved
    processes ({index: iterator state}) stopped: the one place a changed process count is handled.

    Index-based batches (train_batches): after b batches each, the processes together have used exactly
    the first b x global_batch positions of the global order for any process count (the global batch stays
    the same), so every new process continues at batch b, {"next_index": b}, and nothing is lost or
    repeated. Streams (streaming.redistribute_stream_states) restart at the next epoch.
    """
    saved_count = len(states)
    if any(streaming.is_stream_state(state) for state in states.values()):
        moved = streaming.redistribute_stream_states(states, process_count)
        logger.warning(
            "The data position was saved by %d processes and %d are running now: the stream goes on at the start "
            "of epoch %d (shards are dealt out by process count, so the rest of the interrupted epoch is left "
            "out; nothing is read twice).", saved_count, process_count, streaming.stream_state_epoch(moved[0]))
        return moved
    for index, state in states.items():
        if not (isinstance(state, dict) and set(state) == {"next_index"}):
            raise ValueError(
                f"Cannot move process {index}'s data iterator state {state!r} to {process_count} processes: "
                "only the in-process pipeline's {'next_index': N} can be redistributed (data.num_workers=0). "
                f"Resume with {saved_count} processes, or with data.num_workers=0 and then change the process count."
            )
    batches_read = {int(state["next_index"]) for state in states.values()}
    if len(batches_read) != 1:
        raise ValueError(f"The saved processes stopped at different batches {sorted(batches_read)}; the checkpoint is inconsistent.")
    (next_index,) = batches_read
    logger.warning(
        "The data position was saved by %d processes and %d are running now: every process goes on at batch %d "
        "of the same global order (nothing is left out or read twice).", saved_count, process_count, next_index)
    return [{"next_index": next_index} for _ in range(process_count)]


def eval_share(num_records: int, process_index: int, process_count: int) -> range:
    """The records [start, stop) process p of n reads of an eval set: contiguous, sizes differing by at
    most one, together every record once."""
    return range(process_index * num_records // process_count, (process_index + 1) * num_records // process_count)


def eval_records(
    source: Any, image_size: int | preprocess.ImageOptions, indices: Iterable[int] | None = None
) -> Iterator[tuple[int, np.ndarray, list[str], dict]]:
    """(index, image uint8 [s, s, 3] or NaFlex-packed (see preprocess.ImageOptions), non-empty captions, record) for
    each usable record among `indices` (default all), in order, read one at a time; unreadable images are
    logged and left out."""
    options = preprocess.as_image_options(image_size)
    for index in range(len(source)) if indices is None else indices:
        record = source[index]
        try:
            image = preprocess.eval_view(images.decode_image(record["image"]), options)
        except images.DecodeError as error:
            logger.warning("Skipped eval record %s: %s", record.get("id", index), error)
            continue
        captions = [caption for caption in record.get("captions", ()) if caption and caption.strip()]
        yield index, image, captions, record
