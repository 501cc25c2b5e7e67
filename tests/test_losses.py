"""Contrastive losses against an independent float64 numpy reference, on every mesh and variant."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from siglip_jax.losses import contrastive

PER_DEVICE_BATCH, WIDTH, CHUNK = 4, 16, 2
LOG_TEMPERATURE = {"sigmoid": np.log(10.0), "softmax": np.log(1 / 0.07)}  # the papers' inits
BIAS = -10.0


# ------------------------------------------------------ numpy reference: loops and logaddexp only
def numpy_loss_and_grads(name, x, y, t, b):
    """Loss and (d_x, d_y, d_t, d_b) in float64, from the definitions and hand-derived gradients."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    batch, scale = x.shape[0], np.exp(t)
    dots = np.array([[x[i] @ y[j] for j in range(batch)] for i in range(batch)])
    if name == "sigmoid":
        logits = scale * dots + b
        labels = np.where(np.eye(batch, dtype=bool), 1.0, -1.0)
        loss = np.sum(np.logaddexp(0.0, -labels * logits)) / batch  # -log sigmoid(u) = log(1+e^-u)
        d_logits = -labels / (1.0 + np.exp(labels * logits)) / batch
    else:
        logits = scale * dots
        row_lse = np.array([np.logaddexp.reduce(logits[i, :]) for i in range(batch)])
        column_lse = np.array([np.logaddexp.reduce(logits[:, j]) for j in range(batch)])
        diagonal = np.diag(logits)
        loss = (np.sum(row_lse - diagonal) + np.sum(column_lse - diagonal)) / (2 * batch)
        rows = np.exp(logits - row_lse[:, None])          # image->text softmax
        columns = np.exp(logits - column_lse[None, :])    # text->image softmax
        d_logits = (rows + columns - 2 * np.eye(batch)) / (2 * batch)
    d_bias = np.sum(d_logits) if name == "sigmoid" else 0.0
    return loss, (scale * d_logits @ y, scale * d_logits.T @ x, scale * np.sum(d_logits * dots),
                  d_bias)


