"""eval.py, export.py and the inference API on a real training workdir."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from siglip_jax.config import eval_config, source_config
from siglip_jax.inference import predictor
from siglip_jax.training import trainer
from tests.helpers import child_environment, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "resume_recipe.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    config = tiny_config()
    config.total_steps = 3
    config.tensorboard = False
    config.evals.shapes = eval_config("retrieval", source_config("demo", split="eval", size=24, image_size=16))
    config.eval_every_steps = 0
    final = trainer.train(config, str(workdir))
    return workdir, final


def _run(args, timeout=240):
    env = child_environment(PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_eval_cli_reproduces_the_training_eval(workdir, tmp_path):
    directory, final = workdir
    output = tmp_path / "metrics.json"
    stdout = _run(["eval.py", f"--workdir={directory}", f"--output={output}"])
    assert "shapes" in stdout and "image_to_text/recall@5" in stdout
    metrics = json.loads(output.read_text())["metrics"]
    for key in ("shapes/image_to_text/recall@1", "shapes/text_to_image/recall@5", "shapes/mean_recall"):
        assert metrics[key] == pytest.approx(final[key], abs=1e-6)


@pytest.mark.slow
def test_export_params_from_workdir_and_score_pairs(workdir, tmp_path):
    directory, _ = workdir
    exported = tmp_path / "model.msgpack"
    _run(["export.py", "--format=params", f"--workdir={directory}", f"--output={exported}"])
    from_workdir = predictor.load(str(directory))
    from_file = predictor.load(str(exported))
    texts = ["a small red circle at the top left", "a large blue square at the middle"]
    np.testing.assert_allclose(from_file.embed_texts(texts), from_workdir.embed_texts(texts), rtol=1e-6, atol=1e-6)

    from siglip_jax.data.demo import DemoSource
    from PIL import Image

    record = DemoSource("eval", 2, 16)[0]
    image_path = tmp_path / "shape.png"
    Image.fromarray(record["image"]).save(image_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"image": str(image_path), "text": text}) for text in [record["captions"][0], "nothing"]))
    output = tmp_path / "pairs.json"
    _run(["eval.py", f"--checkpoint={exported}", f"--pairs={pairs}", f"--output={output}"])
    scored = json.loads(output.read_text())["pairs"]
    expected = from_file.score_pairs([str(image_path)] * 2, [record["captions"][0], "nothing"])
    np.testing.assert_allclose([pair["probability"] for pair in scored], expected, rtol=1e-5)


@pytest.mark.slow
def test_eval_checkpoint_latest_is_the_latest_step_and_garbage_is_explained(workdir):
    from siglip_jax.evaluation import command

    directory, final = workdir
    latest = command.run(None, str(directory), "latest")["metrics"]
    assert latest["shapes/mean_recall"] == pytest.approx(final["shapes/mean_recall"], abs=1e-6)
    with pytest.raises(ValueError, match="must be a step number .* or 'latest'"):
        command.run(None, str(directory), "newest")
