"""Our SigLIP <-> Hugging Face `transformers.SiglipModel`: config mapping, state-dict mapping, and
reading/writing an HF model directory (config.json, model.safetensors, tokenizer and preprocessor files).

Only numpy is needed here: the safetensors file is written directly (see safetensors_file.py), so
exporting does not pull in PyTorch; tests use transformers as the independent reference.

Layout differences handled below:
  * Dense kernels are [in, out]; torch Linear weights are [out, in].
  * Our attention kernels keep a heads axis: query/key/value [embed, heads, head_dim], out
    [heads, head_dim, embed]; HF flattens heads into one [embed, embed] matrix.
  * The MAP head uses torch.nn.MultiheadAttention, whose query/key/value weights are packed into one
    `in_proj_weight` [3 * embed, embed] (and `in_proj_bias`).
  * The patch embedding is an HWIO conv kernel [p, p, 3, width]; torch Conv2d is OIHW.
  * Position embeddings are [1, length, width]; HF stores nn.Embedding weights [length, width].
  * `t` (log temperature) and `b` are scalars; HF's logit_scale and logit_bias have shape [1].
"""
from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from siglip_jax import config as config_lib
from siglip_jax.export import big_vision, safetensors_file
from siglip_jax.models import layers, sizes, two_towers

# Both are the tanh approximation of GELU that SigLIP's MLP blocks use (flax `approximate=True`).
TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu_new")
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SENTENCEPIECE_NAME = "spiece.model"  # the vocabulary file name SiglipTokenizer expects


# ------------------------------------------------------------------------------------------ config

