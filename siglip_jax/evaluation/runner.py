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

from siglip_jax import sharding
from siglip_jax.data import pipeline
from siglip_jax.embedder import Embedder
from siglip_jax.evaluation import classification, retrieval
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
        source = build_source(entry.source)
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
        else:
            raise ValueError(f"Eval {name!r} has kind {entry.kind!r}; valid kinds: retrieval, classification.")
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
