"""The text tower: SigLIP's text transformer (big_vision `text_transformer.py`, HF `SiglipTextModel`)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from siglip_jax.models import layers


class TextTransformer(nn.Module):
    """Token ids [batch, length] -> embeddings [batch, head_dim].

    Token + learned position embeddings, pre-LN encoder with a final LayerNorm, no attention mask (SigLIP
    pads with EOS and attends over the padding), pooled at the last position (SigLIP's "last" pooling: a
    fixed position, not the first EOS), then a linear head to the shared embedding width.
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    head_dim: int
    dtype: layers.Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    scan_unroll: int = 1  # blocks per scan iteration (layers.Encoder)
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:
        if token_ids.shape[1] != self.max_len:
            raise ValueError(
                f"Token ids have length {token_ids.shape[1]} but the text tower was built for "
                f"{self.max_len}; tokenize with max_len={self.max_len}."
            )
        embedding = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=layers.partitioned(nn.initializers.normal(stddev=self.width**-0.5), ("vocab", "embed")),
            name="Embed_0",
        )
        x = embedding(token_ids).astype(self.dtype)
        posemb = layers.learned_position_embedding(self, "pos_embedding", self.max_len, self.width)
        x = x + posemb.astype(self.dtype)
        x = layers.Encoder(
            self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat_policy, self.scan_layers,
            attention=self.attention, scan_unroll=self.scan_unroll, name="Encoder_0",
        )(x)
        return layers.projection_head(self.head_dim, self.dtype)(x[:, -1, :])
