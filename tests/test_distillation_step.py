"""SigLIP 2's SILC and TIPS in the train step (model.distill): local crops from the pipeline, the tower's mask
token and resampled position embedding, the EMA teacher, the centres, the switch at start_fraction, a 2x4 mesh,
and the config's refusals."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax import config as config_lib
from siglip_jax.data import pipeline, preprocess
from siglip_jax.data.demo import DemoSource
from siglip_jax.data.tokenizers import ByteTokenizer
from siglip_jax.models import init_mapping, two_towers
from siglip_jax.models.vit import VisionTransformer
from siglip_jax.runtime import sharding
from siglip_jax.training.train_step import build_training
from tests.helpers import tiny_config

PROTOTYPES, N_LOCAL = 32, 2


def _distill_config(**overrides):
    # SGD: the update is proportional to the gradient, so sharded and single-device steps compare closely.
    return tiny_config(**{"model.distill.weight": 1.0, "model.distill.masked_weight": 0.25,
                          "model.distill.n_local": N_LOCAL, "model.distill.prototypes": PROTOTYPES,
                          "model.distill.head_bottleneck": 16, "model.distill.start_fraction": 0.5,
                          "model.distill.teacher_decay": 0.9, "total_steps": 4,
                          "optim.name": "sgd", "optim.learning_rate": 0.5, "optim.b1": 0.0, **overrides})


# ---- the pipeline's local crops -------------------------------------------------------------------------

def test_local_crops_come_beside_an_unchanged_global_view():
    record = {"image": np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8), "captions": ["a"]}
    plain = preprocess.ImageOptions(16, random_crop_scale=(0.5, 1.0), random_flip=True)
    local = dataclasses.replace(plain, local_crops=3, local_size=8, local_crop_scale=(0.1, 0.3))
    tokenizer = ByteTokenizer(8)
    without = preprocess.make_example(record, np.random.default_rng([1, 2]), tokenizer, plain)
    with_crops = preprocess.make_example(record, np.random.default_rng([1, 2]), tokenizer, local)
    np.testing.assert_array_equal(with_crops["images"], without["images"])  # the global view's draws come first
    assert "local_images" not in without
    crops = with_crops["local_images"]
    assert crops.shape == (3, 8, 8, 3) and crops.dtype == np.uint8
    assert not np.array_equal(crops[0], crops[1])  # each crop drawn anew


def test_local_crops_are_cut_only_from_the_step_that_reads_them():
    options = preprocess.ImageOptions(16, random_crop_scale=(0.5, 1.0), local_crops=2, local_size=8)

    def batches(first_batch):
        iterator = pipeline.train_batches(DemoSource("train", 64, 24), tokenizer=ByteTokenizer(8), options=options,
                                          local_batch_size=8, seed=1, local_crops_from_batch=first_batch)
        return [next(iterator) for _ in range(4)]

    always, from_two = batches(0), batches(2)
    for step, (full, lazy) in enumerate(zip(always, from_two)):
        np.testing.assert_array_equal(lazy["images"], full["images"])
        np.testing.assert_array_equal(lazy["tokens"], full["tokens"])
        assert lazy["local_images"].shape == full["local_images"].shape == (8, 2, 8, 8, 3)
        if step < 2:
            assert not lazy["local_images"].any() and full["local_images"].any()
        else:
            np.testing.assert_array_equal(lazy["local_images"], full["local_images"])


def test_the_recipe_asks_the_pipeline_for_its_local_crops():
    options = two_towers.image_options(_distill_config(**{"model.distill.local_image_size": 8}))
    assert (options.local_crops, options.local_size, options.local_crop_scale) == (N_LOCAL, 8, (0.05, 0.4))
    assert two_towers.image_options(_distill_config(**{"model.distill.weight": 0.0})).local_crops == 0  # TIPS alone


# ---- the tower: mask token and resampled position embedding ----------------------------------------------

@pytest.fixture(scope="module")
def tower_and_params():
    tower = VisionTransformer(patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2, pooling="gap",
                              posemb_grid=4, mask_token=True)
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    params = nn.unbox(tower.init(jax.random.key(1), images)["params"])
    params = {**params, "mask_token": jax.random.normal(jax.random.key(2), (1, 1, 16))}  # not its zero init
    return tower, params, images


def test_the_mask_token_replaces_exactly_the_masked_patches(tower_and_params):
    tower, params, images = tower_and_params
    no_mask = tower.apply({"params": params}, images, return_tokens=True)
    none_masked = tower.apply({"params": params}, images, return_tokens=True, mask=jnp.zeros((2, 16), bool))
    np.testing.assert_array_equal(none_masked[1], no_mask[1])
    # Reference: the patch embedding by hand (numpy), patch 5 of example 0 replaced by the mask token; a tower
    # whose mask token equals that patch's own embedding must give the unmasked output.
    patches = np.asarray(images[0]).reshape(4, 4, 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(16, 48)
    kernel, bias = (np.asarray(params["embedding"][name]) for name in ("kernel", "bias"))
    embedded = patches @ kernel.reshape(48, 16) + bias
    mask = np.zeros((2, 16), bool)
    mask[0, 5] = True
    own = {**params, "mask_token": jnp.asarray(embedded[5][None, None], jnp.float32)}
    same = tower.apply({"params": own}, images, return_tokens=True, mask=jnp.asarray(mask))
    np.testing.assert_allclose(same[1], no_mask[1], atol=2e-5)
    masked = tower.apply({"params": params}, images, return_tokens=True, mask=jnp.asarray(mask))
    assert not np.allclose(masked[1][0], no_mask[1][0], atol=1e-3)
    np.testing.assert_array_equal(masked[1][1], no_mask[1][1])  # the other example untouched


def test_smaller_images_use_the_resampled_position_embedding(tower_and_params):
    tower, params, _ = tower_and_params
    small = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3), minval=-1, maxval=1)
    got = tower.apply({"params": params}, small)
    # Reference: a tower stored at the 2 x 2 grid, holding the numpy (float64) resampling of the 4 x 4 one.
    plain = VisionTransformer(patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2, pooling="gap", mask_token=True)
    resampled = init_mapping.resample_posemb(np.asarray(params["pos_embedding"]), (2, 2))
    expected = plain.apply({"params": {**params, "pos_embedding": jnp.asarray(resampled)}}, small)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ---- the step ------------------------------------------------------------------------------------------

def _batch(seed: int = 0, local_size: int = 8):
    source = DemoSource("train", 64, 16)
    rng = np.random.default_rng(seed)
    images = np.stack([source[i]["image"] for i in range(16)])
    tokens = ByteTokenizer(12)([source[i]["captions"][0] for i in range(16)])
    local = rng.integers(0, 256, (16, N_LOCAL, local_size, local_size, 3)).astype(np.uint8)
    return {"images": images, "tokens": tokens, "local_images": local}


def _run(config, mesh_shape, steps):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.create_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices)
    training = build_training(config, mesh)
    state = training.init_state(jax.random.key(config.seed))
    history = [jax.device_get((state.params, state.distill))]
    metrics = []
    with jax.set_mesh(mesh):
        for step in range(steps):
            state, step_metrics = training.step(state, jax.device_put(_batch(step), training.batch_sharding))
            history.append(jax.device_get((state.params, state.distill)))
            metrics.append({name: float(value) for name, value in step_metrics.items()})
    return training, history, metrics


@pytest.fixture(scope="module")
def single_device_run():
    return _run(_distill_config(), (1, 1, 1), 3)


def test_losses_join_at_start_fraction_and_add_to_the_loss(single_device_run):
    _, _, metrics = single_device_run
    # total_steps 4, start_fraction 0.5: steps 0 and 1 without, step 2 with.
    for step in (0, 1):
        assert metrics[step]["self_distillation_loss"] == 0.0 and metrics[step]["masked_prediction_loss"] == 0.0
        assert metrics[step]["loss"] == pytest.approx(metrics[step]["contrastive_loss"], rel=1e-6)
    on = metrics[2]
    assert on["self_distillation_loss"] > 0 and on["masked_prediction_loss"] > 0
    # Cross-entropies against a distribution over 32 prototypes: at least its entropy, at most far above log 32.
    assert on["self_distillation_loss"] < 3 * np.log(PROTOTYPES)
    assert on["loss"] == pytest.approx(on["contrastive_loss"] + on["self_distillation_loss"]
                                       + 0.25 * on["masked_prediction_loss"], rel=1e-5)


def test_the_teacher_is_the_ema_of_the_student_and_gets_no_gradient(single_device_run):
    _, history, _ = single_device_run
    params0, distill0 = history[0]
    expected = {name: params0[name] for name in ("img", "distill")}
    jax.tree.map(np.testing.assert_array_equal, distill0["teacher"], expected)  # starts as the student
    for params, distill in history[1:]:
        # By hand: teacher <- 0.9 teacher + 0.1 student after each update (float64 reference).
        expected = jax.tree.map(lambda t, p: 0.9 * np.float64(t) + 0.1 * np.float64(p), expected,
                                {name: params[name] for name in ("img", "distill")})
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7),
                     distill["teacher"], expected)
    assert "distill" in params0 and "mask_token" in params0["img"]


def test_the_centres_move_only_once_distillation_is_on(single_device_run):
    training, history, _ = single_device_run
    centres = [distill["center"] for _, distill in history]
    np.testing.assert_array_equal(centres[1], np.zeros(PROTOTYPES))
    np.testing.assert_array_equal(centres[2], np.zeros(PROTOTYPES))
    # Step 2 (on): 0.9 x 0 + 0.1 x the mean of the teacher's pooled logits, the teacher as it was before the step.
    params, distill = history[2]
    teacher = {**params, **distill["teacher"]}
    pooled, patches = training.model.apply({"params": teacher}, jnp.asarray(_batch(2)["images"]),
                                           method=training.model.distill_logits)
    np.testing.assert_allclose(centres[3], 0.1 * np.asarray(pooled, np.float64).mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(history[3][1]["patch_center"],
                               0.1 * np.asarray(patches, np.float64).reshape(-1, PROTOTYPES).mean(axis=0),
                               rtol=1e-5, atol=1e-7)


def test_distillation_on_a_2x4_mesh_equals_one_device(single_device_run):
    """Data x tensor parallel: the batch and its local crops over 2 devices, the head's prototypes over 4."""
    _, history_one, metrics_one = single_device_run
    _, history_mesh, metrics_mesh = _run(_distill_config(), (2, 1, 4), 3)
    for name in ("loss", "contrastive_loss", "self_distillation_loss", "masked_prediction_loss"):
        assert metrics_mesh[2][name] == pytest.approx(metrics_one[2][name], rel=1e-5)
    for one, mesh in zip(jax.tree.leaves(history_one[-1]), jax.tree.leaves(history_mesh[-1])):
        np.testing.assert_allclose(mesh, one, rtol=1e-4, atol=1e-5)


