import glob
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from siglip_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_recipe(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))), ids=os.path.basename)
def test_every_shipped_recipe_loads_and_validates(path):
    config_lib.validate(_load_recipe(path))


def test_unknown_key_is_refused_with_the_valid_keys():
    config = config_lib.default_config()
    with pytest.raises(AttributeError, match="does not exist"):
        config.optim.learnig_rate = 1e-3
    unlocked = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    unlocked.optim.learnig_rate = 1e-3
    with pytest.raises(ValueError, match=r"Unknown config key 'optim.learnig_rate'.*learning_rate"):
        config_lib.validate(unlocked)


def test_wrong_type_is_refused():
    config = config_lib.default_config()
    with pytest.raises(TypeError):
        config.total_steps = "many"
    unlocked = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    unlocked.model.dtype = 16
    with pytest.raises(TypeError, match=r"'model.dtype' must be of type str"):
        config_lib.validate(unlocked)


def test_bad_choice_lists_valid_values():
    config = config_lib.default_config()
    config.loss.name = "hinge"
    with pytest.raises(ValueError, match="valid values: sigmoid, softmax"):
        config_lib.validate(config)
    config.loss.name = "sigmoid"
    config.loss.implementation = "ring_chunked"
    with pytest.raises(ValueError, match="'loss.implementation' is 'ring_chunked'; valid values: "
                                         "all_gather, ring, chunked"):
        config_lib.validate(config)


def test_config_choices_are_the_loss_modules():
    from siglip_jax.losses import contrastive  # the config module stays free of JAX imports

    assert config_lib.LOSS_NAMES == contrastive.LOSS_NAMES
    assert config_lib.LOSS_IMPLEMENTATIONS == contrastive.LOSS_IMPLEMENTATIONS


def test_eval_entries_are_checked():
    config = config_lib.default_config()
    config.evals.broken = config_lib.eval_config("retrieval", config_lib.source_config("demo"))
    config.evals.broken.kind = "captioning"
    with pytest.raises(ValueError, match="valid values: retrieval, classification"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="Unknown eval option 'topk'"):
        config_lib.eval_config("retrieval", config_lib.source_config("demo"), topk=5)


