"""The one embedder: compiled image and text embedding, the batch sharded over the mesh's data-parallel
axes, for training evals, eval.py, inference and search.

Inputs of any length are cut into batches of at most `batch_size`; each is padded up to a bucket (the
smallest power of two that holds it, rounded up to a multiple of the data-parallel devices, at most
`batch_size`) and the padding dropped from the result, so a stream of odd-sized requests costs at most
log2(batch_size) + 1 compilations per tower and every item counts exactly once.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siglip_jax import sharding


def bucket_size(count: int, batch_size: int, multiple: int = 1) -> int:
    """The smallest power of two >= count, rounded up to a multiple of `multiple`, capped at batch_size
    (which need not be a power of two, and is itself a multiple of `multiple`)."""
    bucket = 1 << max(count - 1, 0).bit_length()
    return min(batch_size, -(-bucket // multiple) * multiple)


class Embedder:
    """L2-normalised embeddings [n, d] of images [n, s, s, 3] or token ids [n, l] for one model on `mesh`."""

    def __init__(self, model: nn.Module, mesh: Mesh, axis_rules: Any, batch_size: int, param_shardings: Any = None):
        sharding.check_batch_size(batch_size, mesh, axis_rules, what="data.eval_batch_size")
        self.batch_size = batch_size
        self.mesh = mesh
        self.batch_sharding = batch_sharding = sharding.batch_sharding(mesh, axis_rules)
        self._multiple = sharding.data_parallel_size(mesh, axis_rules)
        self._compiled: set[tuple[str, int]] = set()
        replicated = NamedSharding(mesh, PartitionSpec())

        def embed(method: Callable) -> Callable:
            def run(params: Any, inputs: jax.Array) -> jax.Array:
                with nn.logical_axis_rules(axis_rules):
                    return model.apply({"params": params}, inputs, method=method)

            # jit compiles once per input shape, i.e. once per bucket.
            return jax.jit(run, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)

        self._towers = {"image": embed(model.embed_images), "text": embed(model.embed_texts)}

    @property
    def compiled_buckets(self) -> tuple[tuple[str, int], ...]:
        """(tower, batch) of every bucket run so far."""
        return tuple(sorted(self._compiled))

    def _global_batch(self, chunk: np.ndarray) -> jax.Array:
        """Every process holds the same inputs, so each fills its own devices' rows from its copy. (jit
        refuses numpy for a sharding over other processes' devices.) The output is replicated, so each
        process reads all of it."""
        return jax.make_array_from_callback(chunk.shape, self.batch_sharding, lambda index: chunk[index])

    def _run(self, tower: str, params: Any, inputs: np.ndarray) -> np.ndarray:
        function = self._towers[tower]
        outputs = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = np.asarray(inputs[start:start + self.batch_size])
            valid = len(chunk)
            bucket = bucket_size(valid, self.batch_size, self._multiple)
            if valid < bucket:
                chunk = np.concatenate([chunk, np.zeros((bucket - valid, *chunk.shape[1:]), chunk.dtype)])
            self._compiled.add((tower, bucket))
            with jax.set_mesh(self.mesh):
                outputs.append(np.asarray(function(params, self._global_batch(chunk)))[:valid])
        if outputs:
            return np.concatenate(outputs)
        empty = np.zeros((self._multiple, *np.shape(inputs)[1:]), np.asarray(inputs).dtype)
        with jax.set_mesh(self.mesh):
            width = jax.eval_shape(function, params, empty).shape[-1]
        return np.zeros((0, width), np.float32)

    def images(self, params: Any, images: np.ndarray) -> np.ndarray:
        """uint8 or float images [n, s, s, 3] -> L2-normalised embeddings [n, d]."""
        return self._run("image", params, images)

    def texts(self, params: Any, tokens: np.ndarray) -> np.ndarray:
        """Token ids [n, l] -> L2-normalised embeddings [n, d]."""
        return self._run("text", params, tokens)
