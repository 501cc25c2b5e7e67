"""EMA of the parameters (optim.ema_decay, issue 15 item 4): the warm-up rule, the step's average against a
numpy reference (a skipped non-finite step leaves the average and its warm-up count alone), sharded like
the parameters, saved in checkpoints and chosen by --weights for loading and export."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.data import pipeline, preprocess
from siglip_jax.data.from_config import build_source, build_tokenizer
from siglip_jax.io import checkpoint, loading, params as params_lib
from siglip_jax.runtime import sharding
from siglip_jax.training import optim
from siglip_jax.training.train_step import EmaTrainState, TrainState, build_training
from tests.helpers import tiny_config
from tests.params_helpers import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = ("data", "fsdp", "tensor")


def test_warm_up_is_min_of_decay_and_one_plus_n_over_ten_plus_n():
    got = [float(optim.ema_decay_at(0.9999, n)) for n in (0, 1, 8, 90, 10**6)]
    np.testing.assert_allclose(got, [1 / 10, 2 / 11, 9 / 18, 91 / 100, 0.9999], rtol=1e-6)


def test_step_averages_as_numpy_does_and_a_skipped_step_leaves_the_average():
    config = tiny_config(**{"optim.ema_decay": 0.2, "total_steps": 8})
    mesh = sharding.create_mesh((1, 1, 1), AXES, jax.devices()[:1])
    training = build_training(config, mesh)
    state = training.init_state(jax.random.key(config.seed))
    assert isinstance(state, EmaTrainState) and state.ema_decay == 0.2
    rng = np.random.default_rng(0)
    size, length = config.model.image.image_size, config.model.text.max_len
    batch = jax.device_put({"images": rng.integers(0, 256, (16, size, size, 3)).astype(np.uint8),
                            "tokens": rng.integers(3, 259, (16, length)).astype(np.int32)}, training.batch_sharding)
    reference = jax.device_get(state.params)  # the average starts at the initial parameters
    np.testing.assert_array_equal(jax.device_get(state.ema_params)["t"], reference["t"])
    # Hand-computed decays min(0.2, (1 + n) / (10 + n)), n the updates applied before: 1/10, 2/11, (step 3
    # skipped: n stays 2), then min(0.2, 3/12) = 0.2, the cap.
    decays = {1: 1 / 10, 2: 2 / 11, 4: 0.2}
    t_sharding = training.state_shardings.params["t"]
    with jax.set_mesh(mesh):
        for step in (1, 2, 3, 4):
            good_t = jax.device_get(state.params["t"])
            if step == 3:  # a NaN temperature: loss and gradient are NaN, the step is skipped
                state = state.replace(params={**state.params, "t": jax.device_put(jnp.float32(np.nan), t_sharding)})
            ema_before = jax.device_get(state.ema_params)
            state, metrics = training.step(state, batch)
            if step == 3:
                assert int(metrics["nonfinite"]) == 1 and float(metrics["ema/decay"]) == 0.0
                jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema_params), ema_before)
                state = state.replace(params={**state.params, "t": jax.device_put(good_t, t_sharding)})
                continue
            assert int(metrics["nonfinite"]) == 0
            decay = np.float32(decays[step])
            np.testing.assert_allclose(float(metrics["ema/decay"]), decay, rtol=1e-6)
            new_params = jax.device_get(state.params)
            reference = jax.tree.map(lambda average, new: decay * average + (np.float32(1) - decay) * new,
                                     reference, new_params)
            jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7),
                         jax.device_get(state.ema_params), reference)
            assert not np.allclose(reference["img"]["embedding"]["kernel"], new_params["img"]["embedding"]["kernel"])
    np.testing.assert_allclose(float(metrics["ema/param_norm"]), float(optax_norm(reference)), rtol=1e-6)


def optax_norm(tree):
    return np.sqrt(sum(np.sum(np.square(leaf.astype(np.float64))) for leaf in jax.tree.leaves(tree)))


def test_ema_is_sharded_like_the_parameters_and_absent_when_off():
    mesh = sharding.create_mesh((2, 4, 1), AXES)
    training = build_training(tiny_config(**{"optim.ema_decay": 0.9999}), mesh)  # traced only
    assert training.state_shardings.ema_params == training.state_shardings.params
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(training.state_shardings.ema_params))
    plain = build_training(tiny_config(), mesh)
    assert type(plain.abstract_state) is TrainState  # checkpoints without EMA keep their old structure


def _save(workdir, config, state):
    batches = pipeline.train_batches(
        build_source(config.data.train), tokenizer=build_tokenizer(config),
        options=preprocess.ImageOptions(config.model.image.image_size), local_batch_size=config.data.batch_size, seed=0)
    with checkpoint.Checkpointer(workdir) as checkpointer:
        checkpointer.save(int(state.step), state, batches, config)


def test_checkpoints_keep_the_ema_and_weights_choose_it_for_loading_and_export(tmp_path):
    config = tiny_config(**{"optim.ema_decay": 0.99})
    params, ema = random_params(config, seed=0), random_params(config, seed=1)
    opt_state = optim.build_optimizer(config.optim, config.total_steps).init(params)
    with_ema, raw_only = str(tmp_path / "with_ema"), str(tmp_path / "raw_only")
    _save(with_ema, config, EmaTrainState(step=jnp.int32(5), params=params, opt_state=opt_state, ema_params=ema))
    _save(raw_only, tiny_config(), TrainState(step=jnp.int32(5), params=params, opt_state=opt_state))

    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    exported = str(tmp_path / "ema.msgpack")
    commands = {
        "export": ["export.py", "--format=params", f"--workdir={with_ema}", "--weights=ema", f"--output={exported}"],
        "no_ema": ["eval.py", f"--workdir={raw_only}", "--weights=ema", "--pairs=/dev/null"],
    }
    processes = {name: subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE) for name, args in commands.items()}

    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loading.load_model(with_ema, weights="ema").params), ema)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loading.load_model(with_ema).params), params)
    with pytest.raises(checkpoint.NoCheckpointError, match=r"has no EMA of the parameters.*--weights raw"):
        loading.load_model(raw_only, weights="ema")
    params_lib.save_params_file(str(tmp_path / "raw.msgpack"), config, params)
    with pytest.raises(ValueError, match="not a training workdir, so it holds one set of weights"):
        loading.load_model(str(tmp_path / "raw.msgpack"), weights="ema")

    outputs = {name: process.communicate(timeout=300) for name, process in processes.items()}
    assert processes["export"].returncode == 0, outputs["export"][1][-2000:]
    jax.tree.map(np.testing.assert_array_equal, params_lib.load_params_file(exported).params, ema)
    assert processes["no_ema"].returncode != 0 and "has no EMA of the parameters" in outputs["no_ema"][1]


def test_init_from_restarts_the_ema_at_the_loaded_parameters_in_buffers_of_its_own():
    loaded = {"w": jnp.arange(4.0), "t": jnp.float32(2.0)}
    state = EmaTrainState(step=jnp.int32(0), params={"w": jnp.zeros(4), "t": jnp.float32(0.0)}, opt_state=(),
                          ema_params={"w": jnp.ones(4), "t": jnp.float32(1.0)})
    started = state.with_params(loaded)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(started.ema_params), jax.device_get(loaded))
    # The step donates the whole state: params and EMA sharing a buffer would make that fail.
    stepped = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda p: p + 1, s.params)), donate_argnums=0)(started)
    np.testing.assert_array_equal(stepped.ema_params["w"], np.arange(4.0))
