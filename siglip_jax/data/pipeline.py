"""grain input pipelines: records from a source -> one sampled caption -> decoded, transformed image
-> token ids -> per-process batches. Training is index-based and seeded end to end (shuffle, caption
choice, crops), so a position in the stream is a small iterator state that checkpoints save and restore.

A record that cannot be used (an unreadable image, no non-empty caption) is skipped, named in the log
and counted in each batch's "num_skipped" (the running total of this process), never a crash.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator

import grain
import numpy as np

from siglip_jax.data import images

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    image_size: int
    random_crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction range; (1, 1) = whole image
    random_flip: bool = False


class TrainExample(grain.transforms.RandomMap):
    """Record -> {"images": uint8 [s, s, 3], "tokens": int32 [l]}, one non-empty caption drawn at random
    (a different one each epoch: the random stream is seeded by the element's global index), or
    {"skipped": reason} when the record is unusable."""

    def __init__(self, tokenizer: Callable, options: ImageOptions):
        self.tokenizer = tokenizer
        self.options = options

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        record_id = record.get("id", "?")
        captions = [caption for caption in record.get("captions", ()) if caption and caption.strip()]
        if not captions:
            return {"skipped": f"record {record_id}: no non-empty caption"}
        caption = captions[rng.integers(len(captions))]
        try:
            image = images.decode_image(record["image"])
        except images.DecodeError as error:
            return {"skipped": f"record {record_id}: {error}"}
        scale = tuple(self.options.random_crop_scale)
        ratio = (1.0, 1.0) if scale == (1.0, 1.0) else (3 / 4, 4 / 3)
        image = images.train_transform(
            image, self.options.image_size, rng, scale=scale, ratio=ratio, flip=self.options.random_flip
        )
        return {"images": image, "tokens": self.tokenizer([caption])[0]}


class _SkipAndBatchIterator(grain.DatasetIterator):
    """Drops skipped examples (logging each), stacks the rest into batches of `batch_size` and adds the
    running count of skipped examples. Its state is the parent's plus that count."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._num_skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        while len(examples) < self._batch_size:
            example = next(self._parent)
            if "skipped" in example:
                self._num_skipped += 1
                logger.warning("Skipped a training example (%d so far): %s", self._num_skipped, example["skipped"])
                continue
            examples.append(example)
        return {
            "images": np.stack([example["images"] for example in examples]),
            "tokens": np.stack([example["tokens"] for example in examples]),
            "num_skipped": np.int64(self._num_skipped),
        }

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "num_skipped": self._num_skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._num_skipped = int(state["num_skipped"])


class _SkipAndBatch(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> _SkipAndBatchIterator:
        return _SkipAndBatchIterator(self._parent.__iter__(), self._batch_size)


def train_batches(
    source: Any,
    *,
    tokenizer: Callable,
    options: ImageOptions,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    prefetch_batches: int = 2,
) -> grain.DatasetIterator:
    """An endless iterator of this process's batches {"images", "tokens", "num_skipped"};
    `get_state()` / `set_state()` save and restore its position.

    Each process reads the elements `process_index::process_count` of one global, per-epoch reshuffled
    order, so together the processes see every record once per epoch.
    """
    if len(source) < process_count * local_batch_size:
        raise ValueError(
            f"The training source has {len(source)} records, fewer than one global batch "
            f"({process_count} x {local_batch_size}); use a smaller data.batch_size or more data."
        )
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    # Random before slicing: grain seeds each element by its index in the dataset it maps, so this way
    # record k of the global order gets the same caption and crop whatever the process count.
    dataset = dataset.random_map(TrainExample(tokenizer, options), seed=seed)
    dataset = dataset[process_index::process_count]
    iterable = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch_batches * local_batch_size)
    )
    if num_workers > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(_SkipAndBatch(iterable, local_batch_size))


def eval_records(
    source: Any, image_size: int, num_records: int | None = None
) -> Iterator[tuple[np.ndarray, list[str], dict]]:
    """(image uint8 [s, s, 3], non-empty captions, record) for each usable record of the first
    `num_records` (default all), in order; unreadable images are logged and left out."""
    for index in range(len(source) if num_records is None else num_records):
        record = source[index]
        try:
            image = images.eval_transform(images.decode_image(record["image"]), image_size)
        except images.DecodeError as error:
            logger.warning("Skipped eval record %s: %s", record.get("id", index), error)
            continue
        captions = [caption for caption in record.get("captions", ()) if caption and caption.strip()]
        yield image, captions, record
