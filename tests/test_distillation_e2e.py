"""SigLIP 2's self-distillation through the trainer: the pipeline's local crops reach the step, each loss is
logged under its own name, a stopped run resumes bitwise with the teacher and centres in the checkpoint, exports
drop the head and mask token, and a recipe that adds distillation to a workdir without it is told how."""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from siglip_jax.io import checkpoint, formats, loading
from siglip_jax.io import params as params_lib
from siglip_jax.training import trainer
from tests.helpers import tiny_config


def _config(total_steps, **overrides):
    # start_fraction 0: on from the first step, so a run stopped at step 2 (total_steps 2) and one of 4 switch
    # at the same step (the switch itself: tests/test_distillation_step.py).
    config = tiny_config(**{"model.distill.weight": 1.0, "model.distill.masked_weight": 0.25,
                            "model.distill.start_fraction": 0.0, "model.distill.n_local": 2,
                            "model.distill.prototypes": 32, "model.distill.head_bottleneck": 16,
                            "data.random_crop_scale": (0.5, 1.0), **overrides})
    config.total_steps, config.checkpoint_every_steps, config.keep_checkpoints = total_steps, 2, 2
    config.tensorboard = False
    return config


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _saved_distill_state(workdir, step):
    state = ocp.PyTreeCheckpointer().restore(str(workdir / checkpoint.CHECKPOINTS_SUBDIR / str(step) / "state"))
    return jax.device_get(state["distill"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("distillation") / "uninterrupted"
    trainer.train(_config(4), str(workdir))
    return workdir


def test_each_loss_is_logged_under_its_name_and_adds_up(uninterrupted):
    lines = _metrics(uninterrupted)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        assert line["self_distillation_loss"] > 0 and line["masked_prediction_loss"] > 0
        assert line["loss"] == pytest.approx(line["contrastive_loss"] + line["self_distillation_loss"]
                                             + 0.25 * line["masked_prediction_loss"], rel=1e-5)
        assert line["nonfinite"] == 0


def test_stopped_run_resumes_bitwise_with_teacher_and_centres(uninterrupted, tmp_path):
    workdir = tmp_path / "stopped"
    trainer.train(_config(2), str(workdir))  # stops at step 2, its checkpoint holds the teacher and centres
    trainer.train(_config(4), str(workdir))  # resumes at step 2
    resumed, reference = _metrics(workdir), _metrics(uninterrupted)
    assert [line["step"] for line in resumed] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed, reference):
        for name in ("loss", "contrastive_loss", "self_distillation_loss", "masked_prediction_loss", "grad_norm"):
            assert ours[name] == theirs[name], (ours["step"], name)
    saved, expected = _saved_distill_state(workdir, 4), _saved_distill_state(uninterrupted, 4)
    assert sorted(saved) == ["center", "patch_center", "teacher"] and np.abs(saved["center"]).max() > 0
    jax.tree.map(np.testing.assert_array_equal, saved, expected)
    resumed_params = jax.device_get(loading.load_model(str(workdir)).params)
    jax.tree.map(np.testing.assert_array_equal, resumed_params,
                 jax.device_get(loading.load_model(str(uninterrupted)).params))


def test_exports_leave_out_the_head_and_mask_token(uninterrupted, tmp_path):
    exported = loading.load_model(str(uninterrupted))
    assert "distill" in exported.params and "mask_token" in exported.params["img"]
    path = str(tmp_path / "towers.msgpack")
    formats.export_model(exported, "params", path)
    plain = params_lib.load_params_file(path)
    assert sorted(plain.params) == ["b", "img", "t", "txt"] and "mask_token" not in plain.params["img"]
    assert plain.config.model.distill.weight == 0.0 and plain.config.model.distill.masked_weight == 0.0
    jax.tree.map(np.testing.assert_array_equal, plain.params["txt"], jax.device_get(exported.params["txt"]))


def test_adding_distillation_to_a_workdir_names_the_arrays_and_how_to_start_them(tmp_path):
    workdir = tmp_path / "plain"
    off = {"model.distill.weight": 0.0, "model.distill.masked_weight": 0.0}
    trainer.train(_config(2, **off), str(workdir))
    with pytest.raises(checkpoint.CheckpointMismatchError) as refused:
        trainer.train(_config(4), str(workdir))
    message = str(refused.value)
    assert "model.distill.weight: 0.0 in the checkpoint, 1.0 now" in message
    assert "no distill/... head, mask token, teacher or centres" in message
    assert f"--config.init_from={workdir}" in message and '"distill/.*", "img/mask_token"' in message
    # The fix it gives works: the towers loaded, the head and mask token fresh, the teacher = the loaded tower.
    fresh = tmp_path / "distilled"
    trainer.train(_config(1, **{"init_from": str(workdir), "init_skip": ("distill/.*", "img/mask_token"),
                               "optim.learning_rate": 0.0, "optim.weight_decay": 0.0,
                               "model.distill.teacher_decay": 0.5}), str(fresh))
    started, source = (jax.device_get(loading.load_model(str(path)).params) for path in (fresh, workdir))
    for group in ("txt", "t", "b"):
        jax.tree.map(np.testing.assert_array_equal, started[group], source[group])
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in started["img"].items() if k != "mask_token"},
                 source["img"])
    # Learning rate 0: the student did not move, so the teacher (0.5 teacher + 0.5 student) is still the loaded tower.
    teacher = _saved_distill_state(fresh, 1)["teacher"]
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in teacher["img"].items() if k != "mask_token"},
                 source["img"])


def test_adding_or_dropping_decoder_and_distillation_together_gives_one_command():
    """Both of SigLIP 2's parts added over a plain checkpoint: one init_skip with every pattern, so following the
    fix does not run into the other part's refusal; both dropped: one init_towers."""
    plain = _config(2, **{"model.distill.weight": 0.0, "model.distill.masked_weight": 0.0}).to_dict()
    recipe = _config(2, **{"model.decoder.weight": 1.0, "model.text.max_len": 32}).to_dict()
    where = "/runs/plain/checkpoints/2"
    with pytest.raises(checkpoint.CheckpointMismatchError) as refused:
        checkpoint._check_same_model(plain, recipe, where)
    message = str(refused.value)
    assert "adds the caption decoder and self-distillation" in message
    assert message.count("--config.init_skip=") == 1
    assert """--config.init_skip='("dec/.*", "distill/.*", "img/mask_token")'""" in message
    with pytest.raises(checkpoint.CheckpointMismatchError) as refused:
        checkpoint._check_same_model(recipe, plain, where)
    message = str(refused.value)
    assert "drops the caption decoder and self-distillation" in message and "model.decoder and model.distill" in message
    assert message.count("--config.init_towers=") == 1 and "--config.init_from=/runs/plain " in message
