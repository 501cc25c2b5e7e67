"""Run an exported model with JAX alone: the serialized embedding functions written by
`export.py --format stablehlo` (siglip_jax.io.stablehlo), their parameters and tokenizer. Nothing
here imports the model code or flax.linen, so a server needs only jax, numpy and the tokenizer library.

    served = serving.load("exported/")
    image_embeddings = served.embed_images(uint8_images)    # [n, size, size, 3] -> [n, embed]
    text_embeddings = served.embed_texts(["a dog on a beach"])
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from siglip_jax.io import params as params_lib

# The file names of siglip_jax.io.stablehlo, repeated so serving does not import the exporter
# (which imports the model); tests check the two agree.
IMAGE_FUNCTION_FILE = "embed_images.jax_exported"
TEXT_FUNCTION_FILE = "embed_texts.jax_exported"
PARAMS_FILE = "params.msgpack"
SIGNATURE_FILE = "signature.json"


class ServedModel:
    """The two exported embedding functions with their parameters; any batch size runs (the batch
    dimension is symbolic), each new size compiling once."""

    def __init__(self, directory: str):
        missing = [name for name in (IMAGE_FUNCTION_FILE, TEXT_FUNCTION_FILE, PARAMS_FILE, SIGNATURE_FILE)
                   if not os.path.isfile(os.path.join(directory, name))]
        if missing:
            raise FileNotFoundError(f"{directory!r} lacks {missing}; write it with "
                                    "`python export.py --format stablehlo --output DIR`.")
        with open(os.path.join(directory, SIGNATURE_FILE)) as file:
            self.signature = json.load(file)
        platform = jax.default_backend()
        if platform not in self.signature["platforms"]:
            raise RuntimeError(f"The model in {directory!r} was exported for {self.signature['platforms']}, but JAX "
                               f"runs on {platform!r} here. Re-export with --platforms including {platform!r}.")
        self._image_function = self._deserialize(directory, IMAGE_FUNCTION_FILE)
        self._text_function = self._deserialize(directory, TEXT_FUNCTION_FILE)
        exported = params_lib.load_params_file(os.path.join(directory, PARAMS_FILE))
        self.params = jax.device_put(exported.params)
        self.tokenizer = params_lib.make_tokenizer(exported)
        self.image_size = self.signature["images"]["shape"][1]
        self.max_len = self.signature["token_ids"]["shape"][1]

    @staticmethod
    def _deserialize(directory: str, name: str):
        with open(os.path.join(directory, name), "rb") as file:
            exported = jax.export.deserialize(bytearray(file.read()))
        return jax.jit(exported.call)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, size, size, 3] RGB (a NaFlex model: packed patches [n, patches, channels]) -> [n, embed]
        float32, L2-normalised."""
        images = np.asarray(images)
        expected = tuple(self.signature["images"]["shape"][1:])
        if images.ndim != len(expected) + 1 or images.shape[1:] != expected or images.dtype != np.uint8:
            prepare = ("siglip_jax.data.naflex.naflex_transform" if len(expected) == 2
                       else "siglip_jax.data.images.eval_transform")
            raise ValueError(f"Images must be uint8 [n, {', '.join(map(str, expected))}], got {images.dtype} "
                             f"{images.shape}; prepare them with {prepare}.")
        return np.asarray(self._image_function(self.params, images))

    def embed_token_ids(self, token_ids: np.ndarray) -> np.ndarray:
        """int32 [n, max_len] -> [n, embed] float32, L2-normalised."""
        token_ids = np.asarray(token_ids, np.int32)
        if token_ids.ndim != 2 or token_ids.shape[1] != self.max_len:
            raise ValueError(f"Token ids must be [n, {self.max_len}], got {token_ids.shape}.")
        return np.asarray(self._text_function(self.params, token_ids))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> [n, embed] float32, with the model's tokenizer."""
        return self.embed_token_ids(self.tokenizer(list(texts)))


def load(directory: str) -> ServedModel:
    return ServedModel(directory)
