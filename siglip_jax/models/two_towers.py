"""SigLIP / CLIP two-tower model: image and text towers, L2-normalised embeddings, temperature t
(stored as log t) and bias b, named `img`, `txt`, `t`, `b` as in big_vision.

Adding a tower is one builder function plus one entry in IMAGE_TOWERS or TEXT_TOWERS.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from siglip_jax import config as config_lib
from siglip_jax.data import preprocess
from siglip_jax.models import layers, sizes
from siglip_jax.models.decoder import CaptionDecoder, DecoderOutput
from siglip_jax.models.distill_head import DistillHead
from siglip_jax.models.layers import NORM_FLOOR, l2_normalize  # noqa: F401 (NORM_FLOOR: callers read it here)
from siglip_jax.models.naflex import NaFlexVisionTransformer
from siglip_jax.models.text import TextTransformer
from siglip_jax.models.vit import VisionTransformer
from siglip_jax.runtime.sharding import logical_to_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _tower_size(tower_config: ml_collections.ConfigDict) -> tuple[sizes.TransformerSize, int | None]:
    """The variant's size with any explicit overrides (0 means "from the variant")."""
    size, patch = sizes.parse_variant(tower_config.variant)
    overrides = {
        field: tower_config[field] for field in ("width", "depth", "mlp_dim", "num_heads") if tower_config[field]
    }
    return sizes.TransformerSize(**{**size.__dict__, **overrides}), patch


def embedding_width(model_config: ml_collections.ConfigDict) -> int:
    """The shared embedding width: `embed_dim` if set, else the image tower's width (as SigLIP)."""
    if model_config.embed_dim:
        return model_config.embed_dim
    return _tower_size(model_config.image)[0].width


def build_vit(model_config: ml_collections.ConfigDict) -> nn.Module:
    size, patch = _tower_size(model_config.image)
    patch = model_config.image.patch_size or patch
    if not patch:
        raise ValueError(
            f"No patch size for image variant {model_config.image.variant!r}: write it as e.g. 'B/16' or "
            "set model.image.patch_size."
        )
    return VisionTransformer(
        patch_size=patch,
        width=size.width,
        depth=size.depth,
        mlp_dim=size.mlp_dim,
        num_heads=size.num_heads,
        pooling=model_config.image.pooling,
        head_dim=model_config.embed_dim or None,
        dtype=DTYPES[model_config.dtype],
        remat_policy=model_config.remat_policy,
        scan_layers=model_config.scan_layers,
        scan_unroll=model_config.scan_unroll,
        attention=model_config.attention,
        # SILC's local crops are smaller than the image: the stored grid is the image's, resampled for them
        posemb_grid=model_config.image.image_size // patch if model_config.distill.weight else 0,
        mask_token=bool(model_config.distill.masked_weight),
    )


def naflex_posemb_grid(image_config: ml_collections.ConfigDict) -> int:
    """The side of a NaFlex tower's stored square position-embedding grid."""
    if image_config.posemb_grid:
        return image_config.posemb_grid
    side = math.isqrt(image_config.max_num_patches)
    if side * side != image_config.max_num_patches:
        raise ValueError(
            f"model.image.max_num_patches={image_config.max_num_patches} is not a square, so it gives no square "
            f"position-embedding grid; set model.image.posemb_grid (e.g. {max(side, 1)}) or a square budget.")
    return side


def build_naflex_vit(model_config: ml_collections.ConfigDict) -> nn.Module:
    vit = build_vit(model_config)
    if model_config.image.pooling != "map":
        raise ValueError(f"model.image.kind='naflex' pools with the MAP head only; set model.image.pooling='map' "
                         f"(got {model_config.image.pooling!r}).")
    if model_config.image.max_num_patches < 1:
        raise ValueError(f"model.image.max_num_patches must be positive, got {model_config.image.max_num_patches}.")
    return NaFlexVisionTransformer(
        patch_size=vit.patch_size, width=vit.width, depth=vit.depth, mlp_dim=vit.mlp_dim, num_heads=vit.num_heads,
        posemb_grid=naflex_posemb_grid(model_config.image), head_dim=vit.head_dim, dtype=vit.dtype,
        remat_policy=vit.remat_policy, scan_layers=vit.scan_layers, scan_unroll=vit.scan_unroll, attention=vit.attention,
    )


def _tower_image_options(model_config: ml_collections.ConfigDict) -> preprocess.ImageOptions:
    """What the image tower eats (square pixels or NaFlex patches), without training's augmentation."""
    if model_config.image.kind == "naflex":
        return preprocess.ImageOptions(model_config.image.image_size,
                                       naflex_patch_size=build_naflex_vit(model_config).patch_size,
                                       naflex_max_patches=model_config.image.max_num_patches)
    return preprocess.ImageOptions(model_config.image.image_size)


