"""Trainer pieces: the non-finite guard, metric files on resume, initialising towers from a checkpoint."""
import json

import jax
import numpy as np
import pytest
import scipy.ndimage

from siglip_jax.io import loading, params as params_lib
from siglip_jax.training import hooks, metrics
from tests.helpers import tiny_config
from tests.params_helpers import random_params


class _NoCheckpoints:
    root = "/nowhere"

    def latest_step(self):
        return None


def test_nonfinite_guard_counts_and_stops_after_n_in_a_row():
    guard = hooks.NonFiniteGuard(3, _NoCheckpoints())
    flags = [0, 1, 1, 0, 1, 1]
    for step, flag in enumerate(flags, start=1):
        guard.check_previous_and_hold(step, {"nonfinite": np.int32(flag)})
    guard.check_held()
    assert guard.total == 4 and guard.in_a_row == 2
    guard.check_previous_and_hold(7, {"nonfinite": np.int32(1)})
    with pytest.raises(FloatingPointError, match=r"3 steps in a row .* the last at step 7\. Last good checkpoint: none"):
        guard.check_held()


def test_jsonl_writer_drops_lines_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 10, 20, 25)))
    writer = metrics.JsonlWriter(str(path), keep_through_step=20)
    writer.write(21, {"loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 10, 20, 21]


def test_init_from_copies_chosen_towers_and_refuses_mismatches(tmp_path):
    # The source: a params file of every leaf random (tests/params_helpers.py), so a copied leaf cannot
    # equal a fresh one by chance. Until 2026-12-06 it was a one-step trainer run, which compiled a step
    # to make parameters that differ from the zeros below (docs/testing.md).
    source_config = tiny_config(**{"model.image.pooling": "map"})  # the released architecture's head, skipped below
    trained = random_params(source_config)
    exported = str(tmp_path / "source.msgpack")
    params_lib.save_params_file(exported, source_config, trained)

    config = tiny_config(**{"seed": 7, "init_from": exported, "init_towers": ("img",), "model.image.pooling": "map"})
    fresh = {name: jax.tree.map(np.zeros_like, value) for name, value in trained.items()}
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), fresh)
    params = loading.initial_params(config, fresh, shardings)
    jax.tree.map(np.testing.assert_array_equal, params["img"], trained["img"])
    jax.tree.map(np.testing.assert_array_equal, params["txt"], fresh["txt"])  # not copied

    wider = tiny_config(**{"init_from": exported, "model.image.width": 64, "model.image.pooling": "map"})
    wider_params = {**fresh, "img": {**fresh["img"], "pos_embedding": np.zeros((1, 16, 64), np.float32)}}
    with pytest.raises(ValueError, match=r"(?s)does not fit this model.*img/pos_embedding: \(1, 16, 32\) in the checkpoint, "
                                         r"\(1, 16, 64\) here; add it to init_skip"):
        loading.initial_params(wider, wider_params, shardings)

    # Another resolution (4x4 -> 6x6 patches): the position embedding is resampled as scipy's bilinear
    # zoom does (big_vision's resample_posemb); init_skip keeps the fresh MAP head.
    larger = tiny_config(**{"init_from": exported, "model.image.image_size": 24, "init_skip": ("img/MAPHead_0/.*",),
                            "model.image.pooling": "map"})
    larger_params = {**fresh, "img": {**fresh["img"], "pos_embedding": np.zeros((1, 36, 32), np.float32)}}
    params = loading.initial_params(larger, larger_params, shardings)
    expected = scipy.ndimage.zoom(np.asarray(trained["img"]["pos_embedding"]).reshape(4, 4, 32), (1.5, 1.5, 1), order=1)
    np.testing.assert_allclose(params["img"]["pos_embedding"].reshape(6, 6, 32), expected, rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, params["img"]["MAPHead_0"], fresh["img"]["MAPHead_0"])
    np.testing.assert_array_equal(params["img"]["embedding"]["kernel"], trained["img"]["embedding"]["kernel"])


def test_ctrl_c_asks_for_a_save_as_sigterm_does_and_a_second_one_stops_at_once():
    import os
    import signal
    import threading
    import time

    from siglip_jax.training import preemption

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set from the main thread")
    before = signal.getsignal(signal.SIGINT)
    watch = preemption.PreemptionWatch()
    try:
        assert not watch.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
        time.sleep(0.01)
        assert watch.should_stop(2)  # the loop finishes this step, saves and exits
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_during_start_up_stops_before_the_first_step_and_says_so(tmp_path, monkeypatch, caplog):
    import logging
    import os
    import signal
    import threading

    from siglip_jax.training import trainer

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set from the main thread")
    real_build_source = trainer.build_source

    def build_source_then_sigterm(*args, **kwargs):  # start-up work, then the notice arrives
        source = real_build_source(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return source

    monkeypatch.setattr(trainer, "build_source", build_source_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert trainer.train(tiny_config(), str(workdir)) == {}
    assert "SIGTERM received" in caplog.text
    assert "Stopped during start-up, before step 1: nothing was trained, so nothing new was saved; rerun the same " \
           "command to start." in caplog.text
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
    assert signal.getsignal(signal.SIGTERM) is before  # handlers put back
