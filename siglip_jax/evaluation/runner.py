"""Runs evaluations against model parameters: embeds a source's images and captions with the one
Embedder (siglip_jax.embedder, sharded over the mesh), then computes the metrics. Used by the trainer's
eval hook and by eval.py.

With several processes, each process reads, decodes and embeds only its share of an eval set
(pipeline.eval_share: contiguous record ranges), one batch at a time, so no host holds the whole set;
the Embedder gathers the embeddings (with each row's record index), and every process computes the
same metrics from them. The records are read again at every eval.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

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


class NonFiniteEmbeddings(FloatingPointError):
    pass


def _checked(embeddings: np.ndarray, tower: str) -> np.ndarray:
    """A diverged model is reported by name instead of failing (or inflating) the metrics."""
    if not np.all(np.isfinite(embeddings)):
        raise NonFiniteEmbeddings(f"{tower} embeddings hold NaN or Inf")
    return embeddings


def _chunks(rows: Iterable[tuple[np.ndarray, tuple[int, ...]]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input, key row) pairs -> (inputs [<= size, ...], keys int32 [<= size, c]) chunks, lazily."""
    inputs, keys = [], []
    for item, key in rows:
        inputs.append(item)
        keys.append(key)
        if len(inputs) == size:
            yield np.stack(inputs), np.asarray(keys, np.int32)
            inputs, keys = [], []
    if inputs:
        yield np.stack(inputs), np.asarray(keys, np.int32)


def _checked_size(source: Any, max_items: int) -> int:
    """The records an eval reads; an empty source is refused when the eval is built, not at its first run
    (which record is usable is only known once read, at every eval)."""
    if len(source) == 0:
        raise ValueError(f"The eval source {source!r} has no records; check its path and split.")
    return min(len(source), max_items) if max_items else len(source)


def _this_share(num_records: int) -> range:
    return pipeline.eval_share(num_records, jax.process_index(), jax.process_count())


class RetrievalSet:
    """A source's images and all their captions (the first `max_items` records, 0: all)."""

    def __init__(self, source: Any, tokenizer: Callable, image_size: int, max_items: int = 0):
        self.source, self.tokenizer, self.image_size = source, tokenizer, image_size
        self.num_records = _checked_size(source, max_items)
        self._token_shape = np.shape(tokenizer([""]))[1:]

    def evaluate(self, embedder: Embedder, params: Any) -> dict[str, float]:
        captions, caption_records = [], []  # this share's, kept as text: small beside the images

        def images() -> Iterator[tuple[np.ndarray, tuple[int]]]:
            for index, image, image_captions, record in pipeline.eval_records(
                    self.source, self.image_size, _this_share(self.num_records)):
                if not image_captions:
                    logger.warning("Skipped retrieval record %s: it has no caption.", record.get("id", index))
                    continue
                captions.extend(image_captions)
                caption_records.extend([index] * len(image_captions))
                yield image, (index,)

        size = embedder.rows_per_process
        empty_images = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        image_embeddings, image_keys = embedder.embed_shares("image", params, _chunks(images(), size), empty_images)
        if not len(image_keys):
            raise ValueError(f"The retrieval source {self.source!r} has no usable image with a caption.")
        _checked(image_embeddings, "image")

        def texts() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for start in range(0, len(captions), size):
                yield self.tokenizer(captions[start:start + size]), np.asarray(caption_records[start:start + size])

        empty_tokens = np.zeros((0, *self._token_shape), np.int32)
        text_embeddings, text_keys = embedder.embed_shares("text", params, texts(), empty_tokens)
        _checked(text_embeddings, "text")
        # A caption's image is the row of its record among the images (both ordered by record index).
        caption_image_ids = np.searchsorted(image_keys[:, 0], text_keys[:, 0]).astype(np.int32)
        metrics = retrieval.retrieval_metrics(image_embeddings, text_embeddings, caption_image_ids)
        return {**metrics, "num_images": float(len(image_keys)),
                "num_skipped": float(self.num_records - len(image_keys))}


class ClassificationSet:
    """Zero-shot classification: images of a labelled source against prompt-ensembled class embeddings."""

    def __init__(self, source: Any, tokenizer: Callable, image_size: int, class_names: list[str],
                 templates: tuple[str, ...], max_items: int = 0):
        self.source, self.tokenizer, self.image_size = source, tokenizer, image_size
        self.num_records = _checked_size(source, max_items)
        self.class_names = list(class_names)
        self.templates = templates

    def evaluate(self, embedder: Embedder, params: Any) -> dict[str, float]:
        class_embeddings = classification.class_text_embeddings(
            lambda prompts: _checked(embedder.texts(params, self.tokenizer(prompts)), "text"),
            self.class_names, self.templates,
        )
        records = pipeline.eval_records(self.source, self.image_size, _this_share(self.num_records))
        labelled = ((image, (index, int(record["label"]))) for index, image, _, record in records)
        empty_images = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        image_embeddings, keys = embedder.embed_shares(
            "image", params, _chunks(labelled, embedder.rows_per_process), empty_images, key_columns=2)
        if not len(keys):
            raise ValueError(f"The classification source {self.source!r} has no readable image.")
        _checked(image_embeddings, "image")
        metrics = classification.classification_metrics(image_embeddings, keys[:, 1], class_embeddings)
        return {**metrics, "num_images": float(len(keys)), "num_skipped": float(self.num_records - len(keys))}


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
    image_size = config.model.image.image_size
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


def run_evaluators(evaluators: dict[str, Any], embedder: Embedder, params: Any, step: int | None = None
                   ) -> dict[str, float]:
    """Every evaluator's metrics as "<eval name>/<metric>". An eval that meets non-finite embeddings gives
    "<eval name>/nonfinite_embeddings" = 1 and a warning instead of raising, so a training run (and its
    checkpoint) goes on. Every process calls it (the embedding is a collective) and gets the same metrics."""
    results: dict[str, float] = {}
    for name, evaluator in evaluators.items():
        try:
            metrics = evaluator.evaluate(embedder, params)
        except NonFiniteEmbeddings as error:
            at = "" if step is None else f" at step {step}"
            logger.warning("Eval %r%s: %s; its metrics are left out. The model has diverged: lower "
                           "optim.learning_rate, or resume from an earlier checkpoint.", name, at, error)
            metrics = {"nonfinite_embeddings": 1.0}
        results.update({f"{name}/{key}": value for key, value in metrics.items()})
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