def check_exportable(model_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the setting and the fix, if HF's SiglipModel cannot represent the model."""
    if model_config.image.kind != "vit" or model_config.text.kind != "transformer":
        raise ValueError(
            f"HF SiglipModel has a ViT image tower and a transformer text tower; this model has "
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


def _image_geometry(model_config: ml_collections.ConfigDict) -> tuple[sizes.TransformerSize, int, int]:
    vit = two_towers.build_vit(model_config)
    size = sizes.TransformerSize(vit.width, vit.depth, vit.mlp_dim, vit.num_heads)
    if model_config.image.image_size % vit.patch_size:
        raise ValueError(
            f"model.image.image_size={model_config.image.image_size} is not a multiple of the patch size "
            f"{vit.patch_size}; HF needs a whole number of patches."
        )
    return size, vit.patch_size, model_config.image.image_size


def _text_size(model_config: ml_collections.ConfigDict) -> sizes.TransformerSize:
    text = two_towers.build_text_transformer(model_config)
    return sizes.TransformerSize(text.width, text.depth, text.mlp_dim, text.num_heads)


def to_hf_config(model_config: ml_collections.ConfigDict, eos_id: int = 1, pad_id: int = 1) -> dict:
    """The config.json dict of an HF SiglipModel with our model's shapes. `eos_id`/`pad_id` are the
    tokenizer's (SigLIP pads with EOS)."""
    check_exportable(model_config)
    image_size, patch_size, resolution = _image_geometry(model_config)
    text_size = _text_size(model_config)
    common = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=layers.LAYER_NORM_EPSILON, attention_dropout=0.0)
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "initializer_factor": 1.0,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": image_size.width,
            "intermediate_size": image_size.mlp_dim,
            "num_hidden_layers": image_size.depth,
            "num_attention_heads": image_size.num_heads,
            "num_channels": 3,
            "image_size": resolution,
            "patch_size": patch_size,
            "vision_use_head": True,
            **common,
        },
        "text_config": {
            "model_type": "siglip_text_model",
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
    _check_hf_value("model_type", hf_config.get("model_type"), ("siglip",),
                    "Only SigLIP (v1) SiglipModel directories can be read; SigLIP 2 / NaFlex differ.")
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
    config.model.image.image_size = resolution
    config.model.image.pooling = "map"
    text_size = sizes.TransformerSize(text.get("hidden_size", 768), text.get("num_hidden_layers", 12),
                                      text.get("intermediate_size", 3072), text.get("num_attention_heads", 12))
    big_vision.set_tower_size(config.model.text, text_size)
    config.model.text.vocab_size = text.get("vocab_size", 32000)
    config.model.text.max_len = text.get("max_position_embeddings", 64)
    config.model.embed_dim = 0
    return config


# ------------------------------------------------------------------------------------- parameters
# Each entry: (our key, HF key, kind, input axes). Kinds: "copy", "scalar" ([] <-> [1]), "posemb"
# ([1, length, width] <-> [length, width]), "flat" ([heads, head_dim] <-> [embed]), "linear" (our kernel's
# first `input axes` axes are fan-in: flatten to [in, out] and transpose), "conv", and "packed_q/k/v"
# (a slice of the MAP head's in_proj_weight / in_proj_bias).

def _block_entries(ours: str, hf: str) -> list[tuple[str, str, str, int]]:
    entries = [
        (f"{ours}/LayerNorm_0/scale", f"{hf}.layer_norm1.weight", "copy", 0),
        (f"{ours}/LayerNorm_0/bias", f"{hf}.layer_norm1.bias", "copy", 0),
        (f"{ours}/LayerNorm_1/scale", f"{hf}.layer_norm2.weight", "copy", 0),
        (f"{ours}/LayerNorm_1/bias", f"{hf}.layer_norm2.bias", "copy", 0),
    ]
    for projection, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        entries += [
            (f"{ours}/MultiHeadDotProductAttention_0/{projection}/kernel", f"{hf}.self_attn.{hf_name}.weight", "linear", 1),
            (f"{ours}/MultiHeadDotProductAttention_0/{projection}/bias", f"{hf}.self_attn.{hf_name}.bias", "flat", 0),
        ]
    entries += [
        (f"{ours}/MultiHeadDotProductAttention_0/out/kernel", f"{hf}.self_attn.out_proj.weight", "linear", 2),
        (f"{ours}/MultiHeadDotProductAttention_0/out/bias", f"{hf}.self_attn.out_proj.bias", "copy", 0),
    ]
    return entries + _mlp_entries(f"{ours}/MlpBlock_0", f"{hf}.mlp")


def _mlp_entries(ours: str, hf: str) -> list[tuple[str, str, str, int]]:
    return [
        (f"{ours}/Dense_0/kernel", f"{hf}.fc1.weight", "linear", 1),
        (f"{ours}/Dense_0/bias", f"{hf}.fc1.bias", "copy", 0),
        (f"{ours}/Dense_1/kernel", f"{hf}.fc2.weight", "linear", 1),
        (f"{ours}/Dense_1/bias", f"{hf}.fc2.bias", "copy", 0),
    ]


def key_table(model_config: ml_collections.ConfigDict) -> list[tuple[str, str, str, int]]:
    """Every parameter of an HF-exportable model: (our "/"-joined key, HF state-dict key, kind, input axes)."""
    image_depth = _image_geometry(model_config)[0].depth
    text_depth = _text_size(model_config).depth
    table = [
        ("t", "logit_scale", "scalar", 0),
        ("b", "logit_bias", "scalar", 0),
        ("img/embedding/kernel", "vision_model.embeddings.patch_embedding.weight", "conv", 0),
        ("img/embedding/bias", "vision_model.embeddings.patch_embedding.bias", "copy", 0),
        ("img/pos_embedding", "vision_model.embeddings.position_embedding.weight", "posemb", 0),
        ("img/Transformer/encoder_norm/scale", "vision_model.post_layernorm.weight", "copy", 0),
        ("img/Transformer/encoder_norm/bias", "vision_model.post_layernorm.bias", "copy", 0),
        ("img/MAPHead_0/probe", "vision_model.head.probe", "copy", 0),
        ("img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel", "vision_model.head.attention.out_proj.weight",
         "linear", 2),
        ("img/MAPHead_0/MultiHeadDotProductAttention_0/out/bias", "vision_model.head.attention.out_proj.bias",
         "copy", 0),
        ("img/MAPHead_0/LayerNorm_0/scale", "vision_model.head.layernorm.weight", "copy", 0),
        ("img/MAPHead_0/LayerNorm_0/bias", "vision_model.head.layernorm.bias", "copy", 0),
        ("txt/Embed_0/embedding", "text_model.embeddings.token_embedding.weight", "copy", 0),
        ("txt/pos_embedding", "text_model.embeddings.position_embedding.weight", "posemb", 0),
        ("txt/Encoder_0/encoder_norm/scale", "text_model.final_layer_norm.weight", "copy", 0),
        ("txt/Encoder_0/encoder_norm/bias", "text_model.final_layer_norm.bias", "copy", 0),
        ("txt/head/kernel", "text_model.head.weight", "linear", 1),
        ("txt/head/bias", "text_model.head.bias", "copy", 0),
    ]
    for projection in ("query", "key", "value"):
        prefix = f"img/MAPHead_0/MultiHeadDotProductAttention_0/{projection}"
        kind = f"packed_{projection[0]}"
        table += [(f"{prefix}/kernel", "vision_model.head.attention.in_proj_weight", kind, 1),
                  (f"{prefix}/bias", "vision_model.head.attention.in_proj_bias", kind, 0)]
    table += _mlp_entries("img/MAPHead_0/MlpBlock_0", "vision_model.head.mlp")
    for layer in range(image_depth):
        table += _block_entries(f"img/Transformer/encoderblock_{layer}", f"vision_model.encoder.layers.{layer}")
    for layer in range(text_depth):
        table += _block_entries(f"txt/Encoder_0/encoderblock_{layer}", f"text_model.encoder.layers.{layer}")
    return table


_PACKED_SLOT = {"packed_q": 0, "packed_k": 1, "packed_v": 2}


def _to_torch_layout(value: np.ndarray, kind: str, input_axes: int) -> np.ndarray:
    if kind == "conv":
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if kind == "linear" or (kind in _PACKED_SLOT and input_axes):
        fan_in = int(np.prod(value.shape[:input_axes]))
        return value.reshape(fan_in, -1).T
    if kind == "posemb":
        return value[0]  # [1, length, width] -> nn.Embedding's [length, width]
    if kind == "scalar":
        return value.reshape(1)
    return value.reshape(-1) if kind in _PACKED_SLOT or kind == "flat" else value


def to_hf_state_dict(params, model_config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Our params tree -> {HF SiglipModel state-dict key: numpy array}, dtypes kept."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    table = key_table(model_config)
    missing = sorted({ours for ours, *_ in table} - set(flat))
    extra = sorted(set(flat) - {ours for ours, *_ in table})
    if missing or extra:
        raise ValueError(
            f"Parameters do not match the model config: missing {missing[:5]}, unexpected {extra[:5]}. Export the "
            "params with the config they were trained with."
        )
    state_dict: dict[str, np.ndarray] = {}
    packed: dict[str, list] = {}
    for ours, hf, kind, input_axes in table:
        value = _to_torch_layout(np.asarray(flat[ours]), kind, input_axes)
        if kind in _PACKED_SLOT:
            packed.setdefault(hf, [None, None, None])[_PACKED_SLOT[kind]] = value
        else:
            state_dict[hf] = np.ascontiguousarray(value)
    for hf, parts in packed.items():
        state_dict[hf] = np.concatenate(parts, axis=0)
    return state_dict


def abstract_params(model_config: ml_collections.ConfigDict) -> dict:
    """Shapes and dtypes of the model's parameters (nothing allocated): a nested dict of ShapeDtypeStructs."""
    model = two_towers.build_model(model_config)
    image_size = model_config.image.image_size
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, model_config.text.max_len), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    return nn.meta.unbox(variables["params"])  # drop the logical-partitioning boxes


def from_hf_state_dict(state_dict: dict[str, np.ndarray], model_config: ml_collections.ConfigDict) -> dict:
    """{HF key: array} -> our params tree (numpy, dtypes kept), shaped as `model_config`'s model."""
    expected = traverse_util.flatten_dict(abstract_params(model_config), sep="/")
    table = key_table(model_config)
    missing = sorted({hf for _, hf, *_ in table} - set(state_dict))
    if missing:
        raise ValueError(
            f"HF state dict lacks {len(missing)} tensors the config needs, e.g. {missing[:5]}. Is this a SiglipModel "
            "checkpoint matching its config.json?"
        )
    flat = {}
    for ours, hf, kind, input_axes in table:
        value = np.asarray(state_dict[hf])
        if kind in _PACKED_SLOT:
            value = np.split(value, 3, axis=0)[_PACKED_SLOT[kind]]
        if kind == "conv":
            value = value.transpose(2, 3, 1, 0)
        elif kind == "linear" or (kind in _PACKED_SLOT and input_axes):
            value = value.T
        shape = expected[ours].shape
        if value.size != int(np.prod(shape)):
            raise ValueError(f"HF tensor {hf!r} has shape {state_dict[hf].shape}, which does not fit our {ours!r} "
                             f"of shape {shape}; the config.json does not describe these weights.")
        flat[ours] = np.array(value.reshape(shape))  # ascontiguousarray would turn scalars 1-d
    return traverse_util.unflatten_dict(flat, sep="/")


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


def _preprocessor_config(image_size: int) -> dict:
    # Matches data/images.eval_transform + to_model_range: bilinear squash to the square, then [-1, 1].
    return {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True,
        "size": {"height": image_size, "width": image_size}, "resample": 2,  # PIL.Image.BILINEAR
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }


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
                _preprocessor_config(config.model.image.image_size))
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
