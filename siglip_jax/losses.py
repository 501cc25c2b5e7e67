"""Placeholder until the sharded implementations land: plain global-batch losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_NAMES = ("sigmoid", "softmax")
LOSS_IMPLEMENTATIONS = ("all_gather",)


def sigmoid_loss(image_embeddings, text_embeddings, log_temperature, bias):
    logits = jnp.exp(log_temperature) * image_embeddings.astype(jnp.float32) @ text_embeddings.astype(jnp.float32).T + bias
    labels = 2 * jnp.eye(logits.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def softmax_loss(image_embeddings, text_embeddings, log_temperature):
    logits = jnp.exp(log_temperature) * image_embeddings.astype(jnp.float32) @ text_embeddings.astype(jnp.float32).T
    diag = jnp.diagonal(logits)
    return 0.5 * (jnp.mean(jax.nn.logsumexp(logits, 1) - diag) + jnp.mean(jax.nn.logsumexp(logits, 0) - diag))


def contrastive_loss(image_embeddings, text_embeddings, log_temperature, bias, *, name="sigmoid",
                     implementation="all_gather", mesh=None, batch_axes=("data", "fsdp"), chunk_size=0,
                     bidirectional=False):
    if name == "sigmoid":
        return sigmoid_loss(image_embeddings, text_embeddings, log_temperature, bias)
    return softmax_loss(image_embeddings, text_embeddings, log_temperature)
