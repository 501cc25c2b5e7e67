"""Random parameters for export tests: every leaf perturbed, so zero-initialised biases also test mappings."""
import flax.linen as nn
import jax
import numpy as np

from siglip_jax.models import two_towers


def random_params(config, seed=0):
    """A params tree of numpy float32 arrays for `config`'s model."""
    model = two_towers.build_model(config.model)
    images = jax.ShapeDtypeStruct((1, *two_towers.image_input_shape(config.model)), np.float32)
    tokens = jax.ShapeDtypeStruct((1, config.model.text.max_len), np.int32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(seed), images, tokens)["params"])
    rng = np.random.default_rng(seed)
    # Scaled like the initialisers (1/sqrt(fan-in)), so activations stay O(1) and comparisons meaningful.
    return jax.tree.map(
        lambda leaf: (rng.standard_normal(leaf.shape) / np.sqrt(max(leaf.shape[0] if leaf.shape else 1, 1)))
        .astype(np.float32), shapes)
