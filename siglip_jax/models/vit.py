"""The image tower: a Vision Transformer as in SigLIP (big_vision `vit.py`, HF `SiglipVisionModel`)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from siglip_jax.models import init_mapping, layers

POOLING_TYPES = ("map", "gap", "tok")


class VisionTransformer(nn.Module):
    """Images [batch, height, width, 3] in [-1, 1] -> embeddings [batch, width or head_dim].

    Conv patch embedding, learned position embedding, pre-LN encoder with a final LayerNorm, then
    pooling: "map" (multihead attention pooling, SigLIP's default), "gap" (mean over patches) or "tok"
    (a learned class token). `head_dim` adds a final linear projection; SigLIP's image tower has none.
    """

    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    pooling: str = "map"
    head_dim: int | None = None
    dtype: layers.Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    scan_unroll: int = 1  # blocks per scan iteration (layers.Encoder)
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS
    # The side of the stored position-embedding grid; images on another grid (SigLIP 2's smaller local crops) get
    # it resampled bilinearly. 0: the grid of the images the tower is initialised with (then every call's).
    posemb_grid: int = 0
    mask_token: bool = False  # a learned token that replaces masked patches (TIPS; the `mask` argument)

    @nn.compact
    def __call__(self, images: jax.Array, return_tokens: bool = False,
                 mask: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
        """With `return_tokens`, (embeddings, the encoder's patch tokens [batch, patches, width]) for the
        caption decoder (after the final LayerNorm, the class token left out). `mask` [batch, patches] bool
        (needs mask_token): those patches' embeddings are replaced by the mask token before the position
        embedding is added, as TIPS and iBOT do."""
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"Unknown pooling {self.pooling!r}; valid: {', '.join(POOLING_TYPES)}.")
        _, height, width, _ = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "resize the images or pick another patch size."
            )
        x = nn.Conv(
            self.width,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
            name="embedding",
        )(images.astype(self.dtype))
        batch, grid_h, grid_w, channels = x.shape
        x = jnp.reshape(x, (batch, grid_h * grid_w, channels))
        stored = (self.posemb_grid, self.posemb_grid) if self.posemb_grid else (grid_h, grid_w)
        posemb = layers.learned_position_embedding(self, "pos_embedding", stored[0] * stored[1], self.width)
        if stored != (grid_h, grid_w):
            posemb = init_mapping.resample_posemb(posemb, (grid_h, grid_w), stored)
        # Created after the position embedding: a module's parameters draw their initial values in order, so a
        # tower with the mask token starts with the same position embedding as one without.
        if self.mask_token:
            token = self.param("mask_token", layers.partitioned(nn.initializers.zeros, (None, None, "embed")),
                               (1, 1, self.width))
            if mask is not None:
                x = jnp.where(mask[..., None], token.astype(self.dtype), x)
        elif mask is not None:
            raise ValueError("A patch mask needs a tower built with mask_token=True (model.distill.masked_weight > 0).")
        x = x + posemb.astype(self.dtype)

        if self.pooling == "tok":
            cls = self.param(
                "cls", layers.partitioned(nn.initializers.zeros, (None, None, "embed")), (1, 1, self.width)
            )
            x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (batch, 1, 1)), x], axis=1)

        x = layers.Encoder(
            self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat_policy, self.scan_layers,
            attention=self.attention, scan_unroll=self.scan_unroll, name="Transformer",
        )(x)

        patch_tokens = x[:, 1:] if self.pooling == "tok" else x
        if self.pooling == "map":
            x = layers.MAPHead(self.mlp_dim, self.num_heads, self.dtype, name="MAPHead_0")(x)
        elif self.pooling == "gap":
            x = jnp.mean(x, axis=1)
        else:
            x = x[:, 0]

        if self.head_dim is not None:
            x = layers.projection_head(self.head_dim, self.dtype)(x)
        return (x, patch_tokens) if return_tokens else x
