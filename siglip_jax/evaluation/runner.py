"""Runs evaluations against model parameters: embeds a source's images and captions with the one
Embedder (siglip_jax.inference.embedder, sharded over the mesh), then computes the metrics. Used by the trainer's
eval hook and by eval.py.

With several processes, each process reads, decodes and embeds only its share of an eval set
(pipeline.eval_share: contiguous record ranges), one batch at a time, so no host holds the whole set;
the Embedder gathers the embeddings (with each row's record index), and every process computes the
same metrics from them. The records are read again at every eval.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from siglip_jax.data import from_config, pipeline, preprocess
from siglip_jax.evaluation import classification, fewshot, retrieval
from siglip_jax.inference.embedder import Embedder
from siglip_jax.losses import captioning, contrastive
from siglip_jax.models import two_towers
from siglip_jax.models.two_towers import param_shardings
from siglip_jax.runtime import sharding

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
        empty_images = np.zeros((0, *preprocess.eval_image_shape(self.image_size)), np.uint8)
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
        empty_images = np.zeros((0, *preprocess.eval_image_shape(self.image_size)), np.uint8)
        image_embeddings, keys = embedder.embed_shares(
            "image", params, _chunks(labelled, embedder.rows_per_process), empty_images, key_columns=2)
        if not len(keys):
            raise ValueError(f"The classification source {self.source!r} has no readable image.")
        _checked(image_embeddings, "image")
        metrics = classification.classification_metrics(image_embeddings, keys[:, 1], class_embeddings)
        return {**metrics, "num_images": float(len(keys)), "num_skipped": float(self.num_records - len(keys))}


class ContrastiveLossSet:
    """Validation loss: the training loss (config.loss) of held-out image-caption pairs, in batches of the
    training batch size, so it is comparable with the training loss and shows overfitting.

    Each usable record gives one pair, its first non-empty caption (deterministic, and no image twice in a
    batch, where it would be its own negative); the last incomplete batch is left out, as training drops it.
    """

    def __init__(self, source: Any, tokenizer: Callable, image_size: int, batch_size: int,
                 loss_config: ml_collections.ConfigDict, max_items: int = 0):
        self.num_records = min(len(source), max_items) if max_items else len(source)
        images, captions = _first_caption_pairs(source, image_size, self.num_records, batch_size, "contrastive_loss",
                                                "data.batch_size")
        num_batches = len(images) // batch_size
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
            float(contrastive.contrastive_loss(
                image_embeddings[start:start + self.batch_size], text_embeddings[start:start + self.batch_size],
                log_temperature, bias, name=self.loss_name, max_temperature=self.max_temperature,
            ))
            for start in range(0, self.num_pairs, self.batch_size)
        ]
        return {"loss": float(np.mean(batch_losses)), "num_pairs": float(self.num_pairs),
                "num_skipped": float(self.num_skipped)}


def _first_caption_pairs(source: Any, image_size: Any, num_records: int, batch_size: int, kind: str,
                         batch_setting: str) -> tuple[list[np.ndarray], list[str]]:
    """(eval views, first non-empty captions) of the first `num_records` records that have a caption: held-out
    pairs with no image twice (in one batch it would be its own negative). Fewer than one batch is refused."""
    images, captions = [], []
    for _, image, image_captions, record in pipeline.eval_records(source, image_size, range(num_records)):
        if not image_captions:
            logger.warning("Skipped %s record %s: it has no caption.", kind, record.get("id"))
            continue
        images.append(image)
        captions.append(image_captions[0])
    if len(images) < batch_size:
        raise ValueError(
            f"The {kind} source {source!r} has {len(images)} usable image-caption pairs, fewer than one batch "
            f"({batch_setting}={batch_size}); give it more records (max_items=0 takes all) or evaluate a larger split."
        )
    return images, captions


def _caption_loss_sum(params: Any, images: jax.Array, tokens: jax.Array, *, model: nn.Module, axis_rules: Any,
                      eos_id: int, logits_chunk: int, parallel: bool) -> tuple[jax.Array, jax.Array]:
    """(summed token cross-entropy, number of caption tokens) of a batch, decoded with teacher forcing or, with
    `parallel`, from mask tokens alone."""
    with nn.logical_axis_rules(axis_rules):
        _, _, decoded = model.apply({"params": params}, images, tokens, jnp.full(tokens.shape[:1], parallel),
                                    method=model.embed_and_decode)
    mean = captioning.caption_loss(decoded.hidden, decoded.head_kernel, decoded.head_bias, tokens, eos_id,
                                   chunk_size=logits_chunk)
    count = jnp.sum(captioning.caption_weights(tokens, eos_id))
    return mean * count, count


class CaptionLossSet:
    """The caption decoder's held-out loss (SigLIP 2's LocCa task, models/decoder.py): the cross-entropy per
    caption token, padding after the first EOS ignored, of held-out pairs (each record's first caption), in full
    batches of data.eval_batch_size (the last incomplete batch left out), decoded with teacher forcing
    ("caption_loss", what the training metric of the same name mostly is) and in parallel from mask tokens alone
    ("parallel_caption_loss"). An untrained decoder (zero-initialised head) scores log(vocabulary size)."""

    def __init__(self, source: Any, tokenizer: Callable, image_size: Any, batch_size: int,
                 config: ml_collections.ConfigDict, eos_id: int, max_items: int = 0):
        if not config.model.decoder.weight:
            raise ValueError("A caption_loss eval needs the caption decoder: set model.decoder.weight > 0 (SigLIP 2: "
                             "1.0), or drop the eval.")
        self.num_records = min(len(source), max_items) if max_items else len(source)
        images, captions = _first_caption_pairs(source, image_size, self.num_records, batch_size, "caption_loss",
                                                "data.eval_batch_size")
        self.num_pairs = len(images) // batch_size * batch_size
        self.num_skipped = self.num_records - len(images)
        self.batch_size = batch_size
        self.images = np.stack(images[: self.num_pairs])
        self.tokens = tokenizer(captions[: self.num_pairs])
        model = two_towers.build_model(config.model)
        self._loss_sum = jax.jit(
            functools.partial(_caption_loss_sum, model=model, axis_rules=sharding.rules_as_tuples(config.mesh.axis_rules),
                              eos_id=int(eos_id), logits_chunk=int(config.model.decoder.logits_chunk)),
            static_argnames=("parallel",))

    def evaluate(self, embedder: Embedder, params: Any) -> dict[str, float]:
        totals = {False: [0.0, 0.0], True: [0.0, 0.0]}  # parallel -> [loss sum, tokens]
        for start in range(0, self.num_pairs, self.batch_size):
            with jax.set_mesh(embedder.mesh):
                images = embedder.global_batch(self.images[start:start + self.batch_size])
                tokens = embedder.global_batch(self.tokens[start:start + self.batch_size])
                for parallel, total in totals.items():
                    loss_sum, count = self._loss_sum(params, images, tokens, parallel=parallel)
                    total[0] += float(loss_sum)
                    total[1] += float(count)
        teacher_forced, parallel = (total[0] / total[1] for total in (totals[False], totals[True]))
        return {"caption_loss": teacher_forced, "parallel_caption_loss": parallel,
                "num_pairs": float(self.num_pairs), "num_skipped": float(self.num_skipped)}


def _labelled_images(source: Any, image_size: Any, indices: Any) -> tuple[np.ndarray, np.ndarray]:
    """The eval views and labels of the readable records among `indices` (unreadable ones logged, left out)."""
    images, labels = [], []
    for _, image, _, record in pipeline.eval_records(source, image_size, (int(index) for index in indices)):
        images.append(image)
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


class _Setup(NamedTuple):
    """What every kind of evaluator may need besides its own entry and source."""
    config: ml_collections.ConfigDict
    tokenizer: Callable
    image_options: Any  # data.preprocess.ImageOptions: square pixels or NaFlex patches
    build_source: Callable


def _retrieval(entry, source, setup: _Setup) -> RetrievalSet:
    return RetrievalSet(source, setup.tokenizer, setup.image_options, entry.max_items)


def _classification(entry, source, setup: _Setup) -> ClassificationSet:
    templates = (classification.IMAGENET_TEMPLATES if entry.templates == "imagenet"
                 else classification.load_templates(entry.templates))
    return ClassificationSet(source, setup.tokenizer, setup.image_options, _class_names(entry, source), templates,
                             entry.max_items)


def _contrastive_loss(entry, source, setup: _Setup) -> ContrastiveLossSet:
    return ContrastiveLossSet(source, setup.tokenizer, setup.image_options, setup.config.data.batch_size,
                              setup.config.loss, entry.max_items)


def _caption_loss(entry, source, setup: _Setup) -> CaptionLossSet:
    return CaptionLossSet(source, setup.tokenizer, setup.image_options, setup.config.data.eval_batch_size,
                          setup.config, setup.tokenizer.eos_id, entry.max_items)


def _fewshot(entry, source, setup: _Setup) -> FewShotSet:
    test_source = None if entry.test_source is None else setup.build_source(entry.test_source)
    return FewShotSet(source, test_source, setup.image_options, entry.shots, entry.l2_reg, setup.config.seed,
                      entry.max_items)


# The whole table of eval kinds (config.EVAL_KINDS names the same keys): one function per kind.
EVALUATORS: dict[str, Callable[[Any, Any, _Setup], Any]] = {
    "retrieval": _retrieval,
    "classification": _classification,
    "contrastive_loss": _contrastive_loss,
    "fewshot": _fewshot,
    "caption_loss": _caption_loss,
}


def build_evaluators(
    config: ml_collections.ConfigDict, tokenizer: Callable, build_source: Callable
) -> dict[str, Any]:
    """name -> evaluator for each entry of `config.evals`, built by its kind's entry in EVALUATORS."""
    setup = _Setup(config, tokenizer, two_towers.image_options(config), build_source)
    evaluators = {}
    for name, entry in config.evals.items():
        if entry.kind not in EVALUATORS:
            raise ValueError(f"Eval {name!r} has kind {entry.kind!r}; valid kinds: {', '.join(EVALUATORS)}.")
        try:
            source = build_source(entry.source)
        except FileNotFoundError as error:
            raise from_config.missing_data_error(error, f"evals.{name}.source", entry.source) from error
        evaluators[name] = EVALUATORS[entry.kind](entry, source, setup)
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
