"""Zero-shot classification: prompt-ensembled class embeddings and blockwise accuracy on device.

A class is represented by the average of its prompts' embeddings (CLIP, Radford et al. 2021, sec.
3.1.4): each prompt "a photo of a {}." is filled with the class name, embedded, L2-normalised,
averaged over templates and renormalised. Normalising before averaging gives every template an
equal vote whatever the norm the text tower gives it.

Accuracy uses the same pessimistic tie rule as retrieval: the true class's rank is
1 + #{other classes scoring >= it}, so an image whose scores are all equal is wrong at top-1.
"""
import pathlib
from typing import Callable, Sequence

import numpy as np

from siglip_jax.inference import blockwise
from siglip_jax.models import two_towers

# The 80 ImageNet prompt templates of CLIP's zero-shot notebook, in its order.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

CLASS_NAME_SLOT = "{}"


def _check_templates(templates: Sequence[str], source: str) -> tuple[str, ...]:
    templates = tuple(templates)
    if not templates:
        raise ValueError(f"No prompt templates in {source}; give at least one, e.g. 'a photo of a {{}}.'.")
    for line_number, template in enumerate(templates, start=1):
        if not isinstance(template, str) or CLASS_NAME_SLOT not in template:
            raise ValueError(
                f"Template {line_number} of {source} is {template!r}, which has no '{{}}' for the class "
                "name. Write it like 'a photo of a {}.'.")
    return templates


def load_templates(path: str | pathlib.Path) -> tuple[str, ...]:
    """Reads prompt templates, one per line, each with '{}' where the class name goes.

    Blank lines are skipped; surrounding whitespace is stripped.
    """
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    numbered = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    for line_number, template in numbered:
        if CLASS_NAME_SLOT not in template:
            raise ValueError(
                f"{path}, line {line_number}: template {template!r} has no '{{}}' for the class name. "
                "Write one template per line like 'a photo of a {}.'.")
    return _check_templates([template for _, template in numbered], str(path))


def class_text_embeddings(encode_texts: Callable[[list[str]], np.ndarray],
                          class_names: Sequence[str],
                          templates: Sequence[str] = IMAGENET_TEMPLATES) -> np.ndarray:
    """Prompt-ensembled, unit-length embedding of each class.

    Args:
      encode_texts: maps a list of n strings to their [n, width] embeddings (numpy or jax);
        called once per class with that class's filled-in templates.
      class_names: C names, in label order.
      templates: prompt templates with '{}' for the class name.
    Returns:
      [C, width] float32, each row unit length.
    """
    templates = _check_templates(templates, "templates")
    class_names = list(class_names)
    if not class_names:
        raise ValueError("class_names is empty; pass the dataset's class names in label order.")
    class_embeddings = []
    for class_name in class_names:
        prompts = [template.replace(CLASS_NAME_SLOT, class_name) for template in templates]
        prompt_embeddings = np.asarray(encode_texts(prompts), dtype=np.float32)
        if prompt_embeddings.ndim != 2 or prompt_embeddings.shape[0] != len(prompts):
            raise ValueError(
                f"encode_texts returned shape {prompt_embeddings.shape} for {len(prompts)} prompts of "
                f"class {class_name!r}; it must return [num_prompts, width], one row per prompt.")
        prototype = np.asarray(two_towers.l2_normalize(prompt_embeddings)).mean(axis=0)
        class_embeddings.append(np.asarray(two_towers.l2_normalize(prototype)))
    return np.stack(class_embeddings)


def classification_metrics(image_embeddings, labels, class_embeddings, ks: Sequence[int] = (1, 5),
                           block_size: int | None = None, normalize: bool = True) -> dict[str, float]:
    """Zero-shot accuracy of images against class embeddings, blockwise on device.

    Args:
      image_embeddings: [num_images, width].
      labels: [num_images] int in [0, C).
      class_embeddings: [C, width], e.g. from class_text_embeddings.
      ks: the K of top-K accuracy (K >= C counts every image as correct).
      block_size: images per device block; None keeps a block of scores under 256 MiB.
      normalize: cosine similarity (True) or raw dot product (False).
    Returns:
      {"top{K}" for K in ks, "mean_per_class_recall"} in [0, 1]. mean_per_class_recall is the top-1
      recall of each class averaged over the classes present in labels (classes with no image are
      left out, as sklearn's balanced_accuracy_score, which CLIP_benchmark reports, does).
    """
    blockwise.check_embeddings("image_embeddings", image_embeddings)
    blockwise.check_embeddings("class_embeddings", class_embeddings)
    blockwise.check_same_width("image_embeddings", image_embeddings, "class_embeddings", class_embeddings)
    ks = blockwise.check_ks(ks)
    num_classes = class_embeddings.shape[0]
    labels = blockwise.check_index_array(
        "labels", labels, image_embeddings.shape[0], num_classes, "class_embeddings")
    ranks = blockwise.positive_ranks(
        image_embeddings, labels, class_embeddings, np.arange(num_classes, dtype=np.int32),
        block_size, normalize, query_name="image_embeddings", gallery_name="class_embeddings")
    metrics = {f"top{k}": float(np.mean(ranks <= k)) for k in ks}
    correct_per_class = np.bincount(labels, weights=(ranks == 1), minlength=num_classes)
    images_per_class = np.bincount(labels, minlength=num_classes)
    present = images_per_class > 0
    metrics["mean_per_class_recall"] = float(np.mean(correct_per_class[present] / images_per_class[present]))
    return metrics
