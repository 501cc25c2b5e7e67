"""big_vision's `.npz` release format (e.g. webli_en_b16_224_63724782.npz) <-> our config and params.

The file holds one array per parameter under the tree path joined with "/", prefixed "params/":
"params/img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel" [embed, heads, head_dim],
"params/txt/Embed_0/embedding" [vocab, width], "params/t" and "params/b" of shape [1]. Our parameter names
are big_vision's, so reading is flattening plus shape handling. Checkpoints trained with `scan=True` stack
the blocks as "Transformer/encoderblock/..." with a leading depth axis; they are unstacked here.

Released files carry no config, so it is inferred from the shapes (`config_from_params`).
"""
from __future__ import annotations

import math
import re

import ml_collections
import numpy as np
from flax import traverse_util

from siglip_jax import config as config_lib
from siglip_jax.models import sizes

PREFIX = "params/"
_SCANNED_BLOCKS = re.compile(r"^(img/Transformer|txt/Encoder_0)/encoderblock/(.*)$")


def save_npz(path: str, params) -> None:
    """Writes `params` in big_vision's key layout (t and b as shape [1], as in its releases)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    arrays = {}
    for key, value in flat.items():
        value = np.asarray(value)
        arrays[PREFIX + key] = value.reshape(1) if key in ("t", "b") else value
    np.savez(path, **arrays)


def _unstack_scanned(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """"<tower>/encoderblock/<rest>" [depth, ...] -> "<tower>/encoderblock_{i}/<rest>" [...]."""
    out = {}
    for key, value in flat.items():
        match = _SCANNED_BLOCKS.match(key)
        if not match:
            out[key] = value
            continue
        tower, rest = match.groups()
        for layer in range(value.shape[0]):
            out[f"{tower}/encoderblock_{layer}/{rest}"] = value[layer]
    return out


def read_npz_params(path: str) -> dict:
    """The params tree of a big_vision .npz (numpy arrays), blocks unstacked, t and b as scalars."""
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.keys())
        if not any(key.startswith(PREFIX) for key in keys) and not any(key.startswith("img/") for key in keys):
            raise ValueError(
                f"{path!r} holds no 'params/img/...' arrays (first keys: {keys[:5]}); it is not a big_vision "
                "two-tower checkpoint."
            )
        # Optimizer state, if saved alongside, lives outside "params/" and is not needed for inference.
        flat = {key[len(PREFIX):] if key.startswith(PREFIX) else key: data[key] for key in keys
                if key.startswith(PREFIX) or not key.startswith("opt")}
    flat = _unstack_scanned(flat)
    for scalar in ("t", "b"):
        if scalar in flat:
            flat[scalar] = flat[scalar].reshape(())
    return traverse_util.unflatten_dict(flat, sep="/")


def _depth(tower: dict, encoder: str) -> int:
    return sum(1 for name in tower[encoder] if re.fullmatch(r"encoderblock_\d+", name))


def _block_size(encoder: dict, depth: int) -> sizes.TransformerSize:
    block = encoder["encoderblock_0"]
    width, num_heads, _ = block["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape
    mlp_dim = block["MlpBlock_0"]["Dense_0"]["kernel"].shape[1]
    return sizes.TransformerSize(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)


def set_tower_size(tower: ml_collections.ConfigDict, size: sizes.TransformerSize, patch: int | None = None) -> None:
    """Sets a tower config to `size`: the variant by name when one matches (e.g. "B/16"), and every field
    explicitly, so the config is right even when no named size matches."""
    name = next((name for name, known in sizes.SIZES.items() if known == size), "mu")
    tower.variant = f"{name}/{patch}" if patch else name
    tower.width, tower.depth, tower.mlp_dim, tower.num_heads = size.width, size.depth, size.mlp_dim, size.num_heads


def config_from_params(params: dict) -> ml_collections.ConfigDict:
    """Our config (model section from the shapes, the rest default) for a big_vision two-tower params tree.

    Assumes square images (the position embedding gives only the patch count) and reads the pooling from
    which parameters exist: MAPHead_0 -> "map", cls -> "tok", neither -> "gap".
    """
    if "img" not in params or "txt" not in params:
        raise ValueError(f"Expected a two-tower params tree with 'img' and 'txt'; got keys {sorted(params)}.")
    image, text = params["img"], params["txt"]
    config = config_lib.default_config()

    patch, _, _, image_width = image["embedding"]["kernel"].shape
    num_patches = image["pos_embedding"].shape[1]
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"The image position embedding has {num_patches} positions, not a square grid; only "
                         "square images are supported.")
    set_tower_size(config.model.image, _block_size(image["Transformer"], _depth(image, "Transformer")), patch)
    config.model.image.patch_size = patch
    config.model.image.image_size = side * patch
    config.model.image.pooling = "map" if "MAPHead_0" in image else ("tok" if "cls" in image else "gap")

    set_tower_size(config.model.text, _block_size(text["Encoder_0"], _depth(text, "Encoder_0")))
    config.model.text.vocab_size, _ = text["Embed_0"]["embedding"].shape
    config.model.text.max_len = text["pos_embedding"].shape[1]

    text_out = text["head"]["kernel"].shape[1]
    if "head" in image:
        config.model.embed_dim = image["head"]["kernel"].shape[1]
    elif text_out != image_width:
        raise ValueError(f"The text head outputs {text_out} features but the image tower (no head) {image_width}; "
                         "the towers do not share an embedding space.")
    return config


def load_npz(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(config inferred from shapes, params) from a big_vision SigLIP .npz."""
    params = read_npz_params(path)
    return config_from_params(params), params
