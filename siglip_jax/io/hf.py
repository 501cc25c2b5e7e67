"""Our SigLIP <-> Hugging Face `transformers.SiglipModel` (a NaFlex model <-> `Siglip2Model`): config
mapping, and reading/writing an HF model directory (config.json, model.safetensors, tokenizer and
preprocessor files).

Only numpy is needed here: the safetensors file is written directly (see safetensors_file.py), so
exporting does not pull in PyTorch; tests use transformers as the independent reference. The key
table and the params <-> state-dict conversions are in hf_state_dict.py; their public names are
importable from here too.
"""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np

from siglip_jax import config as config_lib
from siglip_jax.io import big_vision, safetensors_file
from siglip_jax.io.hf_state_dict import (from_hf_state_dict, image_tower_geometry, text_tower_size,
                                         to_hf_state_dict)
from siglip_jax.models import layers, sizes

# Both are the tanh approximation of GELU that SigLIP's MLP blocks use (flax `approximate=True`).
TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu_new")
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SENTENCEPIECE_NAME = "spiece.model"  # the vocabulary file name SiglipTokenizer expects


# ------------------------------------------------------------------------------------------ config

def check_exportable(model_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the setting and the fix, if HF's SiglipModel cannot represent the model."""
    if model_config.image.kind not in ("vit", "naflex") or model_config.text.kind != "transformer":
        raise ValueError(
            f"HF SiglipModel / Siglip2Model have a ViT or NaFlex image tower and a transformer text tower; this model has "
            f"model.image.kind={model_config.image.kind!r}, model.text.kind={model_config.text.kind!r}."
        )
    if model_config.embed_dim:
        raise ValueError(
            f"model.embed_dim={model_config.embed_dim} adds an image projection head, which HF SiglipVisionModel "
            "does not have. Only models trained with model.embed_dim=0 (SigLIP's layout) export to HF; use "
            "--format params or stablehlo for this one."
        )
    if model_config.image.pooling != "map":
        raise ValueError(
            f"model.image.pooling={model_config.image.pooling!r}, but HF SiglipVisionModel pools with a MAP head "
            "only ('map'). Use --format params or stablehlo for this model."
        )


def to_hf_config(model_config: ml_collections.ConfigDict, eos_id: int = 1, pad_id: int = 1) -> dict:
    """The config.json dict of an HF SiglipModel with our model's shapes. `eos_id`/`pad_id` are the
    tokenizer's (SigLIP pads with EOS)."""
    check_exportable(model_config)
    image_size, patch_size, resolution = image_tower_geometry(model_config)
    text_size = text_tower_size(model_config)
    common = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=layers.LAYER_NORM_EPSILON, attention_dropout=0.0)
    naflex = model_config.image.kind == "naflex"
    model_type = "siglip2" if naflex else "siglip"
    # SigLIP 2 stores NaFlex's square posemb grid as its number of patches; SigLIP the square resolution.
    geometry = {"num_patches": resolution**2} if naflex else {"image_size": resolution}
    return {
        "architectures": ["Siglip2Model" if naflex else "SiglipModel"],
        "model_type": model_type,
        "initializer_factor": 1.0,
        "vision_config": {
            "model_type": f"{model_type}_vision_model",
            "hidden_size": image_size.width,
            "intermediate_size": image_size.mlp_dim,
            "num_hidden_layers": image_size.depth,
            "num_attention_heads": image_size.num_heads,
            "num_channels": 3,
            **geometry,
            "patch_size": patch_size,
            "vision_use_head": True,
            **common,
        },
        "text_config": {
            "model_type": f"{model_type}_text_model",
            "vocab_size": model_config.text.vocab_size,
            "hidden_size": text_size.width,
            "intermediate_size": text_size.mlp_dim,
            "num_hidden_layers": text_size.depth,
            "num_attention_heads": text_size.num_heads,
            "max_position_embeddings": model_config.text.max_len,
            # The text head maps to the image width: SigLIP compares embeddings of that width.
            "projection_size": image_size.width,
            "pad_token_id": pad_id,
            "eos_token_id": eos_id,
            "bos_token_id": None,
            **common,
        },
    }


