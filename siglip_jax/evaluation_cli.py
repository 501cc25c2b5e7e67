"""The engine of eval.py: load a model from a workdir or an exported file, run the configured evals,
score image-text pairs."""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from siglip_jax import inference, loading, sharding
from siglip_jax.data.from_config import build_source, build_tokenizer
from siglip_jax.evaluation import runner


def read_pairs(path: str) -> list[dict[str, str]]:
    pairs = []
    with open(path) as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            pair = json.loads(line)
            if not {"image", "text"} <= set(pair):
                raise ValueError(f"{path} line {line_number} needs keys 'image' and 'text', got {sorted(pair)}.")
            pairs.append(pair)
    return pairs


def run(config: ml_collections.ConfigDict | None, workdir: str | None, checkpoint_arg: str | None,
        pairs_path: str | None = None) -> dict[str, Any]:
    """Metrics of every eval (and pair probabilities), plus a printable "table"."""
    source, step = loading.source_from_flags(workdir, checkpoint_arg)
    exported = loading.load_model(source, step=step)
    params = exported.params
    config = loading.with_overrides(exported.config, config)  # the recipe says what to evaluate
    results: dict[str, Any] = {}
    tables = []
    if config.evals:
        mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axis_names)
        metrics = runner.evaluate_params(config, params, build_tokenizer(config), build_source, mesh)
        results["metrics"] = metrics
        tables.append(runner.format_table(metrics))
    if pairs_path:
        embedder = inference.Embedder(config, params, build_tokenizer(config))
        pairs = read_pairs(pairs_path)
        probabilities = embedder.score_pairs([pair["image"] for pair in pairs], [pair["text"] for pair in pairs])
        results["pairs"] = [{**pair, "probability": float(p)} for pair, p in zip(pairs, probabilities)]
        tables.append("\n".join(f"{p:.4f}  {pair['image']}  {pair['text']}" for pair, p in zip(pairs, probabilities)))
    if not tables:
        raise ValueError("Nothing to evaluate: the config has no evals and no --pairs file was given.")
    results["table"] = "\n\n".join(tables)
    return results
