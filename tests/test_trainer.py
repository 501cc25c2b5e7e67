"""A short end-to-end run of the trainer on the demo data."""
import json

import pytest

from siglip_jax.config import eval_config, source_config
from siglip_jax.data.from_config import build_source, build_tokenizer
from siglip_jax.evaluation import runner
from siglip_jax.io import loading
from siglip_jax.runtime import sharding
from siglip_jax.training import trainer
from tests.helpers import tiny_config


@pytest.mark.slow
def test_short_demo_run_loss_falls_and_logs(tmp_path):
    # The step of tests/resume_recipe.py (tiny_config's rate, EMA 0.9): test_resume.py's train.py runs have
    # compiled it into the session's compilation cache by the time this runs (docs/testing.md).
    config = tiny_config()
    config.total_steps = 40
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.profile_steps = (3, 5)
    config.evals.shapes = eval_config("retrieval", source_config("demo", split="eval", size=32, image_size=16))
    config.optim.ema_decay = 0.9
    final = trainer.train(config, str(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert losses[-1] < losses[0] - 1.0, losses
    steps = [line["step"] for line in lines]
    assert steps[0] == 1 and steps[-1] == 40
    evals = [line for line in lines if "shapes/image_to_text/recall@5" in line]
    assert [line["step"] for line in evals] == [20, 40]
    # The EMA is evaluated beside the raw weights, and what was evaluated is what the checkpoint holds.
    assert [line["step"] for line in lines if "ema/shapes/image_to_text/recall@5" in line] == [20, 40]
    saved_ema = loading.load_model(str(tmp_path), weights="ema")
    offline = runner.evaluate_params(saved_ema.config, saved_ema.params, build_tokenizer(saved_ema.config), build_source,
                                     sharding.create_mesh(config.mesh.shape, config.mesh.axis_names))
    for key, value in offline.items():
        assert final[f"ema/{key}"] == pytest.approx(value, abs=1e-6), key
    for key in ("learning_rate", "temperature", "bias", "examples_per_second"):
        assert key in lines[-1]
    assert 0.0 <= final["shapes/text_to_image/recall@1"] <= 1.0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))  # the jax.profiler trace of steps 3-4