def test_command_line_overrides_and_typos(tmp_path):
    """`--config.key=value` overrides apply; a mistyped key stops the CLI with the key named."""
    script = (
        "import sys\n"
        "from absl import app\n"
        "from ml_collections import config_flags\n"
        "C = config_flags.DEFINE_config_file('config')\n"
        "def main(_):\n"
        "    print(C.value.total_steps, C.value.optim.learning_rate)\n"
        "app.run(main)\n"
    )
    (tmp_path / "cli.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": REPO}
    demo = os.path.join(REPO, "configs", "demo.py")
    ok = subprocess.run(
        [sys.executable, str(tmp_path / "cli.py"), f"--config={demo}", "--config.total_steps=7", "--config.optim.learning_rate=0.5"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["7", "0.5"]
    typo = subprocess.run(
        [sys.executable, str(tmp_path / "cli.py"), f"--config={demo}", "--config.total_stepz=7"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert typo.returncode != 0 and "total_stepz" in typo.stderr


def test_flickr8k_recipe_with_a_named_size():
    config = _load_recipe_with_arg(os.path.join(REPO, "configs", "flickr8k.py"), "B/16")
    config_lib.validate(config)
    assert config.model.image.variant == "B/16" and config.model.dtype == "bfloat16"


def _load_recipe_with_arg(path, arg):
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_with_arg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_configs_saved_before_the_decay_convention_keep_optax_semantics():
    """Runs saved before optim.weight_decay_convention existed multiplied decay by the learning rate; on
    resume they must keep doing so, not switch to the new big_vision default (1,000x stronger at 1e-3)."""
    import json

    saved = json.loads(config_lib.default_config().to_json())
    assert config_lib.from_json(json.dumps(saved)).optim.weight_decay_convention == "big_vision"
    del saved["optim"]["weight_decay_convention"]
    assert config_lib.from_json(json.dumps(saved)).optim.weight_decay_convention == "optax"


@pytest.mark.parametrize("value, warned", [(False, False), (True, True)])
def test_a_retired_key_in_a_saved_config_is_dropped_and_named_when_it_was_set(value, warned, caplog):
    import json

    saved = json.loads(config_lib.default_config().to_json())
    saved["loss"]["bidirectional"] = value  # written before issue 27 removed the bidirectional ring
    with caplog.at_level("WARNING"):
        config = config_lib.from_json(json.dumps(saved))
    assert "bidirectional" not in config.loss
    assert ("loss.bidirectional=True" in caplog.text and "one way" in caplog.text) == warned
    saved["loss"]["no_such_key"] = 1
    with pytest.raises(ValueError, match="Unknown config key 'loss.no_such_key'"):
        config_lib.from_json(json.dumps(saved))


def test_flickr8k_recipe_pointed_at_a_missing_folder_names_the_path_and_the_flag(tmp_path):
    from siglip_jax.data.from_config import build_source, missing_data_error
    from siglip_jax.data.tokenizers import ByteTokenizer
    from siglip_jax.evaluation import runner

    config = _load_recipe_with_arg(os.path.join(REPO, "configs", "flickr8k.py"), "small")
    missing = str(tmp_path / "nowhere")
    with config.unlocked():
        config.evals = ml_collections.ConfigDict({"flickr8k": config.evals.flickr8k})
    config.evals.flickr8k.source.args.path = missing
    with pytest.raises(FileNotFoundError, match=(
            rf"{missing}/Images.*'evals.flickr8k.source'.*--config\.evals\.flickr8k\.source\.args\.path=")):
        runner.build_evaluators(config, ByteTokenizer(8), build_source)
    config.data.train.args.path = missing
    with pytest.raises(FileNotFoundError) as raised:
        build_source(config.data.train)
    message = str(missing_data_error(raised.value, "data.train", config.data.train))
    assert f"{missing}/Images" in message and "--config.data.train.args.path=/path/to/data" in message


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", -1.0, "optim.learning_rate must be a finite number >= 0, got -1.0; a negative learning rate climbs"),
    ("learning_rate", float("nan"), "optim.learning_rate must be a finite number >= 0, got nan"),
    ("weight_decay", float("inf"), "optim.weight_decay must be a finite number >= 0, got inf; 0 turns it off"),
    ("grad_clip_norm", -0.5, "optim.grad_clip_norm must be a finite number >= 0, got -0.5"),
])
def test_negative_or_non_finite_optimizer_numbers_are_refused(key, value, message):
    config = config_lib.default_config()
    config.optim[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.validate(config)


def test_scan_unroll_below_one_is_refused():
    config = config_lib.default_config()
    config.model.scan_unroll = 0
    with pytest.raises(ValueError, match=re.escape("model.scan_unroll must be >= 1 (blocks per scan iteration")):
        config_lib.validate(config)


def test_the_demo_recipe_refuses_an_argument_it_would_ignore():
    with pytest.raises(ValueError, match=r"configs/demo.py takes no argument or 'naflex', got 'bogus'"):
        _load_recipe_with_arg(os.path.join(REPO, "configs", "demo.py"), "bogus")


def test_a_vocabulary_trained_on_first_use_must_match_the_model():
    config = config_lib.default_config()
    config.data.tokenizer_vocab_size = 2000  # model.text.vocab_size is 32,000 by default
    with pytest.raises(ValueError, match=r"data.tokenizer_vocab_size=2000 \(the vocabulary trained on first use\) "
                                         r"differs from model.text.vocab_size=32000"):
        config_lib.validate(config)


def test_a_missing_image_folder_is_blamed_on_image_dir_not_on_the_captions_file(tmp_path):
    from siglip_jax.config import source_config
    from siglip_jax.data.from_config import build_source, missing_data_error

    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,a dog\n")
    source = source_config("caption_folder", captions_file=str(tmp_path / "captions.txt"),
                           image_dir=str(tmp_path / "no_images"))
    with pytest.raises(FileNotFoundError) as raised:
        build_source(source)
    message = str(missing_data_error(raised.value, "data.train", source))
    assert "no_images" in message and "--config.data.train.args.image_dir=" in message


def test_missing_shards_are_blamed_on_shards_not_on_a_count_named_like_them(tmp_path):
    from siglip_jax.config import source_config
    from siglip_jax.data.from_config import build_source, missing_data_error

    # open_shards=2: "2" is in the error text (the path holds it) but a count is no location.
    source = source_config("webdataset_stream", open_shards=2, shards=str(tmp_path / "{00000..00002}.tar"))
    with pytest.raises(FileNotFoundError) as raised:
        build_source(source)
    message = str(missing_data_error(raised.value, "data.train", source))
    assert "--config.data.train.args.shards=/path/to/data" in message, message
