"""One train step on sharded meshes equals the same step on one device, and five steps of the trainer
follow the same loss trajectory on a data, an FSDP and a tensor mesh.

The trajectory runs the variants' own config (`_config()`) so that its data and FSDP meshes load the
steps the variants compiled (the session's compilation cache, tests/conftest.py) instead of compiling
again; only its tensor mesh is a program of its own. Until 2026-12-06 it was tests/test_meshes.py's own
test at twice the width with Adam (three programs; docs/testing.md)."""
import json

import jax
import numpy as np
import pytest

from siglip_jax.runtime import sharding
from siglip_jax.training import trainer
from siglip_jax.training.train_step import build_training
from tests.helpers import tiny_config


def _run_one_step(config, mesh_shape, batch):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.create_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices)
    training = build_training(config, mesh)
    state = training.init_state(jax.random.key(config.seed))
    initial_params = jax.device_get(state.params)
    global_batch = jax.device_put(batch, training.batch_sharding)
    with jax.set_mesh(mesh):
        new_state, metrics = training.step(state, global_batch)
    return jax.device_get(new_state.params), float(metrics["loss"]), new_state, (training.model, initial_params)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {
        "images": rng.integers(0, 256, (16, 16, 16, 3)).astype(np.uint8),
        "tokens": rng.integers(3, 259, (16, 12)).astype(np.int32),
    }


def _config(variant="plain"):
    # SGD, so the update is proportional to the gradient. Adam's first step is lr * g / (|g| + eps): it
    # blows float32 reduction-order noise in gradients that are exactly zero in theory (the attention
    # key bias: softmax ignores a constant added to all of a query's logits) up to +-lr.
    overrides = {"optim.name": "sgd", "optim.learning_rate": 0.5, "optim.b1": 0.0}
    if variant == "ring_scan":  # two blocks: a scan over one block would not loop. (The scanned body is one
        # block whatever the depth: the text tower at depth 1 compiled no faster, measured 2026-12-06.)
        overrides.update({"loss.implementation": "ring", "loss.chunk_size": 1, "model.scan_layers": True,
                          "model.image.depth": 2, "model.text.depth": 2})
    if variant == "chunked":  # 8 keys per chunk: one from each of the 8 shards on the 4x2 mesh
        overrides.update({"loss.implementation": "chunked", "loss.chunk_size": 8})
    return tiny_config(**overrides)


@pytest.fixture(scope="module")
def single_device_result(batch):
    return _run_one_step(_config(), (1, 1, 1), batch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, mesh_shape",
    [("plain", (8, 1, 1)), ("plain", (4, 2, 1)), ("ring_scan", (2, 2, 2)), ("chunked", (4, 2, 1))],
    ids=["data8", "data4xfsdp2", "ring-chunked-scan-2x2x2", "chunked-data4xfsdp2"],
)
def test_sharded_step_equals_single_device(variant, mesh_shape, batch, single_device_result):
    """Slow beside the rest of the suite (25-40 s alone, 55-100 s under two workers): each case compiles
    the whole step for its own mesh, and the scanned ring variant its single-device reference too."""
    if variant == "ring_scan":  # scanned blocks stack their parameters: a reference of the same layout
        reference_params, reference_loss, _, _ = _run_one_step(_config(variant), (1, 1, 1), batch)
    else:  # the chunked loss is the plain one, summed in another order
        reference_params, reference_loss, _, _ = single_device_result
    params, loss, new_state, _ = _run_one_step(_config(variant), mesh_shape, batch)
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, reference_params)
    if mesh_shape[1] > 1:  # FSDP really shards: the token embedding's width is split over fsdp
        embedding = new_state.params["txt"]["Embed_0"]["embedding"]
        assert embedding.addressable_shards[0].data.shape == (259, 32 // mesh_shape[1])


def _trajectory(workdir, mesh_shape):
    config = _config()
    config.total_steps = 5
    config.mesh.shape = mesh_shape
    config.tensorboard = False
    trainer.train(config, str(workdir))
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.mark.slow
def test_five_step_loss_trajectory_is_the_same_on_every_mesh(tmp_path):
    """Slow (~1 min on 2 cores): three whole runs of the trainer; the tensor mesh compiles its step (a
    program per mesh is the point), the other two load the variants' steps above from the cache."""
    reference = _trajectory(tmp_path / "8x1x1", (8, 1, 1))
    assert len(reference) == 5 and len(set(reference)) == 5, reference  # the parameters move every step
    for mesh_shape in [(4, 2, 1), (2, 2, 2)]:
        np.testing.assert_allclose(_trajectory(tmp_path / "x".join(map(str, mesh_shape)), mesh_shape), reference, rtol=1e-5)


def test_step_loss_matches_numpy_sigmoid_loss_of_the_initial_embeddings(batch, single_device_result):
    _, loss, new_state, (model, initial_params) = single_device_result
    image_embeddings, text_embeddings = jax.jit(model.apply)({"params": initial_params}, batch["images"], batch["tokens"])
    logits = np.exp(np.float64(initial_params["t"])) * np.asarray(image_embeddings, np.float64) @ np.asarray(
        text_embeddings, np.float64
    ).T + np.float64(initial_params["b"])
    signs = 2 * np.eye(16) - 1
    expected = np.sum(np.logaddexp(0.0, -signs * logits)) / 16  # -log sigmoid(z) = log(1 + e^-z)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert int(new_state.step) == 1
    assert not np.allclose(new_state.params["t"], initial_params["t"])  # t is trained


def test_batch_not_divisible_by_data_parallel_devices_says_by_how_much():
    mesh = sharding.create_mesh((8, 1, 1), ("data", "fsdp", "tensor"))
    rules = sharding.rules_as_tuples(tiny_config().mesh.axis_rules)
    with pytest.raises(ValueError, match=r"data.batch_size=20 is not divisible by the 8 data-parallel devices .*4 too many. Use 16 or 24"):
        sharding.check_batch_size(20, mesh, rules)
