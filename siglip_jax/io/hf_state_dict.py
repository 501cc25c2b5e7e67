"""Our SigLIP params tree <-> the state dict of Hugging Face `transformers.SiglipModel`: the key
table and the layout conversions, in numpy (tests use transformers as the independent reference).

Layout differences handled below:
  * Dense kernels are [in, out]; torch Linear weights are [out, in].
  * Our attention kernels keep a heads axis: query/key/value [embed, heads, head_dim], out
    [heads, head_dim, embed]; HF flattens heads into one [embed, embed] matrix.
  * The MAP head uses torch.nn.MultiheadAttention, whose query/key/value weights are packed into one
    `in_proj_weight` [3 * embed, embed] (and `in_proj_bias`).
  * The patch embedding is an HWIO conv kernel [p, p, 3, width]; torch Conv2d is OIHW. A NaFlex tower
    (HF Siglip2Model) embeds flattened patches with a Dense kernel [p * p * 3, width], a torch Linear.
  * Position embeddings are [1, length, width]; HF stores nn.Embedding weights [length, width].
  * `t` (log temperature) and `b` are scalars; HF's logit_scale and logit_bias have shape [1].
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from siglip_jax.models import layout, sizes, two_towers


def image_tower_geometry(model_config: ml_collections.ConfigDict) -> tuple[sizes.TransformerSize, int, int]:
    """(image tower size, patch size, resolution) of the ViT; raises ValueError for partial patches. A
    NaFlex tower has no fixed resolution: the third value is its position-embedding grid side."""
    vit = two_towers.build_vit(model_config)
    size = sizes.TransformerSize(vit.width, vit.depth, vit.mlp_dim, vit.num_heads)
    if model_config.image.kind == "naflex":
        return size, vit.patch_size, two_towers.naflex_posemb_grid(model_config.image)
    if model_config.image.image_size % vit.patch_size:
        raise ValueError(
            f"model.image.image_size={model_config.image.image_size} is not a multiple of the patch size "
            f"{vit.patch_size}; HF needs a whole number of patches."
        )
    return size, vit.patch_size, model_config.image.image_size


def text_tower_size(model_config: ml_collections.ConfigDict) -> sizes.TransformerSize:
    text = two_towers.build_text_transformer(model_config)
    return sizes.TransformerSize(text.width, text.depth, text.mlp_dim, text.num_heads)


# ------------------------------------------------------------------------------------- parameters
# Each entry: (our key, HF key, kind, input axes). Kinds: "copy", "scalar" ([] <-> [1]), "posemb"
# ([1, length, width] <-> [length, width]), "flat" ([heads, head_dim] <-> [embed]), "linear" (our kernel's
# first `input axes` axes are fan-in: flatten to [in, out] and transpose), "conv", and "packed_q/k/v"
# (a slice of the MAP head's in_proj_weight / in_proj_bias).

def _weights(ours: str, hf: str, kind: str = "linear", input_axes: int = 1,
             bias_kind: str = "copy") -> list[tuple[str, str, str, int]]:
    """A layer's kernel and bias: our {ours}/kernel, {ours}/bias <-> HF {hf}.weight, {hf}.bias."""
    return [(f"{ours}/kernel", f"{hf}.weight", kind, input_axes), (f"{ours}/bias", f"{hf}.bias", bias_kind, 0)]


def _layer_norm(ours: str, hf: str) -> list[tuple[str, str, str, int]]:
    return [(f"{ours}/scale", f"{hf}.weight", "copy", 0), (f"{ours}/bias", f"{hf}.bias", "copy", 0)]


def _block_entries(ours: str, hf: str) -> list[tuple[str, str, str, int]]:
    entries = (_layer_norm(f"{ours}/LayerNorm_0", f"{hf}.layer_norm1")
               + _layer_norm(f"{ours}/LayerNorm_1", f"{hf}.layer_norm2"))
    attention = f"{ours}/MultiHeadDotProductAttention_0"
    for projection, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        entries += _weights(f"{attention}/{projection}", f"{hf}.self_attn.{hf_name}", bias_kind="flat")
    entries += _weights(f"{attention}/out", f"{hf}.self_attn.out_proj", input_axes=2)
    return entries + _mlp_entries(f"{ours}/MlpBlock_0", f"{hf}.mlp")


def _mlp_entries(ours: str, hf: str) -> list[tuple[str, str, str, int]]:
    return _weights(f"{ours}/Dense_0", f"{hf}.fc1") + _weights(f"{ours}/Dense_1", f"{hf}.fc2")


def key_table(model_config: ml_collections.ConfigDict) -> list[tuple[str, str, str, int]]:
    """Every parameter of an HF-exportable model: (our "/"-joined key, HF state-dict key, kind, input axes)."""
    image_depth = image_tower_geometry(model_config)[0].depth
    text_depth = text_tower_size(model_config).depth
    table = [
        ("t", "logit_scale", "scalar", 0),
        ("b", "logit_bias", "scalar", 0),
        *_weights("img/embedding", "vision_model.embeddings.patch_embedding",
                  *(("linear", 1) if model_config.image.kind == "naflex" else ("conv", 0))),
        ("img/pos_embedding", "vision_model.embeddings.position_embedding.weight", "posemb", 0),
        *_layer_norm("img/Transformer/encoder_norm", "vision_model.post_layernorm"),
        ("img/MAPHead_0/probe", "vision_model.head.probe", "copy", 0),
        *_weights("img/MAPHead_0/MultiHeadDotProductAttention_0/out", "vision_model.head.attention.out_proj",
                  input_axes=2),
        *_layer_norm("img/MAPHead_0/LayerNorm_0", "vision_model.head.layernorm"),
        ("txt/Embed_0/embedding", "text_model.embeddings.token_embedding.weight", "copy", 0),
        ("txt/pos_embedding", "text_model.embeddings.position_embedding.weight", "posemb", 0),
        *_layer_norm("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm"),
        *_weights("txt/head", "text_model.head"),
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
    # HF numbers its layers: a scan_layers model's stacked blocks are unrolled first.
    flat = traverse_util.flatten_dict(layout.unroll_blocks(jax.device_get(params)), sep="/")
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


def from_hf_state_dict(state_dict: dict[str, np.ndarray], model_config: ml_collections.ConfigDict) -> dict:
    """{HF key: array} -> our params tree (numpy, dtypes kept), shaped as `model_config`'s model."""
    unrolled_config = ml_collections.ConfigDict(model_config.to_dict())
    unrolled_config.scan_layers = False  # the table is per layer; stacked at the end for a scan_layers model
    expected = traverse_util.flatten_dict(two_towers.abstract_params(unrolled_config), sep="/")
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
    return layout.to_layout(traverse_util.unflatten_dict(flat, sep="/"), model_config.scan_layers)
