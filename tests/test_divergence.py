"""Divergence and damaged runs (issue 19): the step skips updates that make parameters non-finite, only finite
steps are saved (and named "last good"), a rising loss is warned about and logged, evals report non-finite
embeddings instead of raising, and restarts/resumes that would silently do the wrong thing say so."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siglip_jax.config import eval_config, source_config
from siglip_jax.data import from_config
from siglip_jax.evaluation import runner
from siglip_jax.models import two_towers
from siglip_jax.runtime import sharding
from siglip_jax.training import hooks, safeguards, trainer
from siglip_jax.training.train_step import TrainState, build_training
from tests.helpers import tiny_config


# ---------------------------------------------------------------------------------------- the step

def test_step_whose_update_overflows_is_skipped_though_loss_and_gradient_are_finite():
    # SGD with a learning rate that is inf in float32: loss and gradient stay finite, the new parameters do not.
    config = tiny_config(**{"optim.name": "sgd", "optim.learning_rate": 1e39, "optim.b1": 0.0,
                            "data.batch_size": 16, "total_steps": 4})
    mesh = sharding.create_mesh((1, 1, 1), ("data", "fsdp", "tensor"), jax.devices()[:1])
    training = build_training(config, mesh)
    state = training.init_state(jax.random.key(config.seed))
    before = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    size, length = config.model.image.image_size, config.model.text.max_len
    batch = jax.device_put({"images": rng.integers(0, 256, (16, size, size, 3)).astype(np.uint8),
                            "tokens": rng.integers(3, 259, (16, length)).astype(np.int32)}, training.batch_sharding)
    with jax.set_mesh(mesh):
        new_state, metrics = training.step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["nonfinite"]) == 1 and int(new_state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.params), before)


def test_guarded_update_traces_the_optimizer_once_and_applies_or_skips_it():
    # The guard's check and the applied update share one trace of the optimizer (docs/speed.md: 0.4 s of every
    # S/16 start); the state is still the plain optax update when finite, and unchanged when not.
    adam = optax.adam(0.1)
    traced = []

    def counting_update(grads, opt_state, params=None):
        traced.append(1)
        return adam.update(grads, opt_state, params)

    optimizer = optax.GradientTransformation(adam.init, counting_update)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=adam.init(params))
    step = jax.jit(lambda state, grads: state.apply_gradients(grads, optimizer, loss=jnp.float32(1.0)))

    grads = {"w": jnp.array([0.5, 0.25, -1.0])}
    new_state, finite = step(state, grads)
    assert len(traced) == 1 and bool(finite) and int(new_state.step) == 1
    # Adam's first step moves each parameter by the learning rate against its gradient's sign.
    np.testing.assert_allclose(new_state.params["w"], [0.9, -2.1, 3.1], rtol=1e-6)

    skipped, finite = step(state, {"w": jnp.array([0.5, np.nan, -1.0])})
    assert len(traced) == 1 and not bool(finite) and int(skipped.step) == 1
    np.testing.assert_array_equal(skipped.params["w"], params["w"])


# ------------------------------------------------------------------------------------ loop pieces

class _Checkpoints:
    root = "/ckpt"

    def __init__(self, latest):
        self.latest = latest

    def latest_step(self):
        return self.latest


def test_guard_says_whether_the_held_step_was_finite_and_names_the_checkpoint_before_the_streak():
    guard = hooks.NonFiniteGuard(2, _Checkpoints(3))
    assert guard.held_step_finite()  # nothing held yet
    guard.check_previous_and_hold(4, {"nonfinite": np.int32(1)})
    assert not guard.held_step_finite() and guard.total == 0  # asking does not count it
    guard.check_previous_and_hold(5, {"nonfinite": np.int32(1)})
    with pytest.raises(FloatingPointError, match=r"Last good checkpoint: step 3 in /ckpt \(saved before the streak began at step 4\)"):
        guard.check_held()


def test_loss_watch_warns_once_per_rise_and_logs_the_ratio(caplog):
    watch = safeguards.LossWatch(4.0)
    with caplog.at_level(logging.WARNING):
        ratios = [watch.check(step, {"loss": loss}).get("loss_over_start")
                  for step, loss in enumerate([10.0, 20.0, float("nan"), 50.0, 60.0, 5.0, 45.0], start=1)]
    assert ratios == [1.0, 2.0, None, 5.0, 6.0, 0.5, 4.5]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2 and "step 4 is 50, 5.0 times the run's first logged loss 10" in warnings[0]
    assert "step 7" in warnings[1]
    assert safeguards.LossWatch(0.0).check(1, {"loss": 1.0}) == {}


def test_restored_params_with_nan_are_refused_naming_the_array():
    params = {"img": {"kernel": np.ones((2, 2), np.float32)}, "t": np.float32(np.nan)}
    with pytest.raises(FloatingPointError, match=r"step 7 in /ckpt has NaN or Inf in 1 parameter arrays, e\.g\. \['t'\].*/ckpt/7"):
        safeguards.check_restored_params(params, 7, "/ckpt")
    safeguards.check_restored_params({"t": np.float32(1.0)}, 7, "/ckpt")


def test_eval_of_nan_parameters_is_reported_not_raised(caplog):
    config = tiny_config()
    config.evals.shapes = eval_config("retrieval", source_config("demo", split="eval", size=8, image_size=16))
    mesh = sharding.create_mesh((8, 1, 1), ("data", "fsdp", "tensor"))
    rules = sharding.rules_as_tuples(config.mesh.axis_rules)
    model = two_towers.build_model(config.model)
    from tests.params_helpers import random_params

    params = random_params(config)
    params["img"] = jax.tree.map(lambda leaf: np.full_like(leaf, np.nan), params["img"])
    embedder = runner.Embedder(model, mesh, rules, 8)
    evaluators = runner.build_evaluators(config, from_config.build_tokenizer(config), from_config.build_source)
    with caplog.at_level(logging.WARNING):
        results = runner.run_evaluators(evaluators, embedder, params, step=12)
    assert results == {"shapes/nonfinite_embeddings": 1.0}
    assert "Eval 'shapes' at step 12: image embeddings hold NaN or Inf" in caplog.text


# -------------------------------------------------------------------------------- whole runs (slow)

def _config(**overrides):
    return tiny_config(**{"tensorboard": False, "checkpoint_every_steps": 1, **overrides})


def _metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _saved_steps(workdir):
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


@pytest.mark.slow
def test_diverging_resume_saves_only_finite_steps_and_reruns_say_what_they_do(tmp_path, caplog):
    """Slow (36-45 s under two workers, 2026-12-06): four trainer runs on one workdir, one of them with a learning rate
    of 1e30 and so its own compiled step; each rerun is a case a user meets."""
    workdir = str(tmp_path / "run")
    trainer.train(_config(total_steps=2), workdir)
    assert _saved_steps(workdir) == [1, 2]

    # total_steps below the checkpoint: one clear error, not an exit having done nothing.
    with pytest.raises(ValueError, match=r"at step 2, past total_steps=1.*Raise total_steps above 2"):
        trainer.train(_config(total_steps=1), workdir)

    # A learning rate of 1e30: step 3 is finite (its update sends parameters to ~1e30), then every step is NaN.
    with caplog.at_level(logging.WARNING), pytest.raises(
            FloatingPointError, match=r"3 steps in a row .* the last at step 6\. Last good checkpoint: step 3 .*began at step 4"):
        trainer.train(_config(total_steps=10, max_nonfinite_steps=3, **{"optim.learning_rate": 1e30}), workdir)
    assert _saved_steps(workdir) == [1, 2, 3]  # nothing from inside the streak
    assert "Not saving step 4: it was non-finite" in caplog.text
    flags = {line["step"]: line["nonfinite"] for line in _metrics(workdir) if "nonfinite" in line}
    assert flags[3] == 0 and all(flags[step] == 1 for step in (4, 5, 6))
    assert all("loss_over_start" in line for line in _metrics(workdir) if "loss" in line and line["loss"] is not None)

    # Checkpoints emptied: the run restarts from 0 and the old metrics are moved aside, not dropped.
    old_metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
    for step in _saved_steps(workdir):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trainer.train(_config(total_steps=1), workdir)
    assert open(os.path.join(workdir, "metrics.jsonl.1")).read() == old_metrics
    assert [line["step"] for line in _metrics(workdir)] == [1]
    assert "restarts from step 0, and the old metrics were moved to" in caplog.text


@pytest.mark.slow
def test_learning_rate_10_warns_that_the_loss_rose_and_logs_it(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        # Adam's first update moves every parameter by about the rate. With one block per tower 10 is enough
        # (measured: step 2's loss 1.1e6, 125,000 times step 1's), and 100 already makes it infinite (skipped).
        trainer.train(_config(total_steps=2, checkpoint_every_steps=0, **{"optim.learning_rate": 10.0}), workdir)
    lines = _metrics(workdir)
    assert lines[0]["loss_over_start"] == 1.0 and lines[1]["loss_over_start"] > 4.0
    assert all(line["nonfinite"] == 0 for line in lines)  # a finite rise: warned about, not skipped
    assert "The loss at step 2 is" in caplog.text and "the run is diverging" in caplog.text