# ---- bad settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"model.distill.weight": -1.0}, "model.distill.weight must be a finite number >= 0"),
    ({"model.distill.mask_ratio": 1.0}, r"model.distill.mask_ratio must be in \[0, 1\)"),
    ({"model.distill.start_fraction": 1.5}, r"model.distill.start_fraction must be in \[0, 1\]"),
    ({"model.distill.local_image_size": 32}, r"local_image_size=32 must be in \(0, model.image.image_size=16\]"),
    ({"model.distill.n_local": 0}, "model.distill.n_local=0; give at least 1"),
    ({"model.distill.local_crop_scale": (0.5, 0.2)}, "local_crop_scale must satisfy 0 < min <= max <= 1"),
    ({"model.distill.teacher_decay": 1.0}, r"model.distill.teacher_decay must be in \[0, 1\)"),
    ({"model.image.kind": "naflex"}, "model.distill needs model.image.kind='vit'"),
    ({"accum_steps": 2}, "model.distill with accum_steps=2"),
])
def test_bad_distillation_settings_are_refused_with_the_fix(overrides, message):
    config_lib.validate(_distill_config())  # the settings without the bad one are accepted
    with pytest.raises(ValueError, match=message):
        config_lib.validate(_distill_config(**overrides))


def test_a_local_crop_of_part_patches_is_refused():
    with pytest.raises(ValueError, match=r"local_image_size=6 is not a multiple of the patch size 4; e.g. "
                                         r"--config.model.distill.local_image_size=4"):
        two_towers.image_options(_distill_config(**{"model.distill.local_image_size": 6}))


def test_the_distillation_parts_leave_the_towers_initialisation_as_it_was():
    """The head and the mask token are new parameters; every other one starts as in a run without them."""
    plain = nn.unbox(two_towers.abstract_params(tiny_config().model))  # shapes only: check the tree first
    off, on = (build_training(config, sharding.create_mesh((1, 1, 1), ("data", "fsdp", "tensor"), jax.devices()[:1]))
               .init_state(jax.random.key(0)).params for config in (tiny_config(), _distill_config()))
    assert set(on) - set(off) == {"distill"} and set(on["img"]) - set(off["img"]) == {"mask_token"}
    on["img"] = {name: value for name, value in on["img"].items() if name != "mask_token"}
    del on["distill"]
    assert jax.tree.structure(off) == jax.tree.structure(plain)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(on), jax.device_get(off))
