"""tools/convert.py: any source -> ArrayRecord / WebDataset shards -> the same records back."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import images, sources
from tools import convert

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def folder_source(tmp_path):
    """7 images with 1-3 captions each; img3 is corrupt and must be skipped and reported."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rows = ["image,caption"]
    for index in range(7):
        data = b"\xff\xd8\xff not really a jpeg" if index == 3 else _jpeg(index)
        (image_dir / f"img{index}.jpg").write_bytes(data)
        rows += [f'img{index}.jpg,"caption {c} of image {index}, ü"' for c in range(index % 3 + 1)]
    (tmp_path / "captions.csv").write_text("\n".join(rows), encoding="utf-8")
    return sources.CaptionFolderSource(image_dir, tmp_path / "captions.csv")


def _records(source):
    return [source[index] for index in range(len(source))]


def test_shard_ranges_cover_every_record_once():
    for num_records, num_shards in [(10, 3), (2, 5), (0, 1), (1000, 7)]:
        ranges = convert.shard_ranges(num_records, num_shards)
        assert len(ranges) == num_shards
        assert [i for r in ranges for i in r] == list(range(num_records))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.parametrize("format,reader", [("arrayrecord", "arrayrecord"),
                                           ("webdataset", "webdataset")])
def test_round_trip_skips_and_reports_corrupt_images(folder_source, tmp_path, format, reader):
    output = tmp_path / "out"
    manifest = convert.convert(folder_source, output, format=format, name="train", num_shards=3,
                               progress=False)
    assert (manifest["records_written"], manifest["records_skipped"]) == (6, 1)
    assert manifest["skipped"][0]["index"] == 3 and "DecodeError" in manifest["skipped"][0]["reason"]
    assert json.loads((output / "train.manifest.json").read_text()) == manifest
    assert not list(output.glob("*.partial"))
    pattern = "train-*-of-00003." + ("array_record" if format == "arrayrecord" else "tar")
    kwargs = {"paths": str(output / pattern)} if reader == "arrayrecord" else {
        "shards": str(output / pattern)}
    converted = sources.make_source(reader, **kwargs)
    expected = [record for record in _records(folder_source) if record["id"] != "img3.jpg"]
    assert _records(converted) == expected  # bytes, all captions, ids, order


def test_array_images_are_stored_losslessly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    in_memory = [{"image": pixels, "captions": ["x"], "id": "a"}]
    for format, kind, key in [("arrayrecord", "arrayrecord", "paths"),
                              ("webdataset", "webdataset", "shards")]:
        convert.convert(in_memory, tmp_path / format, format=format, progress=False)
        source = sources.make_source(kind, **{key: str(tmp_path / format / "data-*")})
        np.testing.assert_array_equal(images.decode_image(source[0]["image"]), pixels)


def test_unknown_format_is_explained(folder_source, tmp_path):
    with pytest.raises(ValueError, match="valid formats"):
        convert.convert(folder_source, tmp_path, format="parquet")


def test_cli_converts_real_coco_mini(tmp_path):
    root = SHARED_DATA / "coco_mini"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root.resolve()} (only on the dev box)")
    manifest = convert.main(["--source", "coco2017", "--path", str(root), "--arg", "split=val",
                             "--output_dir", str(tmp_path), "--name", "val",
                             "--records_per_shard", "50"])
    assert manifest["records_written"] == 79 and len(manifest["shards"]) == 2
    original = sources.make_source("coco2017", path=root, split="val")
    converted = sources.ArrayRecordSource(str(tmp_path / "val-*.array_record"))
    assert _records(converted) == _records(original)


def test_img2dataset_layout_by_target_shard_size_streams_back(folder_source, tmp_path):
    output = tmp_path / "wds"
    image_bytes = len(folder_source[0]["image"]) + 2048  # the size estimate per record, as documented
    manifest = convert.convert(folder_source, output, format="webdataset", name="", progress=False,
                               shard_size_mb=2.5 * image_bytes / 1e6)
    assert manifest["shards"] == [f"{shard:05d}.tar" for shard in range(len(manifest["shards"]))]
    assert 2 <= len(manifest["shards"]) <= 4  # 7 records at about 2 per shard
    assert (output / "shards.manifest.json").exists()
    stream = sources.make_source("webdataset_stream", shards=manifest["pattern"]).stream(
        seed=0, process_index=0, process_count=1, num_epochs=1)
    streamed = sorted((record["id"], tuple(record["captions"]), record["image"]) for record in stream)
    expected = sorted((record["id"], tuple(record["captions"]), record["image"]) for record in _records(folder_source)
                      if record["id"] != "img3.jpg")
    assert streamed == expected


def test_converting_again_into_the_same_folder_needs_overwrite_and_leaves_no_stale_shard(folder_source, tmp_path):
    output = tmp_path / "out"
    convert.convert(folder_source, output, format="webdataset", name="train", num_shards=3, progress=False)
    convert.convert(folder_source, output, format="webdataset", name="test", num_shards=1, progress=False)  # another name: fine
    with pytest.raises(FileExistsError, match=r"already holds webdataset output named 'train' \(train-00000-of-00003.tar, "
                                              r".*--overwrite"):
        convert.convert(folder_source, output, format="webdataset", name="train", num_shards=2, progress=False)
    convert.convert(folder_source, output, format="webdataset", name="train", num_shards=2, progress=False, overwrite=True)
    assert sorted(entry.name for entry in output.iterdir()) == [
        "test-00000-of-00001.tar", "test.manifest.json",
        "train-00000-of-00002.tar", "train-00001-of-00002.tar", "train.manifest.json"]
