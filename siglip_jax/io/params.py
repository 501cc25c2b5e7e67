"""The exported-params file: inference parameters (no optimizer state), optionally bfloat16, with the
config that built them and the tokenizer file, in one self-describing msgpack file.

    {"__format__": "siglip_jax.params", "version": 1,
     "config": config as JSON text, "params": the params tree (numpy arrays),
     "tokenizer_file_name": str or "", "tokenizer_file": bytes or b""}

One file, so a model travels as one object; the tokenizer's bytes ride along because the config's
tokenizer_path points into the machine that trained it. This module does not import the model code, so
serving can load parameters without it.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import ml_collections
import numpy as np
from flax import serialization

from siglip_jax import config as config_lib
from siglip_jax.data import tokenizers
from siglip_jax.runtime import storage

FORMAT_NAME = "siglip_jax.params"
FORMAT_VERSION = 1
PARAM_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ExportedParams:
    config: ml_collections.ConfigDict
    params: dict
    tokenizer_file_name: str = ""  # base name of the tokenizer's model file, "" when it needs none
    tokenizer_file: bytes = b""


def towers_only(exported: ExportedParams) -> ExportedParams:
    """`exported` without SigLIP 2's training-only parts: the caption decoder (params["dec"], model.decoder) and the
    self-distillation head and mask token (params["distill"], params["img"]["mask_token"], model.distill): the two
    towers a user embeds and serves with. Unchanged when there are none."""
    if ("dec" not in exported.params and "distill" not in exported.params and not exported.config.model.decoder.weight
            and not (exported.config.model.distill.weight or exported.config.model.distill.masked_weight)):
        # (model.distill read here, not through models.two_towers: serving loads params files without model code)
        return exported
    config = ml_collections.ConfigDict(exported.config.to_dict())
    config.model.decoder.weight = 0.0
    config.model.distill.weight = config.model.distill.masked_weight = 0.0
    params = {name: value for name, value in exported.params.items() if name not in ("dec", "distill")}
    if isinstance(params.get("img"), dict) and "mask_token" in params["img"]:
        params["img"] = {name: value for name, value in params["img"].items() if name != "mask_token"}
    return dataclasses.replace(exported, config=config, params=params)


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json(sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A full, validated config from its JSON (see siglip_jax.config.from_json)."""
    return config_lib.from_json(text)


def cast_params(params, dtype: str):
    """Floating leaves to `dtype` ("float32" or "bfloat16"); integer leaves unchanged. Returns numpy."""
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"Unknown params dtype {dtype!r}; valid: {', '.join(PARAM_DTYPES)}.")
    target = np.dtype(jax.numpy.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)

    def cast(leaf):
        leaf = np.asarray(jax.device_get(leaf))
        return leaf.astype(target) if np.issubdtype(leaf.dtype, np.floating) or leaf.dtype == target else leaf

    return jax.tree.map(cast, params)


def tokenizer_asset(config: ml_collections.ConfigDict) -> tuple[str, bytes]:
    path = config.data.tokenizer_path
    if config.data.tokenizer == "byte" or not path:
        return "", b""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config.data.tokenizer_path={path!r} does not exist, so the tokenizer cannot be bundled with the "
            "params. Point --config.data.tokenizer_path at the tokenizer's model file."
        )
    with open(path, "rb") as file:
        return os.path.basename(path), file.read()


def save_params_file(path: str, config: ml_collections.ConfigDict, params, dtype: str = "float32") -> None:
    """Writes `params` (cast to `dtype`), `config` and the tokenizer file to `path`."""
    tokenizer_name, tokenizer_bytes = tokenizer_asset(config)
    payload = {
        "__format__": FORMAT_NAME,  # sorts first (flax writes keys sorted), so is_params_file can sniff it
        "version": FORMAT_VERSION,
        "config": config_to_json(config),
        "params": cast_params(params, dtype),
        "tokenizer_file_name": tokenizer_name,
        "tokenizer_file": tokenizer_bytes,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; the params file needs a file name, e.g. "
                                f"{os.path.join(path, 'model.msgpack')!r}.")
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as file:
            file.write(serialization.msgpack_serialize(payload))
        os.replace(temporary, path)  # readers never see half a file
    finally:
        if os.path.exists(temporary):  # a failed write leaves no half file behind
            os.remove(temporary)


def is_params_file(path: str) -> bool:
    """True if `path` (local, gs:// or s3://) is a file written by save_params_file (checked by content,
    not by name)."""
    location = storage.path(path)
    if not location.is_file():
        return False
    with location.open("rb") as file:
        head = file.read(64)
    return FORMAT_NAME.encode() in head


def load_params_file(path: str) -> ExportedParams:
    """Reads a file written by save_params_file; params come back as numpy arrays in their stored dtype."""
    location = storage.path(path)  # gs:// and s3:// too
    if not location.is_file():
        raise FileNotFoundError(f"No exported params file at {path!r}; write one with "
                                "`python export.py --format params --output FILE`.")
    payload = serialization.msgpack_restore(storage.with_retries(location.read_bytes, f"Reading {path}"))
    if not isinstance(payload, dict) or payload.get("__format__") != FORMAT_NAME:
        raise ValueError(f"{path!r} is not a siglip_jax params file (its '__format__' field is missing or "
                         f"not {FORMAT_NAME!r}).")
    if payload["version"] > FORMAT_VERSION:
        raise ValueError(f"{path!r} has params format version {payload['version']}; this siglip_jax reads up to "
                         f"{FORMAT_VERSION}. Upgrade siglip_jax.")
    return ExportedParams(
        config=config_from_json(payload["config"]),
        params=payload["params"],
        tokenizer_file_name=payload["tokenizer_file_name"],
        tokenizer_file=bytes(payload["tokenizer_file"]),
    )


def make_tokenizer(exported: ExportedParams):
    """The model's tokenizer: the bundled file if there is one, else the config's tokenizer_path."""
    data = exported.config.data
    path = data.tokenizer_path or None
    if exported.tokenizer_file:
        # The bundled copy wins: the recorded path belongs to the machine that trained the model.
        scratch = tempfile.mkdtemp(prefix="siglip_tokenizer_")
        path = os.path.join(scratch, exported.tokenizer_file_name or "tokenizer.model")
        with open(path, "wb") as file:
            file.write(exported.tokenizer_file)
    return tokenizers.make_tokenizer(data.tokenizer, max_len=exported.config.model.text.max_len,
                                     lowercase=data.lowercase, path=None if data.tokenizer == "byte" else path)
