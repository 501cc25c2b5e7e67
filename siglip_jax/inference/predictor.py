"""Embed and score for users and servers: load a model from any source siglip_jax.io.loading reads (an
exported params file, an HF SigLIP directory, a big_vision .npz, a training workdir); embed images (paths, bytes or
arrays) and texts (strings) with the model's own preprocessing and tokenizer; score image-text pairs.

Batches are padded up to a bucket (powers of two up to `batch_size`, see siglip_jax.inference.embedder) and each
bucket is compiled once, so a stream of odd-sized requests costs at most log2(batch_size) + 1 compilations per tower.

    model = predictor.load("model.msgpack")
    probabilities = model.score(["dog.jpg", "cat.jpg"], ["a dog", "a cat"])  # [2 images, 2 texts]
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from siglip_jax.data import images as images_lib, preprocess
from siglip_jax.inference import embedder as embedder_lib, scores
from siglip_jax.io import loading, params as params_lib
from siglip_jax.models import two_towers
from siglip_jax.runtime import sharding

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]


# ------------------------------------------------------------------------------------------ loading

def load(path: str, *, batch_size: int = 32, weights: str = "raw") -> "Predictor":
    """A Predictor for the model at `path`: anything siglip_jax.io.loading.load_model reads; `weights="ema"`
    takes a training workdir's moving average of the parameters (optim.ema_decay)."""
    return Predictor.from_exported(loading.load_model(path, weights=weights), batch_size=batch_size)


# ------------------------------------------------------------------------------------ preprocessing

def load_image(image: ImageInput, size: int | preprocess.ImageOptions) -> np.ndarray:
    """A path, encoded bytes or a pixel array -> [size, size, 3] uint8, as the eval pipeline prepares it
    (decode, EXIF orientation, alpha on white, bilinear squash to the square), or with NaFlex
    ImageOptions the packed patches (aspect ratio kept). Float arrays are read as [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            image = file.read()
    pixels = images_lib.decode_image(image)
    if isinstance(size, preprocess.ImageOptions):
        return preprocess.eval_view(pixels, size)
    if pixels.shape[:2] != (size, size):
        pixels = images_lib.eval_transform(pixels, size)
    return pixels


def _is_packed(image: ImageInput, shape: tuple[int, ...]) -> bool:
    """Whether `image` is already a NaFlex model's packed patches (which load_image would misread as pixels)."""
    return len(shape) == 2 and isinstance(image, np.ndarray) and image.shape == shape and image.dtype == np.uint8


class Predictor:
    """Image and text embeddings [n, embed] (L2-normalised float32) and match probabilities for one model,
    with its own preprocessing and tokenizer. Embedding is siglip_jax.inference.embedder.Embedder's (bucketed, on
    `mesh`, by default the first local device); scores are evaluation.scores' for the model's loss."""

    def __init__(self, config: ml_collections.ConfigDict, params, tokenizer=None, batch_size: int = 32,
                 mesh: Mesh | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.config = config
        self.model = two_towers.build_model(config.model)
        if mesh is None:
            mesh = sharding.create_mesh((1, 1, 1), ("data", "fsdp", "tensor"), jax.local_devices()[:1])
        axis_rules = sharding.rules_as_tuples(config.mesh.axis_rules)
        shardings = two_towers.param_shardings(config.model, mesh, axis_rules)
        self.params = jax.device_put(params, shardings)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.image_size = config.model.image.image_size
        self.image_options = two_towers.image_options(config)  # what load_image takes for this model
        self.max_len = config.model.text.max_len
        self._embedder = embedder_lib.Embedder(self.model, mesh, axis_rules, batch_size, shardings)

    @classmethod
    def from_exported(cls, exported: params_lib.ExportedParams, batch_size: int = 32) -> "Predictor":
        return cls(exported.config, exported.params, params_lib.make_tokenizer(exported), batch_size)

    @property
    def compiled_buckets(self) -> tuple[tuple[str, int], ...]:
        """(tower, batch) of every executable compiled so far."""
        return self._embedder.compiled_buckets

    @property
    def embedding_width(self) -> int:
        return two_towers.embedding_width(self.config.model)

    def embed_images(self, images: Sequence[ImageInput] | np.ndarray) -> np.ndarray:
        """Paths, encoded bytes or pixel arrays (or one [n, h, w, 3] array) -> [n, embed] float32. For a
        NaFlex model, packed patches uint8 [n, patches, channels] (data/naflex.py) pass as they are."""
        shape = two_towers.image_input_shape(self.config.model)
        if isinstance(images, np.ndarray) and len(shape) == 2 and images.shape[1:] == shape:
            return self._embedder.images(self.params, images.astype(np.uint8))
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        pixels = [image if _is_packed(image, shape) else load_image(image, self.image_options) for image in images]
        batch = np.stack(pixels) if pixels else np.zeros((0, *shape), np.uint8)
        return self._embedder.images(self.params, batch)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> [n, embed] float32, tokenized as in training."""
        if isinstance(texts, str):
            raise TypeError(f"embed_texts takes a list of strings, got the single string {texts!r}; wrap it: [text].")
        if self.tokenizer is None:
            raise ValueError("This Predictor has no tokenizer; pass one, or use embed_token_ids.")
        return self.embed_token_ids(self.tokenizer(list(texts)))

    def embed_token_ids(self, token_ids: np.ndarray) -> np.ndarray:
        """[n, max_len] int token ids -> [n, embed] float32."""
        token_ids = np.asarray(token_ids, np.int32)
        if token_ids.ndim != 2 or token_ids.shape[1] != self.max_len:
            raise ValueError(f"Token ids must be [n, {self.max_len}], got {token_ids.shape}.")
        return self._embedder.texts(self.params, token_ids)

    def temperature_and_bias(self) -> tuple[float, float]:
        """SigLIP's t (not its log) and b."""
        return float(np.exp(np.asarray(self.params["t"], np.float32))), float(np.asarray(self.params["b"], np.float32))

    def probabilities(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray, over: str = "texts") -> np.ndarray:
        """Match probabilities [n_images, n_texts] of embeddings, for this model's loss (evaluation.scores)."""
        return np.asarray(scores.match_probabilities(
            image_embeddings, text_embeddings, self.params["t"], self.params["b"], self.config.loss.name, over,
            self.config.loss.max_temperature))

    def score_description(self, over: str = "texts") -> str:
        """What this model's probabilities are (its loss decides: evaluation.scores.describe)."""
        return scores.describe(self.config.loss.name, over)

    def score(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """Probability that each text describes each image: [n_images, n_texts] (see evaluation.scores)."""
        return self.probabilities(self.embed_images(images), self.embed_texts(texts))

    def score_pairs(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """Probability for matched pairs (image i, text i): [n]."""
        if len(images) != len(texts):
            raise ValueError(f"score_pairs needs as many images as texts, got {len(images)} and {len(texts)}; "
                             "use score() for every combination.")
        return np.asarray(scores.pair_probabilities(
            self.embed_images(images), self.embed_texts(texts), self.params["t"], self.params["b"], self.config.loss.name,
            self.config.loss.max_temperature))
