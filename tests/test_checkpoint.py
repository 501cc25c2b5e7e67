"""Checkpoint save/restore: values and data position survive, restore reshards onto other meshes,
retention keeps what it says, a different model is refused, and a broken latest checkpoint falls back."""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.data import pipeline, preprocess
from siglip_jax.data.from_config import build_source, build_tokenizer
from siglip_jax.io import checkpoint, checkpoint_params
from siglip_jax.models import two_towers
from siglip_jax.runtime import sharding
from siglip_jax.training import optim
from siglip_jax.training.train_step import state_initialiser
from tests.helpers import tiny_config

AXES = ("data", "fsdp", "tensor")


def _fresh_state(config, mesh_shape, devices):
    """A real, initialised train state (compiles the initialiser: use once)."""
    mesh = sharding.create_mesh(mesh_shape, AXES, devices)
    model = two_towers.build_model(config.model)
    optimizer = optim.build_optimizer(config.optim, config.total_steps)
    init_state, _, _ = state_initialiser(
        model, optimizer, image_shape=two_towers.image_input_shape(config.model), text_length=config.model.text.max_len,
        mesh=mesh, axis_rules=sharding.rules_as_tuples(config.mesh.axis_rules),
    )
    return init_state(jax.random.key(1)), optimizer


def _restore_target(config, mesh_shape, devices):
    """What the trainer restores into on this mesh: the train state's shapes with its shardings (traced:
    nothing compiles)."""
    mesh = sharding.create_mesh(mesh_shape, AXES, devices)
    model = two_towers.build_model(config.model)
    optimizer = optim.build_optimizer(config.optim, config.total_steps)
    _, abstract, shardings = state_initialiser(
        model, optimizer, image_shape=two_towers.image_input_shape(config.model), text_length=config.model.text.max_len,
        mesh=mesh, axis_rules=sharding.rules_as_tuples(config.mesh.axis_rules),
    )
    return checkpoint.abstract_like(abstract, shardings), shardings


def _batches(config):
    return pipeline.train_batches(
        build_source(config.data.train), tokenizer=build_tokenizer(config),
        options=preprocess.ImageOptions(config.model.image.image_size), local_batch_size=config.data.batch_size, seed=0,
    )


