"""The caption decoder through the trainer: logged under its own name, a stopped run resumes bitwise with
the decoder in the checkpoint, exports write the two towers (the decoder only with --with_decoder), and a
recipe that adds the decoder to a workdir without one is told how to start it."""
import json

import jax
import numpy as np
import pytest

from siglip_jax.io import checkpoint, formats, loading
from siglip_jax.io import params as params_lib
from siglip_jax.training import trainer
from tests.helpers import tiny_config


def _config(total_steps, **overrides):
    config = tiny_config(**{"model.decoder.weight": 1.0, "model.text.max_len": 32, **overrides})
    config.total_steps, config.checkpoint_every_steps, config.keep_checkpoints = total_steps, 2, 2
    config.tensorboard = False
    return config


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("captioning") / "uninterrupted"
    trainer.train(_config(4), str(workdir))
    return workdir


def test_caption_loss_is_logged_and_falls(uninterrupted):
    lines = _metrics(uninterrupted)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    caption = [line["caption_loss"] for line in lines]
    assert caption[0] == pytest.approx(np.log(259), rel=1e-5)  # uniform over the byte vocabulary at first
    assert caption[-1] < caption[0]
    for line in lines:
        assert line["loss"] == pytest.approx(line["contrastive_loss"] + line["caption_loss"], rel=1e-5)


def test_stopped_run_resumes_bitwise_with_the_decoder(uninterrupted, tmp_path):
    workdir = tmp_path / "stopped"
    trainer.train(_config(2), str(workdir))  # stops at step 2, its checkpoint holds the decoder
    trainer.train(_config(4), str(workdir))  # resumes at step 2
    resumed, reference = _metrics(workdir), _metrics(uninterrupted)
    assert [line["step"] for line in resumed] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed, reference):
        for name in ("loss", "contrastive_loss", "caption_loss", "grad_norm"):
            assert ours[name] == theirs[name], (ours["step"], name)
    resumed_params = jax.device_get(loading.load_model(str(workdir)).params)
    reference_params = jax.device_get(loading.load_model(str(uninterrupted)).params)
    assert "dec" in resumed_params
    jax.tree.map(np.testing.assert_array_equal, resumed_params, reference_params)


def test_exports_write_the_towers_and_the_decoder_only_when_asked(uninterrupted, tmp_path):
    exported = loading.load_model(str(uninterrupted))
    towers, with_decoder = str(tmp_path / "towers.msgpack"), str(tmp_path / "with_decoder.msgpack")
    formats.export_model(exported, "params", towers)
    formats.export_model(exported, "params", with_decoder, with_decoder=True)
    plain = params_lib.load_params_file(towers)
    assert sorted(plain.params) == ["b", "img", "t", "txt"] and plain.config.model.decoder.weight == 0.0
    kept = params_lib.load_params_file(with_decoder)
    assert "dec" in kept.params and kept.config.model.decoder.weight == 1.0
    jax.tree.map(np.testing.assert_array_equal, kept.params["dec"], jax.device_get(exported.params["dec"]))
    with pytest.raises(ValueError, match="--with_decoder keeps the caption decoder in a params file"):
        formats.export_model(exported, "hf", str(tmp_path / "hf2"), with_decoder=True)


def test_adding_the_decoder_to_a_workdir_names_the_arrays_and_how_to_start_them(tmp_path):
    workdir = tmp_path / "towers_only"
    trainer.train(_config(2, **{"model.decoder.weight": 0.0}), str(workdir))
    with pytest.raises(checkpoint.CheckpointMismatchError) as refused:
        trainer.train(_config(4), str(workdir))
    message = str(refused.value)
    assert "model.decoder.weight: 0.0 in the checkpoint, 1.0 now" in message
    assert "has none of its dec/... arrays" in message
    assert f"--config.init_from={workdir}" in message and "init_skip" in message
    # The fix it gives works: a new workdir, the towers loaded, the decoder fresh.
    fresh = tmp_path / "with_decoder"
    # Learning rate 0: the step leaves the parameters as they were loaded.
    trainer.train(_config(1, **{"init_from": str(workdir), "init_skip": ("dec/.*",), "optim.learning_rate": 0.0,
                               "optim.weight_decay": 0.0}),
                  str(fresh))
    started, source = (jax.device_get(loading.load_model(str(path)).params) for path in (fresh, workdir))
    assert "dec" in started and "dec" not in source
    for group in ("img", "txt", "t", "b"):
        jax.tree.map(np.testing.assert_array_equal, started[group], source[group])


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_held_out_caption_loss_eval_matches_numpy_and_falls(tmp_path):
    """The caption_loss eval against a float64 numpy cross-entropy of the decoder's logits (from model.apply on
    each pair alone, padding after the first EOS dropped by hand), and below log(259), where it starts."""
    from siglip_jax.config import eval_config, source_config
    from siglip_jax.data.from_config import build_source, build_tokenizer
    from siglip_jax.data import pipeline
    from siglip_jax.models import two_towers

    config = _config(2)
    config.eval_every_steps, config.data.eval_batch_size = 2, 8
    # 20 pairs: two full batches of 8, the last 4 left out.
    config.evals.captions = eval_config("caption_loss", source_config("demo", split="eval", size=20, image_size=16))
    workdir = tmp_path / "evaluated"
    trainer.train(config, str(workdir))
    logged = [line for line in _metrics(workdir) if "captions/caption_loss" in line][-1]
    assert logged["step"] == 2 and logged["captions/num_pairs"] == 16

    params = jax.device_get(loading.load_model(str(workdir)).params)
    model = two_towers.build_model(config.model)
    tokenizer = build_tokenizer(config)
    source = build_source(config.evals.captions.source)
    pairs = [(image, captions[0]) for _, image, captions, _ in pipeline.eval_records(source, 16, range(16))]
    expected = {}
    for parallel in (False, True):
        total, count = 0.0, 0
        for image, caption in pairs:
            tokens = tokenizer([caption])
            _, _, decoded = model.apply({"params": params}, image[None], tokens, np.array([parallel]),
                                        method=model.embed_and_decode)
            logits = (np.asarray(decoded.hidden, np.float64) @ np.asarray(decoded.head_kernel, np.float64)
                      + np.asarray(decoded.head_bias, np.float64))[0]
            ids = tokens[0]
            length = list(ids).index(tokenizer.eos_id) + 1 if tokenizer.eos_id in ids else len(ids)
            log_probs = _log_softmax(logits[:length])
            total -= log_probs[np.arange(length), ids[:length]].sum()
            count += length
        expected[parallel] = total / count
    assert logged["captions/caption_loss"] == pytest.approx(expected[False], rel=1e-4)
    assert logged["captions/parallel_caption_loss"] == pytest.approx(expected[True], rel=1e-4)
    assert logged["captions/caption_loss"] < np.log(259)


def test_caption_loss_eval_needs_the_decoder():
    from siglip_jax.config import eval_config, source_config
    from siglip_jax.data.from_config import build_source, build_tokenizer
    from siglip_jax.evaluation import runner

    config = _config(2, **{"model.decoder.weight": 0.0})
    config.evals.captions = eval_config("caption_loss", source_config("demo", split="eval", size=20, image_size=16))
    with pytest.raises(ValueError, match=r"caption_loss eval needs the caption decoder: set model.decoder.weight > 0"):
        runner.build_evaluators(config, build_tokenizer(config), build_source)
