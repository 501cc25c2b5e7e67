"""Runs evaluations against model parameters: embeds a source's images and captions with the one
Embedder (siglip_jax.embedder, sharded over the mesh), then computes the metrics. Used by the trainer's
eval hook and by eval.py."""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from siglip_jax import losses, sharding
from siglip_jax.data import from_config, pipeline
from siglip_jax.data import images as image_ops
from siglip_jax.embedder import Embedder
from siglip_jax.evaluation import classification, fewshot, retrieval
from siglip_jax.models import two_towers
from siglip_jax.models.two_towers import param_shardings

logger = logging.getLogger(__name__)


class RetrievalSet:
    """A source's images and all their captions, preprocessed once and kept for repeated evals."""

    def __init__(self, source: Any, tokenizer: Callable, image_size: int, max_items: int = 0):
        images, captions, caption_image_ids = [], [], []
        self.num_records = min(len(source), max_items) if max_items else len(source)
        for image, image_captions, record in pipeline.eval_records(source, image_size, self.num_records):
            if not image_captions:
                logger.warning("Skipped retrieval record %s: it has no caption.", record.get("id"))
                continue
            caption_image_ids.extend([len(images)] * len(image_captions))
            images.append(image)
            captions.extend(image_captions)
        if not images:
            raise ValueError(f"The retrieval source {source!r} has no usable image with a caption.")
        self.num_skipped = self.num_records - len(images)
        self.images = np.stack(images)
        self.tokens = tokenizer(captions)
        self.caption_image_ids = np.asarray(caption_image_ids, np.int32)

    def evaluate(self, embedder: Embedder, params: Any) -> dict[str, float]:
        image_embeddings = embedder.images(params, self.images)
        text_embeddings = embedder.texts(params, self.tokens)
        metrics = retrieval.retrieval_metrics(image_embeddings, text_embeddings, self.caption_image_ids)
        return {**metrics, "num_images": float(len(self.images)), "num_skipped": float(self.num_skipped)}


class ClassificationSet:
    """Zero-shot classification: images of a labelled source against prompt-ensembled class embeddings."""

    def __init__(self, source: Any, tokenizer: Callable, image_size: int, class_names: list[str],
                 templates: tuple[str, ...], max_items: int = 0):
        self.num_records = min(len(source), max_items) if max_items else len(source)
        images, labels = [], []
        for image, _, record in pipeline.eval_records(source, image_size, self.num_records):
            images.append(image)
            labels.append(int(record["label"]))
        if not images:
            raise ValueError(f"The classification source {source!r} has no readable image.")
        self.num_skipped = self.num_records - len(images)
        self.images = np.stack(images)
        self.labels = np.asarray(labels, np.int32)
        self.class_names = list(class_names)
        self.templates = templates
        self.tokenizer = tokenizer

    def evaluate(self, embedder: Embedder, params: Any) -> dict[str, float]:
        class_embeddings = classification.class_text_embeddings(
            lambda prompts: embedder.texts(params, self.tokenizer(prompts)), self.class_names, self.templates
        )
        image_embeddings = embedder.images(params, self.images)
        metrics = classification.classification_metrics(image_embeddings, self.labels, class_embeddings)
        return {**metrics, "num_images": float(len(self.images)), "num_skipped": float(self.num_skipped)}


class ContrastiveLossSet:
    """Validation loss: the training loss (config.loss) of held-out image-caption pairs, in batches of the
    training batch size, so it is comparable with the training loss and shows overfitting.

    Each usable record gives one pair, its first non-empty caption (deterministic, and no image twice in a
    batch, where it would be its own negative); the last incomplete batch is left out, as training drops it.
    """

    def __init__(self, source: Any, tokenizer: Callable, image_size: int, batch_size: int,
                 loss_config: ml_collections.ConfigDict, max_items: int = 0):
        self.num_records = min(len(source), max_items) if max_items else len(source)
        images, captions = [], []
        for image, image_captions, record in pipeline.eval_records(source, image_size, self.num_records):
            if not image_captions:
                logger.warning("Skipped validation-loss record %s: it has no caption.", record.get("id"))
                continue
            images.append(image)
            captions.append(image_captions[0])
        num_batches = len(images) // batch_size
        if not num_batches:
            raise ValueError(
                f"The contrastive_loss source {source!r} has {len(images)} usable image-caption pairs, fewer "
                f"than one training batch (data.batch_size={batch_size}); give it more records (max_items=0 "
                "takes all) or evaluate a larger split."
            )
        self.num_skipped = self.num_records - len(images)
        self.batch_size = batch_size
        self.num_pairs = num_batches * batch_size
        self.images = np.stack(images[: self.num_pairs])
        self.tokens = tokenizer(captions[: self.num_pairs])
        self.loss_name = loss_config.name
        self.max_temperature = loss_config.max_temperature

    def evaluate(self, embedder: Embedder, params: Any) -> dict[str, float]:
        image_embeddings = embedder.images(params, self.images)
        text_embeddings = embedder.texts(params, self.tokens)
        log_temperature, bias = (np.asarray(params[key], np.float32) for key in ("t", "b"))
        batch_losses = [
            float(losses.contrastive_loss(
                image_embeddings[start:start + self.batch_size], text_embeddings[start:start + self.batch_size],
                log_temperature, bias, name=self.loss_name, max_temperature=self.max_temperature,
            ))
            for start in range(0, self.num_pairs, self.batch_size)
        ]
        return {"loss": float(np.mean(batch_losses)), "num_pairs": float(self.num_pairs),
                "num_skipped": float(self.num_skipped)}


