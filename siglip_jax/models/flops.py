"""Analytic training FLOPs per example, for throughput and MFU.

Counted: matrix multiplications only (2 FLOPs per multiply-add), which dominate at real sizes; norms,
activations and softmax add a few percent. Per transformer block over a sequence of n tokens of width d
with MLP width m:
    q, k, v and output projections  4 x 2 n d^2
    attention scores and weighting  2 x 2 n^2 d
    MLP                              2 x 2 n d m
Image tower: patch embedding 2 n (p^2 3) d, the blocks, MAP head (one query token: q and out 2 x 2 d^2,
k and v 2 x 2 n d^2, attention 2 x 2 n d, MLP 2 x 2 d m), optional head 2 d D. Text tower: the blocks and
its head 2 d D (the token lookup is a gather, no FLOPs). Loss: each example's row of logits against the
global batch B, 2 B D. Caption decoder (model.decoder), over the caption's l tokens at width d: per block
self-attention as an encoder block's without its MLP, cross-attention to the image's n patch tokens of width
d_img (q and out 2 x 2 l d^2, k and v 2 x 2 n d_img d, scores and weighting 2 x 2 l n d), the MLP, and the
vocabulary head 2 l d V. Self-distillation (model.distill, once on): the image tower on each local crop and on
the masked image, the projection head on their pooled vectors and patches, and the teacher's forward (not
trained: 1 x) on the image. Training = forward + backward = 3 x forward (the backward pass computes gradients
for both inputs and weights of every multiplication).
"""
from __future__ import annotations

import ml_collections

from siglip_jax.models import two_towers


def encoder_flops(length: int, width: int, depth: int, mlp_dim: int) -> int:
    per_block = 4 * 2 * length * width**2 + 2 * 2 * length**2 * width + 2 * 2 * length * width * mlp_dim
    return depth * per_block


def image_tower_flops(model_config: ml_collections.ConfigDict, image_size: int = 0) -> int:
    """One image at `image_size` pixels a side (0: the config's)."""
    vit = two_towers.build_vit(model_config)
    size = image_size or model_config.image.image_size
    # A NaFlex tower runs on its whole (padded) patch budget; the posemb resize is not counted.
    tokens = (model_config.image.max_num_patches if model_config.image.kind == "naflex"
              else (size // vit.patch_size) ** 2)
    flops = 2 * tokens * vit.patch_size**2 * 3 * vit.width
    flops += encoder_flops(tokens + (vit.pooling == "tok"), vit.width, vit.depth, vit.mlp_dim)
    if vit.pooling == "map":
        flops += 2 * 2 * vit.width**2 + 2 * 2 * tokens * vit.width**2 + 2 * 2 * tokens * vit.width
        flops += 2 * 2 * vit.width * vit.mlp_dim
    if vit.head_dim:
        flops += 2 * vit.width * vit.head_dim
    return flops


def text_tower_flops(model_config: ml_collections.ConfigDict) -> int:
    text = two_towers.build_text_transformer(model_config)
    return encoder_flops(text.max_len, text.width, text.depth, text.mlp_dim) + 2 * text.width * text.head_dim


def decoder_flops(model_config: ml_collections.ConfigDict) -> int:
    decoder = two_towers.build_decoder(model_config)
    if decoder is None:
        return 0
    vit = two_towers.build_vit(model_config)
    patches = (model_config.image.image_size // vit.patch_size) ** 2
    length, width = decoder.max_len, decoder.width
    self_attention = 4 * 2 * length * width**2 + 2 * 2 * length**2 * width
    cross_attention = 2 * 2 * length * width**2 + 2 * 2 * patches * vit.width * width + 2 * 2 * length * patches * width
    mlp = 2 * 2 * length * width * decoder.mlp_dim
    return decoder.depth * (self_attention + cross_attention + mlp) + 2 * length * width * decoder.vocab_size


def distill_flops(model_config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(the student's extra forward FLOPs per example, the teacher's) of SigLIP 2's SILC and TIPS (model.distill)
    once they are on: the teacher's image tower on the image and its head on the pooled vector and every patch;
    the student's tower on each local crop with the head on its pooled vector (SILC), and on the masked image with
    the head on every patch (TIPS)."""
    head = two_towers.build_distill_head(model_config)
    if head is None:
        return 0, 0
    vit = two_towers.build_vit(model_config)
    patches = (model_config.image.image_size // vit.patch_size) ** 2
    features = vit.head_dim or vit.width
    per_vector = 2 * (features * head.hidden + head.hidden * head.bottleneck + head.bottleneck * head.prototypes)
    whole = image_tower_flops(model_config) + (1 + patches) * per_vector
    student = 0
    if model_config.distill.weight:
        local = image_tower_flops(model_config, two_towers.local_image_size(model_config)) + per_vector
        student += model_config.distill.n_local * local
    if model_config.distill.masked_weight:
        student += image_tower_flops(model_config) + patches * per_vector
    return student, whole


def loss_flops(global_batch_size: int, embed_dim: int) -> int:
    return 2 * global_batch_size * embed_dim


def train_flops_per_example(model_config: ml_collections.ConfigDict, global_batch_size: int,
                            distilling: bool = False) -> int:
    """Training FLOPs of one example; `distilling`: with SILC and TIPS's views (the teacher's forward only)."""
    forward = image_tower_flops(model_config) + text_tower_flops(model_config) + decoder_flops(model_config)
    forward += loss_flops(global_batch_size, two_towers.embedding_width(model_config))
    student, teacher = distill_flops(model_config) if distilling else (0, 0)
    return 3 * (forward + student) + teacher
