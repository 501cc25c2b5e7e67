"""SigLIP 2's caption decoder (LocCa): the loss against numpy, its chunked form, the decoder's inputs and
masks, what each position may see, one step on one device against the same step on a 2x4 mesh, and the
config's refusals."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax import config as config_lib
from siglip_jax.losses import captioning
from siglip_jax.models import decoder as decoder_lib
from siglip_jax.models import two_towers
from siglip_jax.runtime import sharding
from siglip_jax.training.train_step import Captioning, build_training
from tests.helpers import tiny_config

EOS = 1


def numpy_caption_loss(hidden, kernel, bias, tokens, eos_id):
    """Mean over real tokens (up to and including the first EOS) of -log softmax(h W + c)[y], in float64."""
    total, count = 0.0, 0
    for row in range(tokens.shape[0]):
        for position in range(tokens.shape[1]):
            logits = hidden[row, position].astype(np.float64) @ kernel.astype(np.float64) + bias
            log_norm = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
            total += log_norm - logits[tokens[row, position]]
            count += 1
            if tokens[row, position] == eos_id:
                break
    return total / count


@pytest.fixture(scope="module")
def caption_case():
    rng = np.random.default_rng(0)
    batch, length, width, vocab = 3, 8, 5, 11
    tokens = rng.integers(2, vocab, (batch, length)).astype(np.int32)
    tokens[0, 3:] = EOS  # "y0 y1 y2 EOS pad pad ..." (SigLIP pads with EOS)
    tokens[1, 7] = EOS  # ends at the last position
    # row 2 holds no EOS (a caption cut at max_len without one): every position counts
    hidden = rng.normal(size=(batch, length, width)).astype(np.float32)
    kernel = rng.normal(size=(width, vocab)).astype(np.float32)
    bias = rng.normal(size=(vocab,)).astype(np.float32)
    return hidden, kernel, bias, tokens


def test_caption_weights_cover_the_caption_and_its_eos_only(caption_case):
    *_, tokens = caption_case
    weights = np.asarray(captioning.caption_weights(jnp.asarray(tokens), EOS))
    np.testing.assert_array_equal(weights[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(weights[1], [1] * 8)
    np.testing.assert_array_equal(weights[2], [1] * 8)


@pytest.mark.parametrize("chunk_size", [0, 2, 4])
def test_caption_loss_equals_numpy(caption_case, chunk_size):
    hidden, kernel, bias, tokens = caption_case
    loss = captioning.caption_loss(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(bias), jnp.asarray(tokens),
                                   EOS, chunk_size=chunk_size)
    assert float(loss) == pytest.approx(numpy_caption_loss(hidden, kernel, bias, tokens, EOS), rel=1e-5)


def test_chunked_caption_loss_has_the_unchunked_gradient(caption_case):
    hidden, kernel, bias, tokens = (jnp.asarray(x) for x in caption_case)

    def gradient(chunk_size):
        return jax.grad(lambda h, k, c: captioning.caption_loss(h, k, c, tokens, EOS, chunk_size=chunk_size),
                        argnums=(0, 1, 2))(hidden, kernel, bias)

    for chunked, whole in zip(gradient(2), gradient(0)):
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-7)


def test_a_chunk_that_does_not_divide_the_caption_is_refused(caption_case):
    hidden, kernel, bias, tokens = (jnp.asarray(x) for x in caption_case)
    with pytest.raises(ValueError, match="logits_chunk=3 does not divide the caption length 8"):
        captioning.caption_loss(hidden, kernel, bias, tokens, EOS, chunk_size=3)


def test_self_attention_masks_are_causal_or_full_per_example():
    mask = np.asarray(decoder_lib.self_attention_mask(jnp.array([False, True]), 4))
    assert mask.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((4, 4), bool)))  # query i sees keys j <= i
    np.testing.assert_array_equal(mask[1, 0], np.ones((4, 4), bool))


def test_decoder_inputs_shift_right_or_are_all_masked():
    embeddings = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    bos, mask_token = np.array([-1.0, -2.0], np.float32), np.array([9.0, 9.0], np.float32)
    inputs = np.asarray(decoder_lib.decoder_inputs(jnp.asarray(embeddings), jnp.array([False, True]),
                                                   jnp.asarray(bos), jnp.asarray(mask_token)))
    np.testing.assert_array_equal(inputs[0], [bos, embeddings[0, 0], embeddings[0, 1]])  # teacher forcing
    np.testing.assert_array_equal(inputs[1], [mask_token] * 3)


@pytest.fixture(scope="module")
def small_decoder():
    model = decoder_lib.CaptionDecoder(vocab_size=13, max_len=6, width=16, depth=2, mlp_dim=32, num_heads=2)
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, 13, (2, 6)).astype(np.int32)
    image_tokens = rng.normal(size=(2, 4, 8)).astype(np.float32)  # another width than the decoder's
    params = model.init(jax.random.key(0), tokens, image_tokens, jnp.zeros(2, bool))["params"]
    params = nn.meta.unbox(params)
    # The head starts at zero; give it values so the outputs below depend on everything before it.
    params["head"]["kernel"] = jnp.asarray(rng.normal(size=(16, 13)), jnp.float32)

    def hidden(tokens, image_tokens, parallel):
        return np.asarray(model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(image_tokens),
                                      jnp.asarray(parallel)).hidden)

    return hidden, tokens, image_tokens


def test_autoregressive_position_sees_only_earlier_tokens(small_decoder):
    hidden, tokens, image_tokens = small_decoder
    parallel = np.array([False, False])
    before = hidden(tokens, image_tokens, parallel)
    changed = tokens.copy()
    changed[:, 3] = (changed[:, 3] + 1) % 13  # token 3 is the input of position 4 only
    after = hidden(changed, image_tokens, parallel)
    np.testing.assert_array_equal(after[:, :4], before[:, :4])  # positions 0-3 predict tokens 0-3
    assert np.abs(after[:, 4:] - before[:, 4:]).max() > 1e-4
    other_image = hidden(tokens, image_tokens + 1.0, parallel)
    assert np.abs(other_image[:, 0] - before[:, 0]).max() > 1e-4  # the first token comes from the image


def test_parallel_prediction_reads_the_image_and_no_caption_token(small_decoder):
    hidden, tokens, image_tokens = small_decoder
    parallel = np.array([True, True])
    before = hidden(tokens, image_tokens, parallel)
    np.testing.assert_array_equal(hidden((tokens + 1) % 13, image_tokens, parallel), before)
    assert np.abs(hidden(tokens, image_tokens + 1.0, parallel) - before).max() > 1e-4


def _decoder_config(**overrides):
    # SGD: the update is proportional to the gradient, so sharded and single-device steps compare closely.
    return tiny_config(**{"model.decoder.weight": 1.0, "model.text.max_len": 32, "model.decoder.logits_chunk": 8,
                          "optim.name": "sgd", "optim.learning_rate": 0.5, "optim.b1": 0.0, **overrides})


def _one_step(config, mesh_shape, batch):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.create_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices)
    training = build_training(config, mesh, eos_id=EOS)
    state = training.init_state(jax.random.key(config.seed))
    with jax.set_mesh(mesh):
        new_state, metrics = training.step(state, jax.device_put(batch, training.batch_sharding))
    return jax.device_get(new_state.params), {name: float(value) for name, value in metrics.items()}


@pytest.fixture(scope="module")
def decoder_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, (16, 32)).astype(np.int32)
    for row, length in enumerate(rng.integers(4, 32, 16)):
        tokens[row, length:] = EOS
    return {"images": rng.integers(0, 256, (16, 16, 16, 3)).astype(np.uint8), "tokens": tokens}


@pytest.fixture(scope="module")
def single_device_step(decoder_batch):
    return _one_step(_decoder_config(), (1, 1, 1), decoder_batch)


def test_first_caption_loss_is_log_vocabulary_and_adds_to_the_contrastive_loss(single_device_step):
    _, metrics = single_device_step
    # The zero-initialised head predicts the uniform distribution over the 259 byte tokens.
    assert metrics["caption_loss"] == pytest.approx(math.log(259), rel=1e-6)
    assert metrics["loss"] == pytest.approx(metrics["contrastive_loss"] + metrics["caption_loss"], rel=1e-6)


def test_decoder_step_on_a_2x4_mesh_equals_one_device(single_device_step, decoder_batch):
    """Data x tensor parallel: the batch over 2 devices, heads, MLP and the vocabulary over 4."""
    params_one, metrics_one = single_device_step
    params_mesh, metrics_mesh = _one_step(_decoder_config(), (2, 1, 4), decoder_batch)
    for name in ("loss", "contrastive_loss", "caption_loss"):
        assert metrics_mesh[name] == pytest.approx(metrics_one[name], rel=1e-5)
    for one, mesh in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_mesh)):
        np.testing.assert_allclose(mesh, one, rtol=1e-4, atol=1e-5)
    assert np.abs(params_one["dec"]["head"]["kernel"]).max() > 0  # the decoder was trained by the step


def test_parallel_examples_follow_seed_and_step():
    task = Captioning(weight=1.0, parallel_prob=0.5, eos_id=EOS, logits_chunk=0, seed=3)
    draws = np.asarray(jax.vmap(lambda step: task.parallel_examples(step, 64))(jnp.arange(50)))
    assert 0.45 < draws.mean() < 0.55  # 3,200 draws at p = 0.5
    np.testing.assert_array_equal(np.asarray(task.parallel_examples(jnp.int32(7), 64)), draws[7])
    assert not np.array_equal(draws[7], draws[8])


@pytest.mark.parametrize("overrides, message", [
    ({"model.decoder.weight": -1.0}, "model.decoder.weight must be a finite number >= 0"),
    ({"model.decoder.parallel_prob": 1.5}, r"model.decoder.parallel_prob must be in \[0, 1\]"),
    ({"model.decoder.logits_chunk": 5}, "logits_chunk=5 does not divide model.text.max_len=32"),
    ({"model.text.max_len": 12, "model.decoder.logits_chunk": 0}, "model.text.max_len=12 byte tokens is too short for a caption"),
    ({"model.image.kind": "naflex"}, "model.decoder needs model.image.kind='vit'"),
    ({"accum_steps": 2}, "model.decoder with accum_steps=2"),
])
def test_bad_decoder_settings_are_refused_with_the_fix(overrides, message):
    config_lib.validate(_decoder_config())  # the settings without the bad one are accepted
    with pytest.raises(ValueError, match=message):
        config_lib.validate(_decoder_config(**overrides))


def test_a_decoder_without_the_tokenizers_eos_is_refused():
    mesh = sharding.create_mesh((1, 1, 1), ("data", "fsdp", "tensor"), jax.devices()[:1])
    with pytest.raises(ValueError, match="needs the tokenizer's EOS id"):
        build_training(_decoder_config(), mesh)


def test_decoder_shape_defaults_to_half_the_text_tower():
    size = two_towers.decoder_size(config_lib.default_config().model)  # B text tower: 12 blocks, 768 wide
    assert (size.width, size.depth, size.mlp_dim, size.num_heads) == (768, 6, 3072, 12)
