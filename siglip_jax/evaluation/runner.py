"""Runs evaluations against model parameters: embeds a source's images and captions sharded over the
mesh, then computes the metrics. Hooks for the trainer and the engine of eval.py."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siglip_jax import sharding
from siglip_jax.data import pipeline
from siglip_jax.evaluation import retrieval


class Embedder:
    """Compiled image and text embedding with the batch sharded over the mesh's data-parallel axes.

    Inputs of any length are split into fixed-size batches; the last one is padded (so there is one
    compilation per shape) and the padding dropped from the result, so every item counts exactly once.
    """

    def __init__(self, model: nn.Module, mesh: Mesh, axis_rules: Any, batch_size: int, param_shardings: Any = None):
        sharding.check_batch_size(batch_size, mesh, axis_rules, what="data.eval_batch_size")
        self.batch_size = batch_size
        self.mesh = mesh
        self.axis_rules = axis_rules
        batch_sharding = sharding.batch_sharding(mesh, axis_rules)
        replicated = NamedSharding(mesh, PartitionSpec())

        def embed(method: Callable) -> Callable:
            def run(params: Any, inputs: jax.Array) -> jax.Array:
                with nn.logical_axis_rules(axis_rules):
                    return model.apply({"params": params}, inputs, method=method)

            return jax.jit(run, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)

        self._embed_images = embed(model.embed_images)
        self._embed_texts = embed(model.embed_texts)

    def _batched(self, function: Callable, params: Any, inputs: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            valid = len(chunk)
            if valid < self.batch_size:
                padding = np.zeros((self.batch_size - valid, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, padding])
            with jax.set_mesh(self.mesh):
                outputs.append(np.asarray(function(params, chunk))[:valid])
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)

    def images(self, params: Any, images: np.ndarray) -> np.ndarray:
        """uint8 or float images [n, s, s, 3] -> L2-normalised embeddings [n, d]."""
        return self._batched(self._embed_images, params, images)

    def texts(self, params: Any, tokens: np.ndarray) -> np.ndarray:
        """Token ids [n, l] -> L2-normalised embeddings [n, d]."""
        return self._batched(self._embed_texts, params, tokens)


class RetrievalSet:
    """A source's images and all their captions, preprocessed once and kept for repeated evals."""

    def __init__(self, source: Any, tokenizer: Callable, image_size: int):
        images, captions, caption_image_ids = [], [], []
        for image_index, (image, image_captions, _) in enumerate(pipeline.eval_records(source, image_size)):
            if not image_captions:
                raise ValueError(f"Retrieval record {image_index} has no caption; every image needs at least one.")
            images.append(image)
            captions.extend(image_captions)
            caption_image_ids.extend([image_index] * len(image_captions))
        self.images = np.stack(images)
        self.tokens = tokenizer(captions)
        self.caption_image_ids = np.asarray(caption_image_ids, np.int32)

    def evaluate(self, embedder: Embedder, params: Any) -> dict[str, float]:
        image_embeddings = embedder.images(params, self.images)
        text_embeddings = embedder.texts(params, self.tokens)
        return retrieval.retrieval_metrics(image_embeddings, text_embeddings, self.caption_image_ids)
