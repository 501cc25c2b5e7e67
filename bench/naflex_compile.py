"""Compile time of the train step, square ViT vs NaFlex, same tiny towers, side by side in one process
(ratios only: the dev machine is shared). python bench/naflex_compile.py"""
import time

import jax
import numpy as np

from siglip_jax.models import two_towers
from siglip_jax.runtime import sharding
from siglip_jax.training.train_step import build_training
from tests.helpers import tiny_config


def compile_seconds(config) -> float:
    mesh = sharding.create_mesh((1, 1, 1), ("data", "fsdp", "tensor"), jax.devices()[:1])
    training = build_training(config, mesh)
    shape = two_towers.image_input_shape(config.model)
    batch = {"images": jax.ShapeDtypeStruct((config.data.batch_size, *shape), np.uint8),
             "tokens": jax.ShapeDtypeStruct((config.data.batch_size, config.model.text.max_len), np.int32),
             "num_skipped": jax.ShapeDtypeStruct((config.data.batch_size,), np.int32)}
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        training.step.lower(training.abstract_state, batch).compile()
    return time.perf_counter() - start


if __name__ == "__main__":
    # Both with SigLIP's MAP head: NaFlex pools with it only, and tiny_config's one block defaults to mean pooling.
    square = compile_seconds(tiny_config(**{"model.image.pooling": "map"}))
    flex = compile_seconds(tiny_config(**{"model.image.kind": "naflex", "model.image.max_num_patches": 20,
                                          "model.image.posemb_grid": 4, "model.image.pooling": "map"}))
    print(f"train step compile: vit {square:.1f} s, naflex {flex:.1f} s, ratio {flex / square:.2f}")
