"""Embed and score for users and servers: load a model from any source siglip_jax.loading reads (an
exported params file, an HF SigLIP directory, a big_vision .npz, a training workdir); embed images (paths, bytes or
arrays) and texts (strings) with the model's own preprocessing and tokenizer; score image-text pairs.

Batches are padded up to a bucket (powers of two up to `batch_size`) and each bucket is compiled once,
ahead of time, so a stream of odd-sized requests costs at most log2(batch_size) + 1 compilations per tower.

    embedder = inference.load("model.msgpack")
    probabilities = embedder.score(["dog.jpg", "cat.jpg"], ["a dog", "a cat"])  # [2 images, 2 texts]
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from siglip_jax import loading
from siglip_jax.data import images as images_lib
from siglip_jax.export import params as params_lib
from siglip_jax.models import two_towers

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]


# ------------------------------------------------------------------------------------------ loading

def load(path: str, *, batch_size: int = 32) -> "Embedder":
    """An Embedder for the model at `path`: anything siglip_jax.loading.load_model reads."""
    return Embedder.from_exported(loading.load_model(path), batch_size=batch_size)


# ------------------------------------------------------------------------------------ preprocessing

def _bucket(count: int, batch_size: int) -> int:
    """The smallest power of two >= count, capped at batch_size (which need not be a power of two)."""
    return min(batch_size, 1 << max(count - 1, 0).bit_length())


def load_image(image: ImageInput, size: int) -> np.ndarray:
    """A path, encoded bytes or a pixel array -> [size, size, 3] uint8, as the eval pipeline prepares it
    (decode, EXIF orientation, alpha on white, bilinear squash to the square). Float arrays are read as
    [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            image = file.read()
    pixels = images_lib.decode_image(image)
    if pixels.shape[:2] != (size, size):
        pixels = images_lib.eval_transform(pixels, size)
    return pixels


class Embedder:
    """Image and text embeddings [n, embed] (L2-normalised float32) and SigLIP scores for one model."""

    def __init__(self, config: ml_collections.ConfigDict, params, tokenizer=None, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.config = config
        self.model = two_towers.build_model(config.model)
        self.params = jax.device_put(params)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.image_size = config.model.image.image_size
        self.max_len = config.model.text.max_len
        self._compiled: dict[tuple[str, int], Callable] = {}

    @classmethod
    def from_exported(cls, exported: params_lib.ExportedParams, batch_size: int = 32) -> "Embedder":
        return cls(exported.config, exported.params, params_lib.make_tokenizer(exported), batch_size)

    @property
    def compiled_buckets(self) -> tuple[tuple[str, int], ...]:
        """(tower, batch) of every executable compiled so far."""
        return tuple(sorted(self._compiled))

    def _executable(self, tower: str, example: np.ndarray) -> Callable:
        key = (tower, example.shape[0])
        if key not in self._compiled:
            method = self.model.embed_images if tower == "image" else self.model.embed_texts
            function = jax.jit(lambda params, batch: self.model.apply({"params": params}, batch, method=method))
            self._compiled[key] = function.lower(self.params, example).compile()
        return self._compiled[key]

    def _run(self, tower: str, batch: np.ndarray) -> np.ndarray:
        """[n, ...] -> [n, embed], in chunks of batch_size, each padded up to its bucket."""
        outputs = []
        for start in range(0, batch.shape[0], self.batch_size):
            chunk = batch[start:start + self.batch_size]
            bucket = _bucket(chunk.shape[0], self.batch_size)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], bucket - chunk.shape[0], axis=0)])
            outputs.append(np.asarray(self._executable(tower, padded)(self.params, padded))[:chunk.shape[0]])
        return np.concatenate(outputs) if outputs else np.zeros((0, self.embedding_width), np.float32)

    @property
    def embedding_width(self) -> int:
        return two_towers.embedding_width(self.config.model)

    def embed_images(self, images: Sequence[ImageInput] | np.ndarray) -> np.ndarray:
        """Paths, encoded bytes or pixel arrays (or one [n, h, w, 3] array) -> [n, embed] float32."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        pixels = [load_image(image, self.image_size) for image in images]
        batch = np.stack(pixels) if pixels else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return self._run("image", batch)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> [n, embed] float32, tokenized as in training."""
        if isinstance(texts, str):
            raise TypeError(f"embed_texts takes a list of strings, got the single string {texts!r}; wrap it: [text].")
        if self.tokenizer is None:
            raise ValueError("This Embedder has no tokenizer; pass one, or use embed_token_ids.")
        return self.embed_token_ids(self.tokenizer(list(texts)))

    def embed_token_ids(self, token_ids: np.ndarray) -> np.ndarray:
        """[n, max_len] int token ids -> [n, embed] float32."""
        token_ids = np.asarray(token_ids, np.int32)
        if token_ids.ndim != 2 or token_ids.shape[1] != self.max_len:
            raise ValueError(f"Token ids must be [n, {self.max_len}], got {token_ids.shape}.")
        return self._run("text", token_ids)

    def temperature_and_bias(self) -> tuple[float, float]:
        """SigLIP's t (not its log) and b."""
        return float(np.exp(np.asarray(self.params["t"], np.float32))), float(np.asarray(self.params["b"], np.float32))

    def logits(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """SigLIP logits t * <image, text> + b, [n_images, n_texts]."""
        temperature, bias = self.temperature_and_bias()
        return temperature * (image_embeddings @ text_embeddings.T) + bias

    def score(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """Probability that each text describes each image, sigmoid(logits): [n_images, n_texts]."""
        return _sigmoid(self.logits(self.embed_images(images), self.embed_texts(texts)))

    def score_pairs(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """Probability for matched pairs (image i, text i): [n]."""
        if len(images) != len(texts):
            raise ValueError(f"score_pairs needs as many images as texts, got {len(images)} and {len(texts)}; "
                             "use score() for every combination.")
        image_embeddings, text_embeddings = self.embed_images(images), self.embed_texts(texts)
        temperature, bias = self.temperature_and_bias()
        return _sigmoid(temperature * np.sum(image_embeddings * text_embeddings, axis=-1) + bias)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.sigmoid(jnp.asarray(x, jnp.float32)))
