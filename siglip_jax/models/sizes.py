"""Transformer sizes by name, as published for ViT / SigLIP (width, depth, MLP width, heads).

A variant string is "<size>" or "<size>/<patch>", e.g. "B/16" or "So400m/14". The table is data: adding
a size is one entry here.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


# Equal to big_vision's models/vit.py `decode_variant` (Table 2 of arXiv:2106.04560, plus So400m from
# arXiv:2305.13035 and the "-opt" shapes tuned for TPU). "mu" is big_vision's tiny test size; our tests
# and the CPU demo use it with explicit overrides.
SIZES: dict[str, TransformerSize] = {
    "mu": TransformerSize(width=32, depth=1, mlp_dim=128, num_heads=2),
    "Ti": TransformerSize(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": TransformerSize(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": TransformerSize(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": TransformerSize(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": TransformerSize(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": TransformerSize(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "H": TransformerSize(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": TransformerSize(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "g-opt": TransformerSize(width=1536, depth=40, mlp_dim=6144, num_heads=16),
    "G": TransformerSize(width=1664, depth=48, mlp_dim=8192, num_heads=16),
    "G-opt": TransformerSize(width=1536, depth=48, mlp_dim=8192, num_heads=16),
    "e": TransformerSize(width=1792, depth=56, mlp_dim=15360, num_heads=16),
}


def parse_variant(variant: str) -> tuple[TransformerSize, int | None]:
    """"B/16" -> (size of B, 16); "B" -> (size of B, None)."""
    name, _, patch = variant.partition("/")
    if name not in SIZES:
        raise ValueError(
            f"Unknown model size {name!r} in variant {variant!r}. Valid sizes: {', '.join(SIZES)} "
            "(optionally with a patch size, e.g. 'B/16')."
        )
    if patch and not patch.isdigit():
        raise ValueError(f"Patch size in variant {variant!r} must be a positive integer, e.g. 'B/16'.")
    return SIZES[name], (int(patch) if patch else None)
