"""jax.export artifacts: symbolic batch, equality with the model, and serving without the model code
(flax itself is still imported, by flax.serialization for the params file, but not the model)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from siglip_jax.inference import serving
from siglip_jax.io import stablehlo
from siglip_jax.models import two_towers
from tests.helpers import child_environment, tiny_config
from tests.params_helpers import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = tiny_config()
    params = random_params(config)
    directory = str(tmp_path_factory.mktemp("stablehlo"))
    stablehlo.save_stablehlo(directory, config, params)
    return config, params, directory


def test_file_names_agree():
    for name in ("IMAGE_FUNCTION_FILE", "TEXT_FUNCTION_FILE", "PARAMS_FILE", "SIGNATURE_FILE"):
        assert getattr(serving, name) == getattr(stablehlo, name)


def test_served_functions_equal_the_model(exported):
    config, params, directory = exported
    served = serving.load(directory)
    model = two_towers.build_model(config.model)
    embed_images = jax.jit(lambda images: model.apply({"params": params}, images, method=model.embed_images))
    embed_texts = jax.jit(lambda ids: model.apply({"params": params}, ids, method=model.embed_texts))
    rng = np.random.default_rng(0)
    for batch in (1, 3):  # one artifact, any batch size
        images = rng.integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)
        token_ids = rng.integers(3, 259, (batch, 12)).astype(np.int32)
        np.testing.assert_allclose(
            served.embed_images(images), embed_images(images), atol=1e-6)
        np.testing.assert_allclose(
            served.embed_token_ids(token_ids), embed_texts(token_ids), atol=1e-6)
    with open(os.path.join(directory, "signature.json")) as file:
        signature = json.load(file)
    assert signature["images"]["shape"] == ["batch", 16, 16, 3] and signature["embedding_width"] == 32
    with pytest.raises(ValueError, match="uint8"):
        served.embed_images(np.zeros((1, 16, 16, 3), np.float32))


def test_serving_runs_without_the_model_code(exported):
    _, _, directory = exported
    script = (
        "import sys, numpy as np\n"
        "from siglip_jax.inference import serving\n"
        f"served = serving.load({directory!r})\n"
        "image = served.embed_images(np.zeros((2, 16, 16, 3), np.uint8))\n"
        "text = served.embed_texts(['a dog on a beach'])\n"
        "assert image.shape == (2, 32) and text.shape == (1, 32), (image.shape, text.shape)\n"
        "loaded = [name for name in sys.modules if name.startswith('siglip_jax.models')]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    env = child_environment(None)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