def _check_hf_value(where: str, value, valid, fix: str) -> None:
    if value not in valid:
        raise ValueError(f"HF config {where}={value!r} is not supported; valid: {list(valid)}. {fix}")


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
    """Our config (model section filled in, rest default) for an HF SiglipModel config.json dict."""
    _check_hf_value("model_type", hf_config.get("model_type"), ("siglip", "siglip2"),
                    "Only SiglipModel and Siglip2Model (NaFlex) directories can be read.")
    naflex = hf_config["model_type"] == "siglip2"
    vision, text = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
    for where, tower in (("vision_config", vision), ("text_config", text)):
        _check_hf_value(f"{where}.hidden_act", tower.get("hidden_act", "gelu_pytorch_tanh"), TANH_GELU_NAMES,
                        "Our MLP blocks use the tanh-approximate GELU.")
        eps = tower.get("layer_norm_eps", 1e-6)
        if not np.isclose(eps, layers.LAYER_NORM_EPSILON, rtol=0, atol=1e-9):
            raise ValueError(f"HF config {where}.layer_norm_eps={eps} is not supported; our LayerNorms use "
                             f"{layers.LAYER_NORM_EPSILON}.")
    _check_hf_value("vision_config.vision_use_head", vision.get("vision_use_head", True), (True,),
                    "Our image tower always pools with the MAP head.")
    _check_hf_value("vision_config.num_channels", vision.get("num_channels", 3), (3,), "Images are RGB.")
    resolution = vision.get("image_size", 224)
    if isinstance(resolution, (list, tuple)):
        if len(set(resolution)) != 1:
            raise ValueError(f"HF vision_config.image_size={resolution} is not square; our ViT takes square images.")
        resolution = resolution[0]
    patch = vision.get("patch_size", 16)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    image_width = vision.get("hidden_size", 768)
    projection = text.get("projection_size") or text.get("hidden_size", 768)
    if projection != image_width:
        raise ValueError(
            f"HF text_config.projection_size={projection} differs from vision_config.hidden_size={image_width}; "
            "SigLIP compares embeddings of one width, so this is not a SigLIP model we can represent."
        )

    config = config_lib.default_config()
    image_size = sizes.TransformerSize(image_width, vision.get("num_hidden_layers", 12),
                                       vision.get("intermediate_size", 3072), vision.get("num_attention_heads", 12))
    big_vision.set_tower_size(config.model.image, image_size, patch)
    config.model.image.patch_size = patch
    config.model.image.pooling = "map"
    if naflex:
        config.model.image.kind = "naflex"
        num_patches = vision.get("num_patches", 256)
        side = int(np.sqrt(num_patches))
        if side * side != num_patches:
            raise ValueError(
                f"HF vision_config.num_patches={num_patches} is not a square, so its position embeddings are no "
                "square grid that can be resized to each image; this is not a Siglip2 NaFlex checkpoint we can read.")
        config.model.image.posemb_grid = side
        config.model.image.max_num_patches = num_patches  # the budget; preprocessor_config.json may set another
    else:
        config.model.image.image_size = resolution
    text_size = sizes.TransformerSize(text.get("hidden_size", 768), text.get("num_hidden_layers", 12),
                                      text.get("intermediate_size", 3072), text.get("num_attention_heads", 12))
    big_vision.set_tower_size(config.model.text, text_size)
    config.model.text.vocab_size = text.get("vocab_size", 32000)
    config.model.text.max_len = text.get("max_position_embeddings", 64)
    config.model.embed_dim = 0
    return config


# ------------------------------------------------------------------------------------ directories

def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=2, sort_keys=True)
        file.write("\n")


