"""Transformer building blocks shared by both towers, with the parameter names of big_vision's ViT
(so released checkpoints map over by renaming, not by reshaping) and logical axis names on every
parameter and key activation (mapped to mesh axes by the rules in the config, see sharding.py).

Logical names: parameters use "embed", "mlp", "heads", "kv", "vocab", "length", "norm"; activations use
"act_batch", "act_length", "act_embed", "act_mlp", "act_heads", "act_kv".
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
LAYER_NORM_EPSILON = 1e-6  # SigLIP / big_vision ViT, and HF SiglipConfig.layer_norm_eps
REMAT_POLICIES = ("none", "full", "dots_saveable")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


def cudnn_attention_supported(query: jax.Array) -> bool:
    """Whether cuDNN's fused (flash) attention can take these [batch, length, heads, head_dim] inputs:
    a GPU backend, half-precision inputs and a head dimension that is a multiple of 8 up to 128."""
    head_dim = query.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, implementation: str,
                          key_lengths: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """[b, q, heads, head_dim] x [b, k, heads, head_dim] -> [b, q, heads, head_dim].

    `key_lengths` [b] int32 (optional) attends to the first key_lengths[i] keys of entry i only: padding
    at the end of a sequence (NaFlex patches), in a form both XLA's and cuDNN's kernels take. `mask`
    (optional, boolean, broadcastable to [b, heads, q, k]): True where a query may attend to a key (the
    caption decoder's causal-or-parallel masks).

    `implementation` "auto" takes cuDNN's fused attention where it applies and XLA's elsewhere: JAX's own
    default (implementation=None) is XLA's on every backend, so without this a GPU never runs the
    fused kernel. A cuDNN that refuses the inputs while tracing (an old GPU or library) falls back to XLA.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; valid: {', '.join(ATTENTION_IMPLEMENTATIONS)}."
        )

    def attend(kernel: str) -> jax.Array:
        return jax.nn.dot_product_attention(query, key, value, mask=mask, key_value_seq_lengths=key_lengths,
                                            implementation=kernel)

    if implementation == "auto":
        if not cudnn_attention_supported(query):
            return attend("xla")
        try:
            return attend("cudnn")
        except (RuntimeError, NotImplementedError, ValueError) as error:
            logging.getLogger(__name__).warning("cuDNN attention unavailable (%s); using XLA's.", error)
            return attend("xla")
    return attend(implementation)


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    # Flax computes the statistics in float32 even for bf16 inputs, so no upcast is needed here.
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON,
        dtype=dtype,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class MlpBlock(nn.Module):
    """Dense -> GELU (tanh approximation, as SigLIP) -> Dense. [batch, length, embed] -> same."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        # big_vision's init: xavier kernels, near-zero (not zero) biases.
        bias_init = nn.initializers.normal(stddev=1e-6)
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=partitioned(bias_init, ("mlp",)),
            name="Dense_0",
        )(x)
        x = constrain(x, ("act_batch", "act_length", "act_mlp"))
        x = nn.gelu(x, approximate=True)
        x = nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=partitioned(bias_init, ("embed",)),
            name="Dense_1",
        )(x)
        return x


class HeadsProjection(nn.Module):
    """A dense projection between [.., embed] and [.., heads, head_dim] with flax DenseGeneral's parameter
    layout. Written out (rather than DenseGeneral) so the kernel is initialised in its final shape: flax
    re-runs initialisers to check shapes, and a flattened kernel would not match its logical names."""

    kernel_shape: tuple[int, ...]
    kernel_names: tuple[str, ...]
    bias_names: tuple[str, ...]
    equation: str  # einsum of (inputs, kernel)
    in_axes: tuple[int, ...]  # kernel axes that are fan-in for xavier initialisation
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_axes = tuple(axis for axis in range(len(self.kernel_shape)) if axis not in self.in_axes)
        init = nn.initializers.xavier_uniform(in_axis=self.in_axes, out_axis=out_axes)
        kernel = self.param("kernel", partitioned(init, self.kernel_names), self.kernel_shape)
        bias_shape = tuple(self.kernel_shape[axis] for axis in out_axes)
        bias = self.param("bias", partitioned(nn.initializers.zeros, self.bias_names), bias_shape)
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention, with flax's MultiHeadDotProductAttention parameter layout
    (query/key/value kernels [embed, heads, head_dim], out kernel [heads, head_dim, embed])."""

    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # an entry of ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, key_lengths: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        """[batch, q_length, embed], [batch, kv_length, kv_embed] -> [batch, q_length, embed]; `key_lengths`
        [batch] and `mask` (optional) restrict which keys each query sees (see dot_product_attention). The keys
        may be of another width than the queries (the caption decoder attending to image tokens)."""
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"Width {width} is not divisible by {self.num_heads} attention heads; choose a head "
                "count that divides the width."
            )
        head_dim = width // self.num_heads

        def projection(name: str, in_width: int) -> HeadsProjection:
            return HeadsProjection(
                (in_width, self.num_heads, head_dim), ("embed", "heads", "kv"), ("heads", "kv"),
                "bld,dnh->blnh", in_axes=(0,), dtype=self.dtype, name=name,
            )

        heads_layout = ("act_batch", "act_length", "act_heads", "act_kv")
        kv_width = inputs_kv.shape[-1]
        query = constrain(projection("query", width)(inputs_q), heads_layout)
        key = constrain(projection("key", kv_width)(inputs_kv), heads_layout)
        value = constrain(projection("value", kv_width)(inputs_kv), heads_layout)
        attended = dot_product_attention(query, key, value, self.attention, key_lengths, mask)
        attended = constrain(attended, heads_layout)
        out = HeadsProjection(
            (self.num_heads, head_dim, width), ("heads", "kv", "embed"), ("embed",),
            "blnh,nhd->bld", in_axes=(0, 1), dtype=self.dtype, name="out",
        )
        return out(attended)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    scanned: bool = False  # under nn.scan: take and return (carry, per-layer output)
    attention: str = "auto"  # an entry of ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array, key_lengths: jax.Array | None = None) -> jax.Array | tuple[jax.Array, None]:
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        y = layer_norm("LayerNorm_0", self.dtype)(x)
        y = MultiHeadAttention(self.num_heads, self.dtype, self.attention, name="MultiHeadDotProductAttention_0")(
            y, y, key_lengths)
        x = x + y
        y = layer_norm("LayerNorm_1", self.dtype)(x)
        y = MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_0")(y)
        x = constrain(x + y, ("act_batch", "act_length", "act_embed"))
        return (x, None) if self.scanned else x


def _remat_block(policy: str, scanned: bool) -> type[Encoder1DBlock]:
    # Outside a scan, XLA would merge the recomputation with the original forward pass (undoing the
    # remat) unless CSE is prevented; inside a scan's loop body it cannot, so the barrier is dropped.
    prevent_cse = not scanned
    if policy == "none":
        return Encoder1DBlock
    if policy == "full":
        return nn.remat(Encoder1DBlock, prevent_cse=prevent_cse)
    if policy == "dots_saveable":
        return nn.remat(
            Encoder1DBlock, prevent_cse=prevent_cse, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        )
    raise ValueError(f"Unknown remat policy {policy!r}; valid: {', '.join(REMAT_POLICIES)}.")


class Encoder(nn.Module):
    """A stack of `depth` blocks named encoderblock_{i}, then the final LayerNorm `encoder_norm`.

    With `scan_layers`, one block is compiled and scanned over the depth (compile time independent of
    depth); its parameters are stacked on a leading "layers" axis under the single name `encoderblock`,
    big_vision's scanned layout. `scan_unroll` blocks run per loop iteration: 1 is a loop, `depth` (or more)
    straight-line code. The unrolled stacked layout keeps the per-layer model's step time with a seventh of
    its parameter arrays, so XLA:CPU compiles and loads it from the cache fastest (docs/speed.md).
    """

    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    attention: str = "auto"  # an entry of ATTENTION_IMPLEMENTATIONS
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, key_lengths: jax.Array | None = None) -> jax.Array:
        """[batch, length, embed] -> same; `key_lengths` [batch] masks padding at the end (NaFlex)."""
        block = _remat_block(self.remat_policy, self.scan_layers)
        if self.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,  # the same key lengths for every layer
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
                unroll=min(self.scan_unroll, self.depth),
            )
            x, _ = scanned(self.mlp_dim, self.num_heads, self.dtype, scanned=True, attention=self.attention, name="encoderblock")(x, key_lengths)
        else:
            for layer in range(self.depth):
                x = block(self.mlp_dim, self.num_heads, self.dtype, attention=self.attention, name=f"encoderblock_{layer}")(x, key_lengths)
        return layer_norm("encoder_norm", self.dtype)(x)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the sequence. [b, l, d] -> [b, d]."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_lengths: jax.Array | None = None) -> jax.Array:
        batch, _, width = x.shape
        probe = self.param(
            "probe", partitioned(nn.initializers.xavier_uniform(), (None, None, "embed")), (1, 1, width)
        )
        probe = jnp.tile(probe, (batch, 1, 1)).astype(self.dtype)
        # One query per image: XLA's attention (the default) is as fast as a fused kernel here.
        x = MultiHeadAttention(self.num_heads, self.dtype, name="MultiHeadDotProductAttention_0")(probe, x, key_lengths)
        y = layer_norm("LayerNorm_0", self.dtype)(x)
        x = x + MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_0")(y)
        return x[:, 0]


def projection_head(features: int, dtype: Dtype) -> nn.Dense:
    """The linear `head` from a tower's pooled width to the shared embedding width."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", "embed_out")),
        bias_init=partitioned(nn.initializers.zeros, ("embed_out",)),
        name="head",
    )


def learned_position_embedding(module: nn.Module, name: str, length: int, width: int) -> jax.Array:
    """[1, length, width] parameter, initialised N(0, 1/width) as big_vision's learned posemb."""
    return module.param(
        name,
        partitioned(nn.initializers.normal(stddev=width**-0.5), (None, "length", "embed")),
        (1, length, width),
    )


NORM_FLOOR = 1e-12  # below this a row counts as zero


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of unit length in float32, the one normalisation of the package (the towers' embeddings, eval
    galleries, class prototypes). A row whose norm is under NORM_FLOOR is divided by the floor, so an all-zero
    row stays zero instead of becoming NaN; every other row is exactly x / |x|, as in big_vision and HF."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORM_FLOOR)
