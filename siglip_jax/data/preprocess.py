"""One record -> one model input: the image options of a model's tower, the deterministic eval view of a
decoded image (square, or NaFlex's packed patches) and a training example (a sampled caption, a random crop
and flip). Plain numpy and PIL, no grain: the model and the consumers of a trained model use it too."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Callable, Iterable

import numpy as np

from siglip_jax.data import images, naflex

logger = logging.getLogger(__name__)

MAX_UNUSABLE_IN_A_ROW = 1_000  # unusable training records in a row before the source is declared broken


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    image_size: int
    random_crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction range; (1, 1) = whole image
    random_flip: bool = False
    # NaFlex towers: > 0 gives packed [max_patches, p * p * 3 + 4] patches (data/naflex.py) instead of squares
    naflex_patch_size: int = 0
    naflex_max_patches: int = 0
    # SigLIP 2's self-distillation (model.distill): > 0 adds "local_images" [local_crops, s, s, 3], random crops
    # covering local_crop_scale of the image's area, seen at local_size pixels (flipped as the global view is)
    local_crops: int = 0
    local_size: int = 0
    local_crop_scale: tuple[float, float] = (0.05, 0.4)


def as_image_options(image_size: int | ImageOptions) -> ImageOptions:
    """A square image size as ImageOptions; ImageOptions as they are."""
    return image_size if isinstance(image_size, ImageOptions) else ImageOptions(image_size)


def eval_image_shape(image_size: int | ImageOptions) -> tuple[int, ...]:
    """The shape of one eval_view: [s, s, 3], or NaFlex's packed [max_patches, p * p * 3 + 4]."""
    options = as_image_options(image_size)
    if options.naflex_max_patches:
        return (options.naflex_max_patches, naflex.packed_channels(options.naflex_patch_size))
    return (options.image_size, options.image_size, 3)


def eval_view(image: np.ndarray, options: ImageOptions) -> np.ndarray:
    """The deterministic model input of a decoded image: the square eval view, or NaFlex's packed patches."""
    if options.naflex_max_patches:
        return naflex.naflex_transform(image, options.naflex_patch_size, options.naflex_max_patches)
    return images.eval_transform(image, options.image_size)


def make_example(record: dict, rng: np.random.Generator, tokenizer: Callable, options: ImageOptions,
                 local_crops: bool = True) -> dict | str:
    """The example {"images", "tokens"} (and "local_images" with options.local_crops) of a record, or why the
    record cannot give one. `local_crops` False gives zero local images of the same shape instead of cropping:
    before SigLIP 2's distillation starts the step does not read them, and cropping them would cost most of the
    pipeline's CPU."""
    record_id = record.get("id", "?")
    captions = [caption for caption in record.get("captions", ()) if caption and caption.strip()]
    if not captions:
        return f"record {record_id}: no non-empty caption"
    caption = captions[rng.integers(len(captions))]
    try:
        image = images.decode_image(record["image"])
    except images.DecodeError as error:
        return f"record {record_id}: {error}"
    if options.naflex_max_patches:
        # NaFlex keeps the whole image at its aspect ratio (SigLIP 2's recipe): no crop; flips only.
        if options.random_flip and rng.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
        try:
            return {"images": eval_view(image, options), "tokens": tokenizer([caption])[0]}
        except images.DecodeError as error:
            return f"record {record_id}: {error}"
    scale = tuple(options.random_crop_scale)
    if scale == (1.0, 1.0) and image.shape[:2] == (options.image_size,) * 2 and not options.random_flip:
        pixels = image  # already the model's size, nothing to crop (the demo data)
    else:
        ratio = (1.0, 1.0) if scale == (1.0, 1.0) else (3 / 4, 4 / 3)
        pixels = images.train_transform(
            image, options.image_size, rng, scale=scale, ratio=ratio, flip=options.random_flip
        )
    example = {"images": pixels, "tokens": tokenizer([caption])[0]}
    if options.local_crops and not local_crops:
        example["local_images"] = np.zeros((options.local_crops, options.local_size, options.local_size, 3), np.uint8)
    elif options.local_crops:  # drawn after the global view's, so that view is the same with or without them
        example["local_images"] = np.stack([
            images.train_transform(image, options.local_size, rng, scale=tuple(options.local_crop_scale),
                                   ratio=(3 / 4, 4 / 3), flip=options.random_flip)
            for _ in range(options.local_crops)])
    return example


def first_usable_example(records: Iterable[dict], make: Callable[[dict], dict | str]) -> tuple[dict, list[dict]]:
    """(the example `make` gives for the first usable record of `records`, the unusable records passed over
    before it). Each unusable record is named in the log; the example's "num_skipped" is how many were
    passed over, so summed over batches it counts the unusable records a run met (both training pipelines
    skip this way). Raises ValueError after MAX_UNUSABLE_IN_A_ROW unusable records in a row, StopIteration
    when the records end first."""
    passed_over: list[dict] = []
    why = ""
    for record in itertools.islice(records, MAX_UNUSABLE_IN_A_ROW):
        example = make(record)
        if not isinstance(example, str):
            example["num_skipped"] = np.int32(len(passed_over))
            return example, passed_over
        why = example
        logger.warning("Skipped a training record%s: %s", f" of {record['shard']}" if "shard" in record else "", why)
        passed_over.append(record)
    if len(passed_over) < MAX_UNUSABLE_IN_A_ROW:
        raise StopIteration  # a finite stream has ended
    raise ValueError(
        f"{len(passed_over)} training records in a row were unusable, the last: {why}. Check the source (paths, "
        "caption column) or convert it with tools/convert.py, which reports bad records."
    )
