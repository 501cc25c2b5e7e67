"""The NaFlex image tower (SigLIP 2, big_vision `naflex_vit`, HF `Siglip2VisionModel`): images at their
own aspect ratio as a variable number of flattened patches, padded to a fixed budget.

Input: packed NaFlex images (data/naflex.py) mapped to [-1, 1], [batch, max_patches, p * p * 3 + 4]:
patches, the patch grid (rows, cols) of each image, and from it the mask of the padding. A linear patch
embedding; the learned position embedding is stored as a square grid and resized to each image's grid
(bilinear, antialiased, as torch's F.interpolate(mode="bilinear", align_corners=False, antialias=True),
which HF's reference uses); attention and the MAP head see only the image's own patches, so the padding
never changes an embedding.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from siglip_jax.data.naflex import GRID_CHANNELS
from siglip_jax.models import layers


def read_grid(images: jax.Array) -> jax.Array:
    """Packed images in [-1, 1] [batch, n, d + GRID_CHANNELS] -> the patch grids [batch, 2] int32 (rows, cols)."""
    trailer = jnp.round((images[:, 0, -GRID_CHANNELS:].astype(jnp.float32) + 1.0) * 127.5).astype(jnp.int32)
    return jnp.stack([trailer[:, 0] * 256 + trailer[:, 1], trailer[:, 2] * 256 + trailer[:, 3]], axis=-1)


def antialiased_bilinear_weights(positions: jax.Array, output_size: jax.Array, input_size: int) -> jax.Array:
    """Resampling weights [..., input_size] of output `positions` [...] on an axis resized from `input_size`
    to `output_size` [...] (traced values: each image has its own grid).

    torch's antialiased bilinear filter (align_corners=False): output i is centred at (i + 0.5) * scale in
    input coordinates, scale = input / output; a triangle filter, widened by the scale when shrinking,
    weighs input j at its centre j + 0.5; the weights are normalised to sum to 1. Enlarging, this is plain
    bilinear interpolation with the edge clamped.
    """
    output_size = jnp.maximum(output_size, 1).astype(jnp.float32)  # a 0 x 0 grid (batch padding) stays finite
    scale = input_size / output_size
    inverse_support = jnp.where(scale >= 1.0, 1.0 / scale, 1.0)
    centre = (positions.astype(jnp.float32) + 0.5) * scale
    sources = jnp.arange(input_size, dtype=jnp.float32) + 0.5
    distance = jnp.abs(sources - centre[..., None]) * inverse_support[..., None]
    weights = jnp.maximum(0.0, 1.0 - distance)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def resize_position_embedding(posemb: jax.Array, grids: jax.Array, num_patches: int) -> jax.Array:
    """posemb [side, side, width] -> [batch, num_patches, width]: patch k of image b, at row k // cols and
    column k % cols of its grid `grids[b]` = (rows, cols), gets the grid resized to (rows, cols) at that
    place. Positions past the grid (padding) get position 0's, as HF's: finite, so masked keys stay inert."""
    side = posemb.shape[0]
    if posemb.shape[1] != side:
        raise ValueError(f"The NaFlex position embedding must be a square grid, got {posemb.shape[:2]}.")
    rows, cols = grids[:, :1], jnp.maximum(grids[:, 1:], 1)
    index = jnp.arange(num_patches)[None, :]
    index = jnp.where(index < rows * cols, index, 0)
    row_weights = antialiased_bilinear_weights(index // cols, rows, side)  # [batch, n, side]
    col_weights = antialiased_bilinear_weights(index % cols, cols, side)
    weights = (row_weights[..., :, None] * col_weights[..., None, :]).reshape(grids.shape[0], num_patches, side * side)
    return jnp.einsum("bns,sd->bnd", weights, posemb.reshape(side * side, -1).astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


class NaFlexVisionTransformer(nn.Module):
    """Packed NaFlex images in [-1, 1] [batch, n, p * p * 3 + 4] -> embeddings [batch, width or head_dim].

    `posemb_grid` is the side of the stored square position-embedding grid; n may be any budget (the
    same image gives the same embedding at every n that holds its grid). Pooling is the MAP head, masked.
    """

    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    posemb_grid: int
    head_dim: int | None = None
    dtype: layers.Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    scan_unroll: int = 1  # blocks per scan iteration (layers.Encoder)
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        pixel_channels = self.patch_size * self.patch_size * 3
        if images.ndim != 3 or images.shape[-1] != pixel_channels + GRID_CHANNELS:
            raise ValueError(
                f"NaFlex images must be packed [batch, max_patches, {pixel_channels + GRID_CHANNELS}] for "
                f"{self.patch_size}px patches (data/naflex.py), got shape {images.shape}; prepare them with "
                "siglip_jax.data.naflex.naflex_transform.")
        batch, num_patches, _ = images.shape
        grids = read_grid(images)
        lengths = grids[:, 0] * grids[:, 1]
        x = nn.Dense(
            self.width,
            dtype=self.dtype,
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
            name="embedding",
        )(images[..., :pixel_channels].astype(self.dtype))
        posemb = layers.learned_position_embedding(self, "pos_embedding", self.posemb_grid**2, self.width)
        posemb = resize_position_embedding(
            posemb.reshape(self.posemb_grid, self.posemb_grid, self.width), grids, num_patches)
        x = x + posemb.astype(self.dtype)
        x = layers.Encoder(
            self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat_policy, self.scan_layers,
            attention=self.attention, scan_unroll=self.scan_unroll, name="Transformer",
        )(x, lengths)
        x = layers.MAPHead(self.mlp_dim, self.num_heads, self.dtype, name="MAPHead_0")(x, lengths)
        if self.head_dim is not None:
            x = layers.projection_head(self.head_dim, self.dtype)(x)
        return x