def _labelled_images(source: Any, image_size: int, indices: Any) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for index in indices:
        record = source[int(index)]
        try:
            images.append(image_ops.eval_transform(image_ops.decode_image(record["image"]), image_size))
        except image_ops.DecodeError as error:
            logger.warning("Skipped few-shot record %s: %s", record.get("id", index), error)
            continue
        labels.append(int(record["label"]))
    return np.stack(images), np.asarray(labels, np.int32)


class FewShotSet:
    """Few-shot linear probe: ridge regression on frozen image embeddings of `shots` images per class of a
    labelled train source, accuracy on a test source (or, without one, on the train source's other images)."""

    def __init__(self, source: Any, test_source: Any | None, image_size: int, shots: int, l2_reg: float,
                 seed: int = 0, max_items: int = 0):
        self.class_names = _class_names(ml_collections.ConfigDict(dict(class_names="")), source)
        labels = np.asarray([int(source[index]["label"]) for index in range(len(source))])
        chosen = fewshot.select_shots(labels, shots, self.class_names, seed)
        self.train_images, self.train_labels = _labelled_images(source, image_size, chosen)
        if test_source is None:
            test_source, test_indices = source, np.setdiff1d(np.arange(len(source)), chosen)
        else:
            test_indices = np.arange(len(test_source))
        if max_items:
            test_indices = test_indices[:max_items]
        if not len(test_indices):
            raise ValueError(f"The few-shot eval has no test images: {source!r} holds only the {shots} shots per "
                             "class; give a test_source or more images.")
        self.test_images, self.test_labels = _labelled_images(test_source, image_size, test_indices)
        self.shots, self.l2_reg = shots, l2_reg

    def evaluate(self, embedder: Embedder, params: Any) -> dict[str, float]:
        accuracy = fewshot.fewshot_accuracy(
            embedder.images(params, self.train_images), self.train_labels,
            embedder.images(params, self.test_images), self.test_labels, len(self.class_names), self.l2_reg,
        )
        return {f"{self.shots}shot_accuracy": accuracy, "num_images": float(len(self.test_images))}


def _class_names(entry: ml_collections.ConfigDict, source: Any) -> list[str]:
    if entry.class_names:
        with open(entry.class_names) as stream:
            return [line.strip() for line in stream if line.strip()]
    if not hasattr(source, "class_names"):
        raise ValueError(
            f"Classification source {source!r} has no class names; set the eval's class_names to a file "
            "with one name per line, in label order."
        )
    return list(source.class_names)


def build_evaluators(
    config: ml_collections.ConfigDict, tokenizer: Callable, build_source: Callable
) -> dict[str, Any]:
    """name -> evaluator for each entry of `config.evals`."""
    evaluators = {}
    image_size = two_towers.image_options(config)  # square pixels or NaFlex patches
    for name, entry in config.evals.items():
        try:
            source = build_source(entry.source)
        except FileNotFoundError as error:
            raise from_config.missing_data_error(error, f"evals.{name}.source", entry.source) from error
        if entry.kind == "retrieval":
            evaluators[name] = RetrievalSet(source, tokenizer, image_size, entry.max_items)
        elif entry.kind == "classification":
            templates = (
                classification.IMAGENET_TEMPLATES if entry.templates == "imagenet"
                else classification.load_templates(entry.templates)
            )
            evaluators[name] = ClassificationSet(
                source, tokenizer, image_size, _class_names(entry, source), templates, entry.max_items
            )
        elif entry.kind == "contrastive_loss":
            evaluators[name] = ContrastiveLossSet(
                source, tokenizer, image_size, config.data.batch_size, config.loss, entry.max_items
            )
        elif entry.kind == "fewshot":
            test_source = None if entry.test_source is None else build_source(entry.test_source)
            evaluators[name] = FewShotSet(
                source, test_source, image_size, entry.shots, entry.l2_reg, config.seed, entry.max_items
            )
        else:
            raise ValueError(
                f"Eval {name!r} has kind {entry.kind!r}; valid kinds: retrieval, classification, "
                "contrastive_loss, fewshot."
            )
    return evaluators


def run_evaluators(evaluators: dict[str, Any], embedder: Embedder, params: Any) -> dict[str, float]:
    """Runs every evaluator; metric keys are "<eval name>/<metric>"."""
    results = {}
    for name, evaluator in evaluators.items():
        for key, value in evaluator.evaluate(embedder, params).items():
            results[f"{name}/{key}"] = value
    return results


def evaluate_params(
    config: ml_collections.ConfigDict, params: Any, tokenizer: Callable, build_source: Callable, mesh: Mesh
) -> dict[str, float]:
    """Runs every eval of `config.evals` once on `params`; keys "<eval name>/<metric>"."""

    if not config.evals:
        raise ValueError("The config lists no evals (config.evals is empty); add one, e.g. "
                         "config.evals.flickr = eval_config('retrieval', source_config('flickr8k', ...)).")
    axis_rules = sharding.rules_as_tuples(config.mesh.axis_rules)
    shardings = param_shardings(config.model, mesh, axis_rules)
    embedder = Embedder(two_towers.build_model(config.model), mesh, axis_rules, config.data.eval_batch_size, shardings)
    return run_evaluators(build_evaluators(config, tokenizer, build_source), embedder, jax.device_put(params, shardings))


def format_table(results: dict[str, float]) -> str:
    """A plain-text table: eval, metric, value (recalls and accuracies as percentages)."""
    rows = []
    for key in sorted(results):
        name, _, metric = key.partition("/")
        value = results[key]
        is_fraction = any(word in metric for word in ("recall", "top", "accuracy"))
        rows.append((name, metric, f"{100 * value:.2f}%" if is_fraction else f"{value:.4g}"))
    widths = [max(len(row[column]) for row in rows + [("eval", "metric", "value")]) for column in range(3)]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(("eval", "metric", "value"), widths))]
    lines.append("-+-".join("-" * width for width in widths))
    lines += [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)
