"""grain input pipelines: records from a source -> one sampled caption -> image transform -> token ids
-> per-process batches. Training is index-based and seeded end to end (shuffle, caption choice, crops),
so a position in the stream is a small iterator state that checkpoints can save and restore.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import grain
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    image_size: int
    random_crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction range; (1, 1) = no crop
    random_flip: bool = False


def _as_uint8_rgb(image: Any) -> np.ndarray:
    """Records hold either a decoded uint8 array or encoded image bytes."""
    if isinstance(image, np.ndarray):
        return image
    from siglip_jax.data import images  # the decoder lives with the image transforms

    return images.decode_image(image)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, reducing_gap=None))


def _random_resized_crop(image: np.ndarray, options: ImageOptions, rng: np.random.Generator) -> np.ndarray:
    low, high = options.random_crop_scale
    if (low, high) != (1.0, 1.0):
        height, width = image.shape[:2]
        area = rng.uniform(low, high) * height * width
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        top = rng.integers(0, height - crop_h + 1)
        left = rng.integers(0, width - crop_w + 1)
        image = image[top : top + crop_h, left : left + crop_w]
    image = _resize(image, options.image_size)
    if options.random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


class TrainExample(grain.transforms.RandomMap):
    """Record -> {"images": uint8 [s, s, 3], "tokens": int32 [l]} with one caption drawn at random (a
    different one each epoch, since the random stream is seeded by the element's global index)."""

    def __init__(self, tokenizer: Callable, options: ImageOptions):
        self.tokenizer = tokenizer
        self.options = options

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        captions = record["captions"]
        caption = captions[rng.integers(len(captions))]
        image = _random_resized_crop(_as_uint8_rgb(record["image"]), self.options, rng)
        return {"images": image, "tokens": self.tokenizer([caption])[0]}


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
    """An endless iterator of this process's batches; `get_state()`/`set_state()` save its position.

    Each process reads the records `process_index::process_count` of a globally shuffled order, so the
    processes together see every record once per epoch.
    """
    if len(source) < process_count * local_batch_size:
        raise ValueError(
            f"The training source has {len(source)} records, fewer than one global batch "
            f"({process_count} x {local_batch_size}); use a smaller data.batch_size or more data."
        )
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    dataset = dataset[process_index::process_count]
    dataset = dataset.random_map(TrainExample(tokenizer, options), seed=seed)
    dataset = dataset.batch(local_batch_size, drop_remainder=True)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(iterable)


def eval_records(source: Any, image_size: int) -> Iterator[tuple[np.ndarray, list[str], str]]:
    """(image uint8 [s, s, 3], captions, id) for every record, in order."""
    for index in range(len(source)):
        record = source[index]
        yield _resize(_as_uint8_rgb(record["image"]), image_size), list(record["captions"]), record["id"]