def _write_sentencepiece_files(directory: str, model_path: str, max_len: int, lowercase: bool) -> tuple[int, int]:
    """Copies the SentencePiece model as spiece.model with SiglipTokenizer configs; returns (eos, pad) ids."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    eos_id = int(processor.eos_id())
    unk_id = int(processor.unk_id())
    shutil.copyfile(model_path, os.path.join(directory, SENTENCEPIECE_NAME))
    special = {"eos_token": processor.id_to_piece(eos_id), "pad_token": processor.id_to_piece(eos_id),
               "unk_token": processor.id_to_piece(unk_id)}
    _write_json(os.path.join(directory, "special_tokens_map.json"), special)
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "SiglipTokenizer", "model_max_length": max_len, "do_lower_case": lowercase, **special,
    })
    return eos_id, eos_id  # SigLIP pads with EOS


def _preprocessor_config(image_config: ml_collections.ConfigDict, patch_size: int) -> dict:
    # Matches data/images.eval_transform (data/naflex.naflex_transform) + to_model_range: bilinear resize
    # (to the square, or aspect kept to fill the patch budget), then [-1, 1].
    normalise = {"resample": 2,  # PIL.Image.BILINEAR
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    if image_config.kind == "naflex":
        return {"image_processor_type": "Siglip2ImageProcessor", "do_resize": True, "patch_size": patch_size,
                "max_num_patches": image_config.max_num_patches, **normalise}
    size = image_config.image_size
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
            "size": {"height": size, "width": size}, **normalise}


def save_hf_directory(directory: str, config: ml_collections.ConfigDict, params, dtype: str = "float32") -> None:
    """Writes config.json, model.safetensors, preprocessor_config.json and, for a SentencePiece tokenizer,
    spiece.model + tokenizer configs, so that `transformers.SiglipModel.from_pretrained(directory)` loads."""
    check_exportable(config.model)
    os.makedirs(directory, exist_ok=True)
    eos_id = pad_id = 1  # the byte tokenizer's and T5/c4_en's
    if config.data.tokenizer == "sentencepiece" and config.data.tokenizer_path:
        eos_id, pad_id = _write_sentencepiece_files(
            directory, config.data.tokenizer_path, config.model.text.max_len, config.data.lowercase)
    hf_config = to_hf_config(config.model, eos_id=eos_id, pad_id=pad_id)
    hf_config["dtype"] = dtype
    _write_json(os.path.join(directory, "config.json"), hf_config)
    _write_json(os.path.join(directory, "preprocessor_config.json"),
                _preprocessor_config(config.model.image, image_tower_geometry(config.model)[1]))
    target = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
    state_dict = {key: value.astype(target) for key, value in to_hf_state_dict(params, config.model).items()}
    safetensors_file.save_file(state_dict, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def read_hf_state_dict(directory: str) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(single):
        return safetensors_file.load_file(single)
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as file:
            shards = sorted(set(json.load(file)["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(safetensors_file.load_file(os.path.join(directory, shard)))
        return state_dict
    raise FileNotFoundError(
        f"No {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory!r}. Save the model with safetensors "
        "(`model.save_pretrained(dir)` does by default); PyTorch .bin files are not read."
    )


def load_hf_directory(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(our config, our params) from an HF SigLIP directory. The tokenizer is set up from spiece.model
    (SentencePiece) or tokenizer.json when present; note HF's SiglipTokenizer also strips punctuation,
    which our SentencePiece tokenizer does not."""
    with open(os.path.join(directory, "config.json")) as file:
        config = config_from_hf(json.load(file))
    preprocessor = os.path.join(directory, "preprocessor_config.json")
    if config.model.image.kind == "naflex" and os.path.isfile(preprocessor):
        with open(preprocessor) as file:
            budget = json.load(file).get("max_num_patches")
        if budget:
            config.model.image.max_num_patches = int(budget)
    params = from_hf_state_dict(read_hf_state_dict(directory), config.model)
    spiece = os.path.join(directory, SENTENCEPIECE_NAME)
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(spiece):
        config.data.tokenizer, config.data.tokenizer_path = "sentencepiece", os.path.abspath(spiece)
    elif os.path.isfile(tokenizer_json):
        config.data.tokenizer, config.data.tokenizer_path = "hf", os.path.abspath(tokenizer_json)
    tokenizer_config = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        with open(tokenizer_config) as file:
            config.data.lowercase = bool(json.load(file).get("do_lower_case", False))
    return config, params
