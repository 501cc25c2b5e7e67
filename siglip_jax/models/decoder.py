"""The caption decoder of SigLIP 2's LocCa task: a transformer decoder that reads the image tower's un-pooled
patch tokens through cross-attention and predicts the caption's tokens (SigLIP 2, arXiv 2502.14786, section
2.1; the parallel prediction of CapPa, arXiv 2306.07915).

Each example is decoded one of two ways, chosen per example by the train step:
  autoregressive  input [BOS, y_0, ..., y_{l-2}] (teacher forcing), causal self-attention: position i
                  predicts y_i from the tokens before it and the image;
  parallel        every input position is the learned mask token, self-attention over all positions:
                  every y_i is predicted from the image (and the position) alone, which makes the decoder
                  lean on the image more than on the caption's own prefix (CapPa).
The output head (the vocabulary logits) is returned as parameters, not applied: losses.captioning applies it
a chunk of positions at a time, so [batch, length, vocab] logits never exist whole (SigLIP 2's 256k vocabulary).
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from siglip_jax.models import layers


class DecoderOutput(NamedTuple):
    hidden: jax.Array  # [batch, length, width], after the final LayerNorm
    head_kernel: jax.Array  # [width, vocab]
    head_bias: jax.Array  # [vocab]


def self_attention_mask(parallel: jax.Array, length: int) -> jax.Array:
    """[batch, 1, length, length] boolean, True where query i may attend to key j: j <= i (causal) for an
    autoregressive example, every j for a parallel one."""
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None, None] | parallel[:, None, None, None]


def decoder_inputs(token_embeddings: jax.Array, parallel: jax.Array, bos: jax.Array, mask_token: jax.Array) -> jax.Array:
    """[batch, length, width] decoder inputs: [BOS, embed(y_0), ..., embed(y_{l-2})] for autoregressive
    examples, the mask token at every position for parallel ones. `token_embeddings` [batch, length, width]
    embeds the caption's ids y; `parallel` [batch] bool; `bos` and `mask_token` are [width]."""
    batch, _, width = token_embeddings.shape
    shifted = jnp.concatenate([jnp.broadcast_to(bos, (batch, 1, width)), token_embeddings[:, :-1]], axis=1)
    return jnp.where(parallel[:, None, None], mask_token.astype(shifted.dtype), shifted)


class DecoderBlock(nn.Module):
    """Pre-LayerNorm decoder block: x + self_attn(LN(x)) under `mask`, x + cross_attn(LN(x), image tokens),
    x + mlp(LN(x))."""

    mlp_dim: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, image_tokens: jax.Array, mask: jax.Array) -> jax.Array:
        x = layers.constrain(x, ("act_batch", "act_length", "act_embed"))
        y = layers.layer_norm("LayerNorm_0", self.dtype)(x)
        x = x + layers.MultiHeadAttention(self.num_heads, self.dtype, self.attention, name="SelfAttention")(
            y, y, mask=mask)
        y = layers.layer_norm("LayerNorm_1", self.dtype)(x)
        x = x + layers.MultiHeadAttention(self.num_heads, self.dtype, self.attention, name="CrossAttention")(
            y, image_tokens)
        y = layers.layer_norm("LayerNorm_2", self.dtype)(x)
        x = x + layers.MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_0")(y)
        return layers.constrain(x, ("act_batch", "act_length", "act_embed"))


class CaptionDecoder(nn.Module):
    """(caption token ids [batch, length], image patch tokens [batch, patches, image width], parallel [batch]
    bool) -> DecoderOutput. Token and learned position embeddings of its own (not the text tower's), `depth`
    DecoderBlocks, a final LayerNorm, and the output head's parameters."""

    vocab_size: int
    max_len: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, token_ids: jax.Array, image_tokens: jax.Array, parallel: jax.Array) -> DecoderOutput:
        length = token_ids.shape[1]
        if length != self.max_len:
            raise ValueError(f"Caption token ids have length {length} but the decoder was built for {self.max_len}; "
                             f"tokenize with max_len={self.max_len}.")
        embedding = nn.Embed(
            self.vocab_size, self.width, name="Embed_0",
            embedding_init=layers.partitioned(nn.initializers.normal(stddev=self.width**-0.5), ("vocab", "embed")),
        )
        special_init = layers.partitioned(nn.initializers.normal(stddev=self.width**-0.5), ("embed",))
        bos = self.param("bos", special_init, (self.width,))
        mask_token = self.param("mask_token", special_init, (self.width,))
        x = decoder_inputs(embedding(token_ids).astype(self.dtype), parallel, bos.astype(self.dtype), mask_token)
        x = x + layers.learned_position_embedding(self, "pos_embedding", self.max_len, self.width).astype(self.dtype)
        mask = self_attention_mask(parallel, length)
        image_tokens = image_tokens.astype(self.dtype)
        for index in range(self.depth):
            x = DecoderBlock(self.mlp_dim, self.num_heads, self.dtype, self.attention, name=f"decoderblock_{index}")(
                x, image_tokens, mask)
        hidden = layers.layer_norm("decoder_norm", self.dtype)(x)
        return DecoderOutput(hidden, *OutputHead(self.vocab_size, name="head")(self.width))


class OutputHead(nn.Module):
    """The vocabulary projection's parameters (kernel [width, vocab], bias [vocab]), zero-initialised as
    big_vision's heads: the first step's caption loss is exactly log(vocab)."""

    vocab_size: int

    @nn.compact
    def __call__(self, width: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", layers.partitioned(nn.initializers.zeros, ("embed", "vocab")),
                            (width, self.vocab_size))
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros, ("vocab",)), (self.vocab_size,))
        return kernel, bias