def unit_rows(rng, batch, width=WIDTH):
    v = rng.normal(size=(batch, width))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def assert_close(actual, expected, rtol=1e-5):
    """Relative to the largest entry: gradient entries near zero carry no relative meaning."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-12)
    assert np.max(np.abs(actual - expected)) <= rtol * scale, (actual, expected)


def test_numpy_reference_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x, y = unit_rows(rng, 3).astype(np.float64), unit_rows(rng, 3).astype(np.float64)
    for name in contrastive.LOSS_NAMES:
        t, b = 0.7, -1.5
        _, grads = numpy_loss_and_grads(name, x, y, t, b)
        eps = 1e-6
        bumped = lambda dx=0, dy=0, dt=0, db=0: numpy_loss_and_grads(  # noqa: E731
            name, x + dx, y + dy, t + dt, b + db)[0]
        unit = np.zeros_like(x)
        unit[1, 2] = eps
        assert np.isclose((bumped(dx=unit) - bumped(dx=-unit)) / (2 * eps), grads[0][1, 2])
        assert np.isclose((bumped(dy=unit) - bumped(dy=-unit)) / (2 * eps), grads[1][1, 2])
        assert np.isclose((bumped(dt=eps) - bumped(dt=-eps)) / (2 * eps), grads[2])
        assert np.isclose((bumped(db=eps) - bumped(db=-eps)) / (2 * eps), grads[3])


def test_hand_computed_two_by_two():
    # x = y = identity, t = 0 (scale 1), b = 0, so the logits are the identity matrix.
    # sigmoid: diagonal -log sigmoid(1) = log(1 + e^-1) = 0.3132617; off-diagonal -log sigmoid(-0)
    #   = log 2 = 0.6931472; (2 * 0.3132617 + 2 * 0.6931472) / 2 = 1.0064089.
    # softmax: each row and column: logsumexp(1, 0) - 1 = log(e + 1) - 1 = 0.3132617; mean of both.
    eye = jnp.eye(2)
    assert np.isclose(contrastive.sigmoid_loss(eye, eye, 0.0, 0.0), 1.0064089, atol=1e-6)
    assert np.isclose(contrastive.softmax_loss(eye, eye, 0.0), 0.3132617, atol=1e-6)


def test_temperature_clamp_hand_computed():
    # x = y = identity, t = log 5 clamped at exp(t) = 2: logits 2 I.
    # softmax: log(e^2 + 1) - 2 = log(1 + e^-2) = 0.1269280; sigmoid: (2 * 0.1269280 + 2 log 2) / 2 = 0.8200752.
    eye = jnp.eye(2)
    t = jnp.log(5.0)
    softmax = contrastive.contrastive_loss(eye, eye, t, 0.0, name="softmax", max_temperature=2.0)
    sigmoid = contrastive.contrastive_loss(eye, eye, t, 0.0, name="sigmoid", max_temperature=2.0)
    assert np.isclose(softmax, 0.1269280, atol=1e-6) and np.isclose(sigmoid, 0.8200752, atol=1e-6)
    # Below the clamp nothing changes: t = log 1.5 -> log(1 + e^-1.5) = 0.2014133.
    unclamped = contrastive.contrastive_loss(eye, eye, jnp.log(1.5), 0.0, name="softmax", max_temperature=2.0)
    assert np.isclose(unclamped, 0.2014133, atol=1e-6)
    # While clamped, t gets no gradient (open_clip clamps the parameter itself).
    grad_t = jax.grad(lambda t: contrastive.contrastive_loss(eye, eye, t, 0.0, name="softmax", max_temperature=2.0))(t)
    assert float(grad_t) == 0.0
    with pytest.raises(ValueError, match="max_temperature must be > 0"):
        contrastive.clamp_log_temperature(t, -1.0)


@pytest.mark.parametrize("name", contrastive.LOSS_NAMES)
def test_plain_references_match_numpy(name):
    rng = np.random.default_rng(1)
    x, y = unit_rows(rng, 8), unit_rows(rng, 8)
    t, b = LOG_TEMPERATURE[name], BIAS
    if name == "sigmoid":
        fn = contrastive.sigmoid_loss
    else:
        fn = lambda x, y, t, b: contrastive.softmax_loss(x, y, t)  # noqa: E731
    loss, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(x, y, t, b)
    expected_loss, expected_grads = numpy_loss_and_grads(name, x, y, t, b)
    assert_close(loss, expected_loss)
    for actual, expected in zip(grads, expected_grads):
        assert_close(actual, expected)


# ------------------------------------------------------------------ every variant on every mesh
VARIANTS = {
    "all_gather": dict(implementation="all_gather"),
    # chunked: chunk_size is num_shards x this (see all_variants_on): each shard gives it keys
    "chunked": dict(implementation="chunked", keys_per_shard=CHUNK),
    "chunked_one_key_per_shard": dict(implementation="chunked", keys_per_shard=1),
    "ring": dict(implementation="ring"),
    "ring_chunked": dict(implementation="ring", chunk_size=CHUNK),
}
MESHES = {  # label -> (axis sizes, axis names); the batch is sharded over data and fsdp
    "1": ((1, 1), ("data", "fsdp")),
    "2": ((2, 1), ("data", "fsdp")),
    "3": ((3,), ("data",)),  # odd ring: both directions carry the same number of hops
    "4": ((4, 1), ("data", "fsdp")),
    "8": ((8, 1), ("data", "fsdp")),
    "4x2": ((4, 2), ("data", "fsdp")),
    "2x4": ((2, 4), ("data", "fsdp")),
    "2x2x2_tensor": ((2, 2, 2), ("data", "fsdp", "tensor")),  # batch replicated over tensor
}


def make_mesh(label):
    shape, names = MESHES[label]
    num_devices = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:num_devices])


@functools.lru_cache(maxsize=None)
def all_variants_on(mesh_label):
    """Loss and gradients of every (loss, variant) pair on one mesh, from ONE compiled function.

    One jit per mesh instead of one per pair keeps this file fast on two CPU cores.
    """
    mesh = make_mesh(mesh_label)
    num_shards = mesh.shape["data"] * mesh.shape.get("fsdp", 1)
    rng = np.random.default_rng(num_shards)
    x, y = (unit_rows(rng, PER_DEVICE_BATCH * num_shards) for _ in range(2))
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axes))

    def everything(x, y, log_temperatures, b):
        results = {}
        for name in contrastive.LOSS_NAMES:
            for variant, options in VARIANTS.items():
                options = dict(options)
                if "keys_per_shard" in options:
                    options["chunk_size"] = options.pop("keys_per_shard") * num_shards
                loss_fn = functools.partial(contrastive.contrastive_loss, name=name, mesh=mesh,
                                            **options)
                results[name, variant] = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))(
                    x, y, log_temperatures[name], b)
        return results

    temperatures = {name: np.float32(t) for name, t in LOG_TEMPERATURE.items()}
    results = jax.jit(everything)(jax.device_put(x, batch_sharding),
                                  jax.device_put(y, batch_sharding), temperatures,
                                  np.float32(BIAS))
    return x, y, jax.device_get(results)


@pytest.mark.parametrize("mesh_label", MESHES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", contrastive.LOSS_NAMES)
def test_sharded_equals_global_reference(name, variant, mesh_label):
    x, y, results = all_variants_on(mesh_label)
    loss, grads = results[name, variant]
    expected_loss, expected_grads = numpy_loss_and_grads(
        name, x, y, float(np.float32(LOG_TEMPERATURE[name])), float(np.float32(BIAS)))
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert_close(loss, expected_loss)
    for grad_name, actual, expected in zip(("x", "y", "t", "b"), grads, expected_grads):
        assert_close(actual, expected), grad_name


@pytest.mark.parametrize("name", contrastive.LOSS_NAMES)
def test_no_mesh_honours_chunking_and_computes_in_float32(name):
    rng = np.random.default_rng(2)
    x, y = unit_rows(rng, 8), unit_rows(rng, 8)
    t, b = LOG_TEMPERATURE[name], BIAS
    expected_loss, _ = numpy_loss_and_grads(name, x, y, t, b)
    for implementation, chunk_size in (("all_gather", 0), ("chunked", 2), ("chunked", 8),
                                       ("ring", 4)):
        loss_fn = jax.jit(functools.partial(contrastive.contrastive_loss, name=name,
                                            implementation=implementation,
                                            chunk_size=chunk_size))
        assert_close(loss_fn(x, y, t, b), expected_loss)
    half = contrastive.contrastive_loss(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), t, b, name=name)
    assert half.dtype == jnp.float32
    grads = jax.grad(lambda x: contrastive.contrastive_loss(x, y, t, b, name=name))(
        x.astype(jnp.bfloat16))
    assert grads.dtype == jnp.bfloat16


def test_absent_batch_axes_are_ignored():
    mesh = make_mesh("4")
    rng = np.random.default_rng(3)
    x, y = unit_rows(rng, 16), unit_rows(rng, 16)
    expected_loss, _ = numpy_loss_and_grads("sigmoid", x, y, 2.0, -3.0)
    loss = jax.jit(lambda x, y: contrastive.contrastive_loss(
        x, y, 2.0, -3.0, mesh=mesh, implementation="ring", batch_axes=("replica", "data")))(x, y)
    assert_close(loss, expected_loss)


# ------------------------------------------------------------------------------------- memory
def _temp_bytes(name, options, num_devices, per_device=256, width=128):
    """Per-device temporary bytes of the compiled value_and_grad (exact: from the compiler)."""
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:num_devices])
    embeddings = jax.ShapeDtypeStruct((num_devices * per_device, width), jnp.float32,
                                      sharding=NamedSharding(mesh, PartitionSpec("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    loss_fn = functools.partial(contrastive.contrastive_loss, name=name, mesh=mesh, **options)
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))).lower(
        embeddings, embeddings, scalar, scalar).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name, options", [
    ("sigmoid", dict(implementation="ring")),
    ("sigmoid", dict(implementation="ring", chunk_size=64)),
    ("sigmoid", dict(implementation="chunked", chunk_size=128)),
    ("softmax", dict(implementation="ring", chunk_size=64)),
    ("softmax", dict(implementation="chunked", chunk_size=128)),
], ids=["sigmoid-ring", "sigmoid-ring-chunked", "sigmoid-chunked", "softmax-ring-chunked",
        "softmax-chunked"])
def test_ring_and_chunked_memory_does_not_grow_with_devices(name, options):
    """A regression guard for the in-place ring and the data-dependency ordering, at small shapes;
    bench/loss_memory.py measures the figures at full size."""
    assert _temp_bytes(name, options, 8) <= 1.1 * _temp_bytes(name, options, 2)


@pytest.mark.parametrize("name", contrastive.LOSS_NAMES)
def test_all_gather_memory_grows_with_devices(name):
    """The measure above is live: the gathered keys and logits grow 4x from 2 to 8 devices."""
    assert _temp_bytes(name, {}, 8) >= 3 * _temp_bytes(name, {}, 2)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, message", [
    (dict(name="clip"), "valid names are ('sigmoid', 'softmax')"),
    (dict(implementation="gather"), "valid ones are ('all_gather', 'ring', 'chunked')"),
    (dict(implementation="ring", chunk_size=3),
     "chunk_size=3 does not divide the per-device batch 4 (remainder 1); with 'ring' use 0 "
     "(whole blocks) or a divisor such as [1, 2, 4]"),
    (dict(implementation="ring", chunk_size=-1), "chunk_size=-1 is negative"),
    (dict(chunk_size=2), "does not apply to implementation='all_gather'.*Use "
                         "implementation='chunked'"),
    (dict(implementation="chunked"), "chunk_size must be 2 x a divisor of the per-device batch "
                                     "4; got 0. Use e.g. [2, 4, 8]"),
    (dict(implementation="chunked", chunk_size=3), "got 3. Use e.g. [2, 4, 8]"),
])
def test_bad_arguments_name_the_valid_values(kwargs, message):
    x = jnp.zeros((8, WIDTH))
    pattern = ".*".join(re.escape(part) for part in message.split(".*"))  # ".*": any text
    with pytest.raises(ValueError, match=pattern):
        contrastive.contrastive_loss(x, x, 0.0, 0.0, mesh=make_mesh("2"), **kwargs)


def test_batch_not_divisible_by_shards_says_by_how_much():
    x = jnp.zeros((10, WIDTH))
    with pytest.raises(ValueError, match="Global batch 10 is not divisible by the 4 shards.*"
                                         "2 over a multiple.*8 or 12"):
        contrastive.contrastive_loss(x, x, 0.0, 0.0, mesh=make_mesh("4"))
