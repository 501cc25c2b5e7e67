"""A NaFlex model end to end: train on the demo data, evaluate, load, embed (inference and search),
export to StableHLO and serve; every consumer gives the model's own embeddings of the packed patches."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from siglip_jax.config import eval_config, source_config
from siglip_jax.data import naflex
from siglip_jax.inference import predictor, search, serving
from siglip_jax.io import loading, stablehlo
from siglip_jax.models import two_towers
from siglip_jax.training import trainer
from tests.helpers import tiny_config

BUDGET = 20  # a 16 px demo picture is a 4 x 4 grid of 4 px patches: 4 positions of padding


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One NaFlex training run that both tests read. Slow (~40-60 s on 2 cores): the NaFlex step is its
    own program (packed patches, another image tower)."""
    workdir = tmp_path_factory.mktemp("naflex_run")
    config = tiny_config(**{"model.image.kind": "naflex", "model.image.pooling": "map", "model.image.max_num_patches": BUDGET,
                            "model.image.posemb_grid": 4})
    config.total_steps = 8
    config.log_every_steps = 4
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 5
    config.evals.shapes = eval_config("retrieval", source_config("demo", split="eval", size=16, image_size=16))
    final = trainer.train(config, str(workdir))
    return config, str(workdir), final


@pytest.mark.slow
def test_naflex_trains_and_evaluates(trained):
    _, workdir, final = trained
    lines = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl").read().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert 0.0 <= final["shapes/image_to_text/recall@5"] <= 1.0


@pytest.mark.slow
def test_loaded_naflex_model_embeds_any_aspect_ratio_in_every_consumer(trained, tmp_path):
    _, workdir, _ = trained
    exported = loading.load_model(workdir)
    config = exported.config
    assert config.model.image.kind == "naflex"
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((12, 40, 3), (36, 16, 3), (16, 16, 3))]
    packed = np.stack([naflex.naflex_transform(picture, 4, BUDGET) for picture in pictures])
    model = two_towers.build_model(config.model)
    params = jax.device_get(exported.params)
    reference = np.asarray(model.apply({"params": params}, packed, method=model.embed_images))

    embedder = predictor.Predictor.from_exported(exported, batch_size=4)  # one bucket of 4: one compile
    np.testing.assert_allclose(embedder.embed_images(pictures), reference, atol=1e-5)  # decoded arrays
    np.testing.assert_allclose(embedder.embed_images(packed), reference, atol=1e-5)  # already packed

    folder = tmp_path / "photos"
    folder.mkdir()
    for number, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / f"{number}.png")
    index = search.build_index(embedder, str(folder), workdir)
    np.testing.assert_allclose(index.embeddings, reference, atol=1e-5)

    stablehlo.save_stablehlo(str(tmp_path / "hlo"), config, params)
    served = serving.load(str(tmp_path / "hlo"))
    np.testing.assert_allclose(served.embed_images(packed), reference, atol=1e-5)
    with pytest.raises(ValueError, match="naflex_transform"):
        served.embed_images(np.zeros((1, 16, 16, 3), np.uint8))
