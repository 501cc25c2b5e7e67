"""Hostile command-line inputs (issue 19): exports never overwrite silently, search refuses k < 1, empty
queries and files that are not indexes, eval takes --checkpoint latest and skips (and names) bad pair lines."""
import json
import logging
import os

import numpy as np
import pytest

from siglip_jax.data import images as images_lib
from siglip_jax.evaluation import command
from siglip_jax.inference import search
from siglip_jax.io import checkpoint_params, formats, params as params_lib
from tests.helpers import tiny_config
from tests.params_helpers import random_params


@pytest.fixture(scope="module")
def exported():
    config = tiny_config(**{"model.image.pooling": "map"})  # HF's SiglipVisionModel has the MAP head only
    return params_lib.ExportedParams(config=config, params=random_params(config))


# ------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("format", ["hf", "stablehlo"])
def test_export_into_a_non_empty_directory_is_refused_without_overwrite(tmp_path, exported, format):
    (tmp_path / "mine.txt").write_text("the user's file")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"is not empty \(2 entries.*--overwrite"):
        formats.export_model(exported, format, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "mine.txt"] and (tmp_path / "config.json").read_text() == "{}"


def test_export_with_overwrite_writes_into_the_directory(tmp_path, exported):
    (tmp_path / "mine.txt").write_text("the user's file")
    formats.export_model(exported, "hf", str(tmp_path), overwrite=True)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "mine.txt").read_text() == "the user's file"


def test_params_export_onto_a_directory_is_refused_and_leaves_no_tmp(tmp_path, exported):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match=r"is a directory, but --format params writes one file.*model\.msgpack"):
        formats.export_model(exported, "params", str(target))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        params_lib.save_params_file(str(target), exported.config, exported.params)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == []


def test_params_export_over_an_existing_file_needs_overwrite(tmp_path, exported):
    target = tmp_path / "model.msgpack"
    target.write_bytes(b"older model")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        formats.export_model(exported, "params", str(target))
    assert target.read_bytes() == b"older model"
    formats.export_model(exported, "params", str(target), overwrite=True)
    assert params_lib.is_params_file(str(target)) and os.listdir(tmp_path) == ["model.msgpack"]


def test_directory_export_onto_a_file_is_refused(tmp_path, exported):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, but --format hf writes a directory"):
        formats.export_model(exported, "hf", str(target), overwrite=True)


# ------------------------------------------------------------------------------------------- search

@pytest.mark.parametrize("k", ["-2", "0", "two"])
def test_search_refuses_k_below_one(tmp_path, capsys, k):
    with pytest.raises(SystemExit) as exit_info:
        search.main(["query", str(tmp_path / "index.npz"), "a dog", "-k", k])
    assert exit_info.value.code == 2 and "argument -k: must be" in capsys.readouterr().err


def test_search_refuses_an_empty_query(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        search.main(["query", str(tmp_path / "index.npz"), "   "])
    assert exit_info.value.code == 2 and "the query text is empty" in capsys.readouterr().err
    index = search.Index(paths=["a.png"], embeddings=np.ones((1, 4), np.float32), model="m")
    with pytest.raises(ValueError, match="query text is empty"):
        search.query_index(index, None, "", k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        search.query_index(index, None, "a dog", k=0)


def _truncated_index(path):
    search.save_index(str(path), search.Index(paths=["a.jpg", "b.jpg"], embeddings=np.ones((2, 4), np.float32),
                                              model="m"))
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("write", [
    lambda path: path.write_text("just some text"),
    lambda path: np.save(open(path, "wb"), np.array([{"a": 1}], dtype=object), allow_pickle=True),
    lambda path: np.savez(open(path, "wb"), other=np.zeros(3)),
    lambda path: _truncated_index(path),  # a copy cut short: zipfile.BadZipFile before issue 29
])
def test_search_names_a_file_that_is_not_an_index(tmp_path, write):
    path = tmp_path / "index.npz"
    write(path)
    with pytest.raises(ValueError, match=r"index\.npz'? is not a search index written by `search index`"):
        search.load_index(str(path))


# --------------------------------------------------------------------------------------------- eval

def test_checkpoint_step_flag_accepts_latest_and_refuses_garbage():
    assert checkpoint_params.parse_step("latest") is None and checkpoint_params.parse_step(None) is None
    assert checkpoint_params.parse_step("1200") == 1200
    with pytest.raises(ValueError, match=r"--checkpoint 'last' with --workdir must be a step number .* or 'latest'"):
        checkpoint_params.parse_step("last")


def test_bad_pair_lines_are_skipped_named_and_the_rest_scored(tmp_path, exported, caplog):
    model = tmp_path / "model.msgpack"
    params_lib.save_params_file(str(model), exported.config, exported.params)
    good = tmp_path / "good.png"
    good.write_bytes(images_lib.encode_image(np.full((16, 16, 3), 200, np.uint8)))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join([
        json.dumps({"image": str(good), "text": "a grey square"}),
        '{"image": "x.png", "text": ',  # torn
        json.dumps({"image": str(good), "text": None}),
        json.dumps({"image": str(tmp_path / "broken.png"), "text": "broken"}),
        json.dumps({"image": str(good), "text": "nothing"}),
    ]))
    with caplog.at_level(logging.WARNING):
        results = command.run(None, None, str(model), str(pairs))
    assert [pair["text"] for pair in results["pairs"]] == ["a grey square", "nothing"]
    assert [entry.split(": ")[0] for entry in results["skipped_pairs"]] == [
        f"{pairs} line 2", f"{pairs} line 3", f"{pairs}"]
    assert "broken.png" in results["skipped_pairs"][2] and "skipped 3" in results["table"]
    assert f"Skipped 3 of 5 pairs in {pairs}" in caplog.text
    from siglip_jax.inference import predictor

    expected = predictor.load(str(model)).score_pairs([str(good)] * 2, ["a grey square", "nothing"])
    np.testing.assert_allclose([pair["probability"] for pair in results["pairs"]], expected, rtol=1e-5)
