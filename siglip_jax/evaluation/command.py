"""The engine of eval.py: load a model from a workdir or an exported file, run the configured evals,
score image-text pairs."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import ml_collections

from siglip_jax.data import images as images_lib
from siglip_jax.data.from_config import build_source, check_vocabulary
from siglip_jax.data.sources import caption_tables
from siglip_jax.evaluation import runner
from siglip_jax.inference import predictor
from siglip_jax.io import loading, params as params_lib
from siglip_jax.runtime import sharding, storage

logger = logging.getLogger(__name__)


def read_pairs(path: str) -> tuple[list[dict[str, str]], list[str]]:
    """({"image", "text"} pairs, skipped lines as "path line N: why") of a JSONL file: a bad line is
    skipped and named so the rest are still scored."""
    pairs, skipped = [], []
    with open(path) as stream:
        for line_number, pair in caption_tables.json_lines(path, stream, skipped):
            if not isinstance(pair, dict) or not all(isinstance(pair.get(key), str) for key in ("image", "text")):
                skipped.append(f"{path} line {line_number}: needs string values for 'image' and 'text', got "
                               f"{json.dumps(pair)[:100]}")
                continue
            pairs.append(pair)
    return pairs, skipped


def _readable_images(pairs: list[dict[str, str]], size: Any, path: str) -> tuple[list[Any], list[str]]:
    """Each pair's pixels (None when unreadable) and "path: image why" for those that are not."""
    pixels, skipped = [], []
    for pair in pairs:
        try:
            pixels.append(predictor.load_image(pair["image"], size))
        except (images_lib.DecodeError, OSError) as error:
            pixels.append(None)
            skipped.append(f"{path}: image {pair['image']!r}: {error}")
    return pixels, skipped


def _score_pairs(embedder: predictor.Predictor, path: str) -> tuple[list[dict[str, Any]], list[str]]:
    pairs, skipped = read_pairs(path)
    num_lines = len(pairs) + len(skipped)
    pixels, unreadable = _readable_images(pairs, embedder.image_options, path)
    skipped += unreadable
    if skipped:
        logger.warning("Skipped %d of %d pairs in %s: %s", len(skipped), num_lines, path, "; ".join(skipped[:5]))
    kept = [(pair, image) for pair, image in zip(pairs, pixels) if image is not None]
    if not kept:
        raise ValueError(f"No pair in {path} could be scored: {'; '.join(skipped[:5]) or 'the file is empty'}. Each "
                         'line must be {"image": path, "text": caption}.')
    probabilities = embedder.score_pairs([image for _, image in kept], [pair["text"] for pair, _ in kept])
    return [{**pair, "probability": float(p)} for (pair, _), p in zip(kept, probabilities)], skipped


def run(config: ml_collections.ConfigDict | None, workdir: str | None, checkpoint_arg: str | None,
        pairs_path: str | None = None, weights: str = "raw") -> dict[str, Any]:
    """Metrics of every eval (and pair probabilities), plus a printable "table". `weights` ("raw" or
    "ema") picks a workdir's trained parameters or their moving average."""
    source, step = loading.source_from_flags(workdir, checkpoint_arg)
    exported = loading.load_model(source, step=step, weights=weights)
    params = exported.params
    # The recipe says what to evaluate; the model's own config keeps its loss and tokenizer.
    config = loading.with_overrides(exported.config, config)
    # The model's tokenizer (the file bundled with an export, else its saved path), checked against its vocabulary.
    tokenizer = check_vocabulary(params_lib.make_tokenizer(dataclasses.replace(exported, config=config)), config)
    results: dict[str, Any] = {"weights": weights}
    tables = []
    if config.evals:
        mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axis_names)
        metrics = runner.evaluate_params(config, params, tokenizer, build_source, mesh)
        results["metrics"] = metrics
        tables.append(runner.format_table(metrics))
    if pairs_path:
        embedder = predictor.Predictor(config, params, tokenizer)
        results["pairs"], results["skipped_pairs"] = _score_pairs(embedder, pairs_path)
        results["probability"] = embedder.score_description()
        tables.append(f"probability: {results['probability']}\n"
                      + "\n".join(f"{pair['probability']:.4f}  {pair['image']}  {pair['text']}" for pair in results["pairs"]))
        if results["skipped_pairs"]:
            tables[-1] += f"\nskipped {len(results['skipped_pairs'])}: " + "; ".join(results["skipped_pairs"])
    if not tables:
        raise ValueError("Nothing to evaluate: the config has no evals and no --pairs file was given.")
    results["table"] = "\n\n".join(tables)
    return results


def write_output(results: dict[str, Any], output: str) -> None:
    """Writes `run`'s results (without the printable table) as JSON to a local file or a gs:// / s3:// path."""
    path = storage.path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({key: value for key, value in results.items() if key != "table"}, indent=2, sort_keys=True))
