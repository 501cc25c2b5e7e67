"""The projection head of SigLIP 2's self-distillation (SILC) and masked prediction (TIPS), DINO's shape: an MLP,
an L2-normalised bottleneck, then linear prototype logits. The student and its EMA teacher each have one; it reads
the image tower's pooled embedding (SILC) or its patch tokens (TIPS)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from siglip_jax.models import layers


class DistillHead(nn.Module):
    """[..., width] features -> [..., prototypes] float32 logits."""

    hidden: int
    bottleneck: int
    prototypes: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden, dtype=self.dtype, name="hidden",
                     kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)))(features)
        x = nn.gelu(x)
        x = nn.Dense(self.bottleneck, dtype=self.dtype, name="bottleneck",
                     kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("mlp", "embed_out")),
                     bias_init=layers.partitioned(nn.initializers.zeros, ("embed_out",)))(x)
        # Unit bottleneck vectors (as DINO) keep the logits' scale set by the prototypes, not by the features.
        x = layers.l2_normalize(x)
        logits = nn.Dense(self.prototypes, use_bias=False, dtype=self.dtype, name="prototypes",
                          kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed_out", "vocab")))(x)
        return logits.astype(jnp.float32)