def _as_numpy(tree):
    return jax.tree.map(lambda leaf: np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf), tree)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with a checkpoint of step 7 made on 8 devices along `data`: parameters and optimizer
    moments all non-trivial (one update applied), and a data iterator 3 batches in."""
    config = tiny_config()
    state, optimizer = _fresh_state(config, (8, 1, 1), jax.devices())
    # One program for the update (applied op by op it compiled ~250 small ones); keeps the state's shardings.
    update = lambda state: state.apply_gradients(jax.tree.map(lambda p: 0.1 * p + 0.01, state.params), optimizer,  # noqa: E731
                                                 loss=jnp.float32(1.0))[0]
    state = jax.jit(update, out_shardings=jax.tree.map(lambda leaf: leaf.sharding, state))(state)
    state = state.replace(step=state.step + 6)
    batches = _batches(config)
    for _ in range(3):
        next(batches)
    workdir = str(tmp_path_factory.mktemp("saved"))
    with checkpoint.Checkpointer(workdir) as checkpointer:
        assert checkpointer.save(7, state, batches, config)
        assert not checkpointer.save(7, state, batches, config)  # the same step twice: saved once
    return workdir, config, _as_numpy(state), batches.get_state(), next(batches), state


@pytest.mark.parametrize("mesh_shape, num_devices", [((8, 1, 1), 8), ((4, 2, 1), 8), ((1, 1, 1), 1)])
def test_restore_onto_any_mesh_gives_equal_values_and_data_position(saved, mesh_shape, num_devices):
    workdir, config, expected, data_state, next_batch, _ = saved
    target, target_shardings = _restore_target(config, mesh_shape, jax.devices()[:num_devices])
    batches = _batches(config)
    with checkpoint.Checkpointer(workdir) as checkpointer:
        state, step = checkpointer.restore(target, batches, config)
    assert step == 7 and int(state.step) == 7
    jax.tree.map(np.testing.assert_array_equal, _as_numpy(state), expected)
    jax.tree.map(assert_same_sharding, state, target_shardings)
    assert batches.get_state() == data_state
    restored_batch = next(batches)
    np.testing.assert_array_equal(restored_batch["images"], next_batch["images"])
    np.testing.assert_array_equal(restored_batch["tokens"], next_batch["tokens"])


def assert_same_sharding(array, expected):
    assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding, expected)


def test_fsdp_restore_really_shards(saved):
    workdir, config, *_ = saved
    target, target_shardings = _restore_target(config, (4, 2, 1), jax.devices())
    with checkpoint.Checkpointer(workdir) as checkpointer:
        state, _ = checkpointer.restore(target, _batches(config), config)
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(state.params)}
    assert any("fsdp" in str(spec) for spec in specs), specs


def test_model_mismatch_is_refused_with_the_differing_keys(saved, tmp_path):
    workdir, config, *_ = saved
    other = tiny_config(**{"model.image.width": 64, "model.text.depth": 3, "optim.learning_rate": 5e-4})
    target, target_shardings = _restore_target(other, (8, 1, 1), jax.devices())
    with checkpoint.Checkpointer(workdir) as checkpointer:
        with pytest.raises(checkpoint.CheckpointMismatchError) as error:
            checkpointer.restore(target, _batches(other), other)
    message = str(error.value)
    assert "model.image.width: 32 in the checkpoint, 64 now" in message
    assert "model.text.depth: 1 in the checkpoint, 3 now" in message
    assert "learning_rate" not in message  # not a model key: allowed to change on resume
    assert "init_from" in message


def test_resuming_with_another_batch_size_says_what_changes(saved, caplog):
    workdir, config, *_ = saved
    other = tiny_config(**{"data.batch_size": 8})
    target, _ = _restore_target(other, (8, 1, 1), jax.devices())
    with checkpoint.Checkpointer(workdir) as checkpointer, caplog.at_level(logging.WARNING):
        _, step = checkpointer.restore(target, _batches(other), other)
    assert step == 7
    assert ("Resuming step 7 with data.batch_size=8, but the checkpoint trained with 16: the data position is "
            "counted in batches, so the stream goes on at example 56 instead of 112 (examples are seen again)") in caplog.text
    assert "Pass --config.data.batch_size=16 to continue the same run." in caplog.text


def test_retention_keeps_latest_n_and_every_mth(saved, tmp_path):
    _, config, *_, state = saved
    batches = _batches(config)
    with checkpoint.Checkpointer(str(tmp_path), keep_checkpoints=2, keep_every_steps=3) as checkpointer:
        for step in range(1, 8):
            checkpointer.save(step, state, batches, config)
            checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [3, 6, 7]


def test_unreadable_latest_falls_back_to_the_previous_and_says_so(saved, tmp_path, caplog):
    workdir, config, expected, *_ = saved
    copy = str(tmp_path / "work")
    shutil.copytree(workdir, copy)
    root = os.path.join(copy, "checkpoints")
    shutil.copytree(os.path.join(root, "7"), os.path.join(root, "9"))
    shutil.rmtree(os.path.join(root, "9", "state", "d"))  # the array data of step 9 is gone
    # What a save killed midway leaves: a temporary directory, never taken for a checkpoint.
    shutil.copytree(os.path.join(root, "7"), os.path.join(root, "12.orbax-checkpoint-tmp-1234"))
    assert checkpoint.latest_step(copy) == 9
    target, target_shardings = _restore_target(config, (8, 1, 1), jax.devices())
    with caplog.at_level(logging.WARNING, logger="siglip_jax.io.checkpoint"):
        with checkpoint.Checkpointer(copy) as checkpointer:
            state, step = checkpointer.restore(target, _batches(config), config)
    assert step == 7
    jax.tree.map(np.testing.assert_array_equal, _as_numpy(state.params), expected.params)
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "step 9" in warning and "step 7" in warning
    assert not os.path.exists(os.path.join(root, "12.orbax-checkpoint-tmp-1234"))  # cleaned up on start


def test_no_readable_checkpoint_is_a_clear_error(saved, tmp_path):
    workdir, config, *_ = saved
    copy = str(tmp_path / "work")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "7", "data"))
    target, target_shardings = _restore_target(config, (8, 1, 1), jax.devices())
    with checkpoint.Checkpointer(copy) as checkpointer:
        with pytest.raises(checkpoint.NoCheckpointError, match="step 7.*data iterator states"):
            checkpointer.restore(target, _batches(config), config)


def test_restore_params_from_workdir_step_dir_and_onto_a_mesh(saved):
    workdir, config, expected, *_ = saved
    params, restored_config = checkpoint_params.restore_params(workdir)
    jax.tree.map(np.testing.assert_array_equal, _as_numpy(params), expected.params)
    assert restored_config.model.image.width == config.model.image.width
    assert all(leaf.sharding.device_set == {jax.local_devices()[0]} for leaf in jax.tree.leaves(params))

    mesh = sharding.create_mesh((4, 2, 1), AXES)
    params, _ = checkpoint_params.restore_params(os.path.join(workdir, "checkpoints", "7"), mesh=mesh)
    jax.tree.map(np.testing.assert_array_equal, _as_numpy(params), expected.params)
    assert any("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(params))
    assert checkpoint.latest_step(workdir) == 7


def test_restore_params_of_a_missing_checkpoint_says_what_it_wants(saved, tmp_path):
    workdir, *_ = saved
    with pytest.raises(checkpoint.NoCheckpointError, match="give a workdir"):
        checkpoint_params.restore_params(str(tmp_path / "nothing here"))
    with pytest.raises(checkpoint.NoCheckpointError, match=r"complete ones: \[7\]"):
        checkpoint_params.restore_params(workdir, step=8)
    assert checkpoint.latest_step(str(tmp_path)) is None


GLOBAL_BATCH = 12


def _global_positions(batches, process_index, process_count):
    """Positions of the global stream that process i of n has read in its first `batches` batches: block i
    of 12 / n positions of each global batch of 12 (the pipeline's split)."""
    local_batch = GLOBAL_BATCH // process_count
    return {batch * GLOBAL_BATCH + process_index * local_batch + row
            for batch in range(batches) for row in range(local_batch)}


@pytest.mark.parametrize("saved_count, new_count", [(2, 1), (1, 4), (4, 2), (2, 3)])
def test_redistributed_data_states_continue_the_stream_without_repeats(saved_count, new_count):
    batches_read = 5
    states = {i: {"next_index": batches_read} for i in range(saved_count)}
    consumed = set().union(*(_global_positions(batches_read, i, saved_count) for i in range(saved_count)))
    assert consumed == set(range(batches_read * GLOBAL_BATCH))
    new_states = pipeline.redistribute_positions(states, new_count)
    upcoming = set()
    for index, state in enumerate(new_states):
        start = state["next_index"]
        upcoming |= _global_positions(start + 4, index, new_count) - _global_positions(start, index, new_count)
    assert not upcoming & consumed
    assert upcoming == set(range(batches_read * GLOBAL_BATCH, (batches_read + 4) * GLOBAL_BATCH))  # nothing left out


def test_redistributing_an_unknown_iterator_state_explains_the_limit():
    with pytest.raises(ValueError, match="Resume with 2 processes"):
        pipeline.redistribute_positions({0: {"workers": []}, 1: {"workers": []}}, 4)


def test_config_differences_lists_changed_added_and_removed_keys():
    saved = {"model": {"width": 32, "depth": 2}, "seed": 0}
    current = {"model": {"width": 64, "heads": 4}, "seed": 0}
    assert checkpoint.config_differences(saved, current, under=("model",)) == [
        "model.depth: 2 in the checkpoint, absent now",
        "model.heads: absent in the checkpoint, 4 now",
        "model.width: 32 in the checkpoint, 64 now",
    ]
