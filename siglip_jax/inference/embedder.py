"""The one embedder: compiled image and text embedding, the batch sharded over the mesh's data-parallel
axes, for training evals, eval.py, inference and search.

Inputs of any length are cut into batches of at most `batch_size`; each is padded up to a bucket (the
smallest power of two that holds it, rounded up to a multiple of the data-parallel devices, at most
`batch_size`) and the padding dropped from the result, so a stream of odd-sized requests costs at most
log2(batch_size) + 1 compilations per tower and every item counts exactly once.

Eval sets go through `embed_shares`: with several processes each process passes only its share of the
items, a batch at a time (batch_size / process_count rows per call), so no host holds or decodes the
whole set; every process receives the embeddings of all shares (and the keys that say which item each
row is), the only thing gathered.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siglip_jax.runtime import sharding


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
            def run(params: Any, inputs: jax.Array, keys: jax.Array, more: jax.Array) -> tuple[jax.Array, ...]:
                with nn.logical_axis_rules(axis_rules):
                    embeddings = model.apply({"params": params}, inputs, method=method)
                # keys and more ride along with their rows: replicated out, they gather with the embeddings.
                return embeddings, keys, more

            # jit compiles once per input shape, i.e. once per bucket.
            return jax.jit(run, in_shardings=(param_shardings, batch_sharding, batch_sharding, batch_sharding),
                           out_shardings=replicated)

        self._towers = {"image": embed(model.embed_images), "text": embed(model.embed_texts)}

    @property
    def compiled_buckets(self) -> tuple[tuple[str, int], ...]:
        """(tower, batch) of every bucket run so far."""
        return tuple(sorted(self._compiled))

    @property
    def rows_per_process(self) -> int:
        """Rows each process passes to one `embed_shares` call: its block of the global batch."""
        return self.batch_size // jax.process_count()

    def global_batch(self, chunk: np.ndarray) -> jax.Array:
        """Every process holds the same inputs, so each fills its own devices' rows from its copy. (jit
        refuses numpy for a sharding over other processes' devices.) The output is replicated, so each
        process reads all of it."""
        return jax.make_array_from_callback(chunk.shape, self.batch_sharding, lambda index: chunk[index])

    def embed_shares(self, tower: str, params: Any, local_chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                     empty_inputs: np.ndarray, key_columns: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of every process's items, on every process: a collective, so every process calls it.

        Args:
          tower: "image" or "text".
          local_chunks: this process's items, (inputs [k, ...], keys int32 [k, key_columns]) with k <=
            rows_per_process and keys[:, 0] >= 0 the item's position in the whole set (further columns
            carry what else must travel with it, e.g. a label); read lazily, one chunk ahead of the device.
          empty_inputs: [0, ...] of the inputs' row shape and dtype (a process may have no items).
        Returns:
          (L2-normalised embeddings [n, d], keys [n, c]) of all processes' items, ordered by keys[:, 0]
          (stably: a process's rows with equal keys[:, 0] keep the order it passed them in).
        """
        rows = self.rows_per_process
        function = self._towers[tower]
        chunks = iter(local_chunks)
        upcoming = next(chunks, None)
        embeddings, keys = [], []
        while True:
            current = upcoming
            if current is None:
                inputs = empty_inputs
                chunk_keys = np.zeros((0, key_columns), np.int32)
            else:
                inputs, chunk_keys = np.asarray(current[0]), np.asarray(current[1], np.int32).reshape(-1, key_columns)
                upcoming = next(chunks, None)
            if len(inputs) > rows or len(chunk_keys) != len(inputs):
                raise ValueError(f"A chunk for embed_shares has {len(inputs)} inputs and {len(chunk_keys)} keys; it "
                                 f"needs one key row per input and at most rows_per_process={rows} of them.")
            padding = rows - len(inputs)
            inputs = np.concatenate([inputs, np.zeros((padding, *inputs.shape[1:]), inputs.dtype)])
            chunk_keys = np.concatenate([chunk_keys, np.full((padding, key_columns), -1, np.int32)])
            more = np.full((rows,), upcoming is not None, np.int32)  # "this process has another chunk"
            self._compiled.add((tower, self.batch_size))
            with jax.set_mesh(self.mesh):
                batch = [jax.make_array_from_process_local_data(self.batch_sharding, part)
                         for part in (inputs, chunk_keys, more)]
                out, out_keys, out_more = (np.asarray(part) for part in function(params, *batch))
            valid = out_keys[:, 0] >= 0
            embeddings.append(out[valid])
            keys.append(out_keys[valid])
            if not out_more.any():  # every process has passed its last chunk
                break
        embeddings, keys = np.concatenate(embeddings), np.concatenate(keys)
        order = np.argsort(keys[:, 0], kind="stable")
        return embeddings[order], keys[order]

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
            unused = np.zeros((bucket,), np.int32)  # the keys and flag embed_shares needs, here unused
            with jax.set_mesh(self.mesh):
                embedded = function(params, *(self.global_batch(part) for part in (chunk, unused, unused)))[0]
                outputs.append(np.asarray(embedded)[:valid])
        if outputs:
            return np.concatenate(outputs)
        empty = np.zeros((self._multiple, *np.shape(inputs)[1:]), np.asarray(inputs).dtype)
        unused = np.zeros((self._multiple,), np.int32)
        with jax.set_mesh(self.mesh):
            width = jax.eval_shape(function, params, empty, unused, unused)[0].shape[-1]
        return np.zeros((0, width), np.float32)

    def images(self, params: Any, images: np.ndarray) -> np.ndarray:
        """uint8 or float images [n, s, s, 3] -> L2-normalised embeddings [n, d]."""
        return self._run("image", params, images)

    def texts(self, params: Any, tokens: np.ndarray) -> np.ndarray:
        """Token ids [n, l] -> L2-normalised embeddings [n, d]."""
        return self._run("text", params, tokens)
