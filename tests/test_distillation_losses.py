"""SigLIP 2's self-distillation (SILC) and masked patch (TIPS) losses against float64 numpy written out here,
hand-computed values, and their gradients: the teacher side gets none."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.losses import distillation

RNG = np.random.default_rng(0)
STUDENT_T, TEACHER_T = 0.1, 0.04


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_distillation_loss_matches_numpy():
    views, batch, prototypes = 3, 5, 16
    student = RNG.normal(size=(views, batch, prototypes))
    teacher = RNG.normal(size=(batch, prototypes))
    center = RNG.normal(size=(prototypes,)) * 0.1
    targets = _softmax((teacher - center) / TEACHER_T)
    expected = np.mean([-(targets * _log_softmax(student[v] / STUDENT_T)).sum(-1) for v in range(views)])
    got = distillation.distillation_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                                         jnp.asarray(center, jnp.float32), student_temperature=STUDENT_T,
                                         teacher_temperature=TEACHER_T)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_a_uniform_student_costs_log_prototypes():
    """All-equal student logits: log_softmax = -log K everywhere, so the cross-entropy is log K whatever the teacher."""
    prototypes = 32
    got = distillation.distillation_loss(jnp.zeros((2, 4, prototypes)), jnp.asarray(RNG.normal(size=(4, prototypes))),
                                         jnp.zeros(prototypes), student_temperature=STUDENT_T,
                                         teacher_temperature=TEACHER_T)
    assert float(got) == pytest.approx(np.log(prototypes), rel=1e-6)


def test_the_teacher_and_centre_get_no_gradient():
    student = jnp.asarray(RNG.normal(size=(2, 4, 8)), jnp.float32)
    teacher = jnp.asarray(RNG.normal(size=(4, 8)), jnp.float32)
    center = jnp.asarray(RNG.normal(size=(8,)), jnp.float32)

    def loss(s, t, c):
        return distillation.distillation_loss(s, t, c, student_temperature=STUDENT_T, teacher_temperature=TEACHER_T)

    d_student, d_teacher, d_center = jax.grad(loss, argnums=(0, 1, 2))(student, teacher, center)
    assert np.abs(np.asarray(d_student)).max() > 0
    assert not np.asarray(d_teacher).any() and not np.asarray(d_center).any()


def test_masked_patch_loss_matches_numpy_and_ignores_unmasked_patches():
    batch, patches, prototypes = 3, 6, 10
    student = RNG.normal(size=(batch, patches, prototypes))
    teacher = RNG.normal(size=(batch, patches, prototypes))
    center = RNG.normal(size=(prototypes,)) * 0.1
    mask = RNG.random((batch, patches)) < 0.5
    mask[0, 0] = True
    targets = _softmax((teacher - center) / TEACHER_T)
    per_patch = -(targets * _log_softmax(student / STUDENT_T)).sum(-1)
    expected = per_patch[mask].mean()

    def loss(s, t):
        return distillation.masked_patch_loss(s, t, jnp.asarray(mask), jnp.asarray(center, jnp.float32),
                                              student_temperature=STUDENT_T, teacher_temperature=TEACHER_T)

    s, t = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    np.testing.assert_allclose(float(loss(s, t)), expected, rtol=1e-5)
    d_student, d_teacher = jax.grad(loss, argnums=(0, 1))(s, t)
    d_student = np.asarray(d_student)
    assert not d_student[~mask].any() and np.abs(d_student[mask]).max() > 0
    assert not np.asarray(d_teacher).any()
    nothing_masked = distillation.masked_patch_loss(s, t, jnp.zeros((batch, patches), bool), jnp.zeros(prototypes),
                                                    student_temperature=STUDENT_T, teacher_temperature=TEACHER_T)
    assert float(nothing_masked) == 0.0


def test_updated_center_is_the_running_mean():
    center = RNG.normal(size=(8,))
    teacher = RNG.normal(size=(2, 5, 8))
    expected = 0.9 * center + 0.1 * teacher.reshape(-1, 8).mean(0)
    got = distillation.updated_center(jnp.asarray(center, jnp.float32), jnp.asarray(teacher, jnp.float32), 0.9)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio, count", [(0.5, 8), (0.0, 0), (0.25, 4), (0.9, 14)])
def test_patch_mask_masks_exactly_the_ratio_of_each_row(ratio, count):
    mask = np.asarray(distillation.patch_mask(jax.random.key(3), 64, 16, ratio))
    assert mask.shape == (64, 16) and mask.dtype == bool
    assert (mask.sum(axis=1) == count).all()
    if 0 < count < 16:
        assert len({row.tobytes() for row in mask}) > 1  # rows are drawn independently
        frequency = mask.mean(axis=0)  # every position about equally likely
        assert np.abs(frequency - count / 16).max() < 0.25
    again = np.asarray(distillation.patch_mask(jax.random.key(3), 64, 16, ratio))
    assert (mask == again).all()


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_patch_mask_refuses_a_ratio_outside_zero_to_one(ratio):
    with pytest.raises(ValueError, match=r"mask ratio .* must be in \[0, 1\)"):
        distillation.patch_mask(jax.random.key(0), 2, 4, ratio)