def image_input_shape(model_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """One example's image array: [size, size, 3] pixels, or a NaFlex tower's packed
    [max_num_patches, p * p * 3 + 4] (preprocess.eval_image_shape)."""
    return preprocess.eval_image_shape(_tower_image_options(model_config))


def image_options(config: ml_collections.ConfigDict) -> preprocess.ImageOptions:
    """The data pipeline's ImageOptions for this model's image tower, with the config's crop and flip."""
    options = dataclasses.replace(_tower_image_options(config.model),
                                  random_crop_scale=tuple(config.data.random_crop_scale),
                                  random_flip=config.data.random_flip)
    distill = config.model.distill
    if distill.weight:  # the student's local views for SILC
        options = dataclasses.replace(options, local_crops=distill.n_local, local_size=local_image_size(config.model),
                                      local_crop_scale=tuple(distill.local_crop_scale))
    return options


def local_image_size(model_config: ml_collections.ConfigDict) -> int:
    """The side of a distillation local crop (config.local_image_size), refused unless whole patches."""
    side = config_lib.local_image_size(model_config)
    patch = build_vit(model_config).patch_size
    if side % patch:
        raise ValueError(f"model.distill.local_image_size={side} is not a multiple of the patch size {patch}; "
                         f"e.g. --config.model.distill.local_image_size={max(side // patch, 1) * patch}.")
    return side


def build_text_transformer(model_config: ml_collections.ConfigDict) -> nn.Module:
    size, _ = _tower_size(model_config.text)
    return TextTransformer(
        vocab_size=model_config.text.vocab_size,
        max_len=model_config.text.max_len,
        width=size.width,
        depth=size.depth,
        mlp_dim=size.mlp_dim,
        num_heads=size.num_heads,
        head_dim=embedding_width(model_config),
        dtype=DTYPES[model_config.dtype],
        remat_policy=model_config.remat_policy,
        scan_layers=model_config.scan_layers,
        scan_unroll=model_config.scan_unroll,
        attention=model_config.attention,
    )


def decoder_size(model_config: ml_collections.ConfigDict) -> sizes.TransformerSize:
    """The caption decoder's shape: model.decoder's non-zero keys, else the text tower's width, MLP and heads
    and half its depth (at least one block)."""
    text, _ = _tower_size(model_config.text)
    decoder = model_config.decoder
    return sizes.TransformerSize(width=decoder.width or text.width, depth=decoder.depth or max(text.depth // 2, 1),
                                 mlp_dim=decoder.mlp_dim or text.mlp_dim, num_heads=decoder.num_heads or text.num_heads)


def build_decoder(model_config: ml_collections.ConfigDict) -> CaptionDecoder | None:
    """The caption decoder (SigLIP 2's LocCa task) when model.decoder.weight > 0, else None."""
    if not model_config.decoder.weight:
        return None
    size = decoder_size(model_config)
    return CaptionDecoder(vocab_size=model_config.text.vocab_size, max_len=model_config.text.max_len,
                          width=size.width, depth=size.depth, mlp_dim=size.mlp_dim, num_heads=size.num_heads,
                          dtype=DTYPES[model_config.dtype], attention=model_config.attention)


def distills(model_config: ml_collections.ConfigDict) -> bool:
    """Whether SigLIP 2's self-distillation or masked prediction is on (model.distill)."""
    return bool(model_config.distill.weight or model_config.distill.masked_weight)


def build_distill_head(model_config: ml_collections.ConfigDict) -> DistillHead | None:
    """SILC / TIPS's projection head when model.distill has a loss on, else None: the image tower's MLP width as
    its hidden width."""
    if not distills(model_config):
        return None
    size, _ = _tower_size(model_config.image)
    return DistillHead(hidden=size.mlp_dim, bottleneck=model_config.distill.head_bottleneck,
                       prototypes=model_config.distill.prototypes, dtype=DTYPES[model_config.dtype])


IMAGE_TOWERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "vit": build_vit, "naflex": build_naflex_vit}
TEXT_TOWERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {"transformer": build_text_transformer}


def to_model_range(images: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1], SigLIP's input range; float images pass unchanged. The data
    pipeline ships uint8 so host-to-device copies are a quarter of float32's."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images


class TwoTowers(nn.Module):
    """(images [b, h, w, 3], token ids [b, l]) -> (image embeddings [b, d], text embeddings [b, d]),
    both L2-normalised float32; `temperature_and_bias` returns the scalar parameters (log t, b)."""

    img: nn.Module
    txt: nn.Module
    temperature_init: float = 10.0
    bias_init: float = -10.0
    dec: CaptionDecoder | None = None  # SigLIP 2's caption decoder (training only: `embed_and_decode`)
    distill: DistillHead | None = None  # SigLIP 2's SILC / TIPS projection head (training only: `distill_*` methods)

    def setup(self):
        self.t = self.param("t", nn.with_logical_partitioning(
            nn.initializers.constant(math.log(self.temperature_init)), ()), ())
        self.b = self.param("b", nn.with_logical_partitioning(
            nn.initializers.constant(self.bias_init), ()), ())

    def embed_images(self, images: jax.Array) -> jax.Array:
        return l2_normalize(self.img(to_model_range(images)))

    def embed_texts(self, token_ids: jax.Array) -> jax.Array:
        return l2_normalize(self.txt(token_ids))

    def temperature_and_bias(self) -> tuple[jax.Array, jax.Array]:
        return self.t, self.b

    def embed_and_decode(self, images: jax.Array, token_ids: jax.Array,
                         parallel: jax.Array) -> tuple[jax.Array, jax.Array, DecoderOutput]:
        """(image embeddings, text embeddings, the caption decoder's output) in one pass of the image tower:
        the decoder reads its patch tokens. `parallel` [b] bool: examples decoded in parallel (decoder.py)."""
        pooled, patch_tokens = self.img(to_model_range(images), return_tokens=True)
        return l2_normalize(pooled), self.embed_texts(token_ids), self.dec(token_ids, patch_tokens, parallel)

    def distill_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The distillation head's logits of the whole images (the teacher's view): (pooled [b, K], per patch
        [b, patches, K])."""
        pooled, patch_tokens = self.img(to_model_range(images), return_tokens=True)
        return self.distill(pooled), self.distill(patch_tokens)

    def distill_local_logits(self, local_images: jax.Array) -> jax.Array:
        """The head's logits of each example's local crops [b, views, s, s, 3] (smaller than the image: the tower's
        position embedding is resampled), as [views, b, K]."""
        batch, views = local_images.shape[:2]
        pooled = self.img(to_model_range(local_images.reshape(batch * views, *local_images.shape[2:])))
        return jnp.swapaxes(self.distill(pooled).reshape(batch, views, -1), 0, 1)

    def distill_masked_logits(self, images: jax.Array, mask: jax.Array) -> jax.Array:
        """The head's per-patch logits [b, patches, K] of the images with the `mask`ed patches [b, patches]
        replaced by the tower's mask token (TIPS's student view)."""
        _, patch_tokens = self.img(to_model_range(images), return_tokens=True, mask=mask)
        return self.distill(patch_tokens)

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.distill is not None and self.is_initializing():  # creates the head's parameters with the towers'
            self.distill_logits(images)
        if self.dec is not None and self.is_initializing():  # creates the decoder's parameters with the towers'
            image_embeddings, text_embeddings, _ = self.embed_and_decode(images, token_ids,
                                                                         jnp.zeros(token_ids.shape[:1], bool))
            return image_embeddings, text_embeddings
        return self.embed_images(images), self.embed_texts(token_ids)


def build_model(model_config: ml_collections.ConfigDict) -> TwoTowers:
    for field, table in (("image", IMAGE_TOWERS), ("text", TEXT_TOWERS)):
        kind = model_config[field].kind
        if kind not in table:
            raise ValueError(f"Unknown model.{field}.kind {kind!r}; valid: {', '.join(table)}.")
    if model_config.attention not in layers.ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown model.attention {model_config.attention!r}; valid: {', '.join(layers.ATTENTION_IMPLEMENTATIONS)}."
        )
    if model_config.dtype not in DTYPES:
        raise ValueError(f"Unknown model.dtype {model_config.dtype!r}; valid: {', '.join(DTYPES)}.")
    return TwoTowers(
        img=IMAGE_TOWERS[model_config.image.kind](model_config),
        txt=TEXT_TOWERS[model_config.text.kind](model_config),
        temperature_init=model_config.temperature_init,
        bias_init=model_config.bias_init,
        dec=build_decoder(model_config),
        distill=build_distill_head(model_config),
    )


def abstract_params(model_config: ml_collections.ConfigDict, *, boxed: bool = False) -> Any:
    """The model's parameters as ShapeDtypeStructs (traced, nothing allocated); `boxed` keeps flax's
    logical-axis boxes, which param_shardings reads."""
    model = build_model(model_config)
    images = jax.ShapeDtypeStruct((1, *image_input_shape(model_config)), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, model_config.text.max_len), jnp.int32)
    params = jax.eval_shape(lambda rng, images, tokens: model.init(rng, images, tokens)["params"],
                            jax.random.key(0), images, tokens)
    return params if boxed else nn.meta.unbox(params)


def param_shardings(model_config: ml_collections.ConfigDict, mesh: Mesh, axis_rules: Any) -> Any:
    """The parameters' layout on `mesh` (as in training), from their logical axis names; traced only."""
    return logical_to_shardings(abstract_params(model_config, boxed=True), mesh, axis_rules)
