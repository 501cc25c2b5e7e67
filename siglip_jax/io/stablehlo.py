"""Export the image and text embedding functions as serialized `jax.export` artifacts (StableHLO inside),
with a symbolic batch dimension, so a server runs them with JAX alone: no flax, no model code.

The directory written by `save_stablehlo`:
    embed_images.jax_exported   (params, images uint8 [batch, size, size, 3]) -> [batch, embed] float32
    embed_texts.jax_exported    (params, token_ids int32 [batch, max_len])    -> [batch, embed] float32
    params.msgpack              the parameters, config and tokenizer (siglip_jax.io.params format)
    signature.json              input shapes and dtypes, embedding width, platforms; for humans and servers

Parameters are an argument rather than baked-in constants: the artifacts stay small, and one artifact
serves any checkpoint of the same architecture. Embeddings come out L2-normalised.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from siglip_jax.io import checkpoint, params as params_lib
from siglip_jax.models import two_towers

IMAGE_FUNCTION_FILE = "embed_images.jax_exported"
TEXT_FUNCTION_FILE = "embed_texts.jax_exported"
PARAMS_FILE = "params.msgpack"
SIGNATURE_FILE = "signature.json"


def export_embedders(config: ml_collections.ConfigDict, params,
                     platforms: Sequence[str] | None = None) -> tuple[jax.export.Exported, jax.export.Exported]:
    """(image embedder, text embedder) as jax.export.Exported with a symbolic batch dimension.

    `platforms` (e.g. ("cpu", "cuda", "tpu")) defaults to the platform JAX runs on now; several platforms
    give one artifact that runs on each.
    """
    model = two_towers.build_model(config.model)
    (batch,) = jax.export.symbolic_shape("batch")
    max_len = config.model.text.max_len
    images = jax.ShapeDtypeStruct((batch, *two_towers.image_input_shape(config.model)), jnp.uint8)
    token_ids = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
    abstract_params = checkpoint.abstract_like(params)

    def embed_images(params, images):
        return model.apply({"params": params}, images, method=model.embed_images)

    def embed_texts(params, token_ids):
        return model.apply({"params": params}, token_ids, method=model.embed_texts)

    options = {} if platforms is None else {"platforms": tuple(platforms)}
    image_exported = jax.export.export(jax.jit(embed_images), **options)(abstract_params, images)
    text_exported = jax.export.export(jax.jit(embed_texts), **options)(abstract_params, token_ids)
    return image_exported, text_exported


def save_stablehlo(directory: str, config: ml_collections.ConfigDict, params, dtype: str = "float32",
                   platforms: Sequence[str] | None = None) -> None:
    """Writes the two serialized functions, the params file and signature.json to `directory`."""
    os.makedirs(directory, exist_ok=True)
    params = params_lib.cast_params(params, dtype)
    image_exported, text_exported = export_embedders(config, params, platforms)
    for name, exported in ((IMAGE_FUNCTION_FILE, image_exported), (TEXT_FUNCTION_FILE, text_exported)):
        with open(os.path.join(directory, name), "wb") as file:
            file.write(exported.serialize())
    params_lib.save_params_file(os.path.join(directory, PARAMS_FILE), config, params, dtype=dtype)
    max_len = config.model.text.max_len
    image_range = ("packed NaFlex patches (siglip_jax.data.naflex)" if config.model.image.kind == "naflex"
                   else "[0, 255] RGB")
    signature = {
        "images": {"shape": ["batch", *two_towers.image_input_shape(config.model)], "dtype": "uint8",
                   "range": image_range},
        "token_ids": {"shape": ["batch", max_len], "dtype": "int32"},
        "embedding_width": two_towers.embedding_width(config.model),
        "platforms": list(image_exported.platforms),
        "params_dtype": dtype,
        "tokenizer": config.data.tokenizer,
    }
    with open(os.path.join(directory, SIGNATURE_FILE), "w") as file:
        json.dump(signature, file, indent=2)
        file.write("\n")
