"""Sources: every kind built from small files in a tmp dir, plus counts on the shared real data."""
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import images, sources

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _image_bytes(seed: int, format: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format)
    return buffer.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        (folder / f"img{index}.png").write_bytes(_image_bytes(index))
    return folder


# ------------------------------------------------------------------------- caption folder

def test_csv_groups_captions_per_image_in_order(image_dir, tmp_path):
    table = tmp_path / "captions.txt"  # Flickr8k's Kaggle file: a CSV named .txt
    table.write_text('image,caption\nimg1.png,"A dog, running ."\nimg0.png,a cat\n'
                     'img1.png,second dog\nimg0.png,another cat\nimg2.png,a bird\n')
    source = sources.CaptionFolderSource(image_dir, table)
    assert len(source) == 3
    assert [source[i]["id"] for i in range(3)] == ["img1.png", "img0.png", "img2.png"]
    assert source[0]["captions"] == ["A dog, running .", "second dog"]
    assert source[1]["image"] == (image_dir / "img0.png").read_bytes()
    assert source[-1]["id"] == "img2.png"
    with pytest.raises(IndexError):
        source[3]


def test_split_file_selects_and_orders(image_dir, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\nimg0.png,a\nimg1.png,b\nimg2.png,c\n")
    split = tmp_path / "split.txt"
    split.write_text("img2.png\nimg0.png\n")
    source = sources.CaptionFolderSource(image_dir, table, split_file=split)
    assert [source[i]["captions"] for i in range(len(source))] == [["c"], ["a"]]
    split.write_text("img0.png\nnot_captioned.png\n")
    with pytest.raises(ValueError, match="no caption"):
        sources.CaptionFolderSource(image_dir, table, split_file=split)


@pytest.mark.parametrize("filename,content", [
    ("token.txt", "img0.png#0\ta cat\nimg0.png#1\tanother cat\nimg1.png#0\ta dog, big\n"),
    ("results.csv", "image_name| comment_number| comment\nimg0.png| 0| a cat\n"
                    "img0.png| 1| another cat\nimg1.png| 0| a dog, big\n"),
    ("captions.tsv", "image\tcaption\nimg0.png\ta cat\nimg0.png\tanother cat\nimg1.png\ta dog, big\n"),
    ("captions.jsonl", '{"image": "img0.png", "captions": ["a cat", "another cat"]}\n\n'
                       '{"image": "img1.png", "caption": "a dog, big"}\n'),
])
def test_table_layouts(image_dir, tmp_path, filename, content):
    (tmp_path / filename).write_text(content)
    source = sources.CaptionFolderSource(image_dir, tmp_path / filename)
    assert [(source[i]["id"], source[i]["captions"]) for i in range(len(source))] == [
        ("img0.png", ["a cat", "another cat"]), ("img1.png", ["a dog, big"])]


def test_missing_images_error_or_skip(image_dir, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\nimg0.png,a\ngone.png,b\nimg1.png,c\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images are missing.*gone\.png.*skip"):
        sources.CaptionFolderSource(image_dir, table)
    source = sources.CaptionFolderSource(image_dir, table, on_missing="skip")
    assert len(source) == 2 and source.missing_images == ["gone.png"]


@pytest.mark.parametrize("filename,content,match", [
    ("c.csv", "picture,caption\nimg0.png,a\n", "no image column"),
    ("c.jsonl", '{"img": "img0.png"}\n', "line 1"),
    ("c.parquet", "", "Unknown captions file type"),
])
def test_bad_tables_are_explained(image_dir, tmp_path, filename, content, match):
    (tmp_path / filename).write_text(content)
    with pytest.raises(ValueError, match=match):
        sources.CaptionFolderSource(image_dir, tmp_path / filename)


# ---------------------------------------------------------------------------------- coco

def test_coco_captions(image_dir, tmp_path):
    coco = {"images": [{"id": 7, "file_name": "img0.png"}, {"id": 9, "file_name": "img1.png"},
                       {"id": 11, "file_name": "img2.png"}],
            "annotations": [{"image_id": 9, "id": 1, "caption": "b1 "},
                            {"image_id": 7, "id": 2, "caption": "a1"},
                            {"image_id": 9, "id": 3, "caption": "b2"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    source = sources.make_source("coco_captions", image_dir=image_dir, annotations_json=path)
    assert len(source) == 2 and source.num_uncaptioned == 1
    assert source[0] == {"image": (image_dir / "img0.png").read_bytes(), "captions": ["a1"],
                         "id": "7"}
    assert source[1]["captions"] == ["b1", "b2"]
    assert list(sources.iter_captions(source)) == ["a1", "b1", "b2"]


# ----------------------------------------------------------------------------- webdataset

def _write_tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    _write_tar(tmp_path / "shard-00000.tar", [
        ("000.jpg", _image_bytes(0, "JPEG")), ("000.txt", b"a red car \n"),
        ("001.png", _image_bytes(1)), ("001.json", b'{"caption": "a dog", "url": "x"}'),
        ("002.webp", _image_bytes(2, "WEBP")),
        ("002.json", b'{"captions": ["one", "two"], "id": "orig-2"}'), ("002.txt", b"one"),
        ("003.jpg", _image_bytes(3, "JPEG")),  # no caption: incomplete
    ])
    _write_tar(tmp_path / "shard-00001.tar", [
        ("sub/004.txt", b"caption only"),  # no image: incomplete
        ("sub/005.jpeg", _image_bytes(5, "JPEG")), ("sub/005.txt", b"last"),
    ])
    return tmp_path


def test_webdataset_indexes_and_reads_members(shards):
    source = sources.WebDatasetSource(str(shards / "shard-{00000..00001}.tar"))
    assert len(source) == 4 and source.num_incomplete == 2
    records = [source[i] for i in range(4)]
    assert [r["id"] for r in records] == ["000", "001", "orig-2", "sub/005"]
    assert [r["captions"] for r in records] == [["a red car"], ["a dog"], ["one", "two"], ["last"]]
    assert records[1]["image"] == _image_bytes(1)
    np.testing.assert_array_equal(images.decode_image(records[2]["image"]),
                                  images.decode_image(_image_bytes(2, "WEBP")))
    assert sources.WebDatasetSource(str(shards / "*.tar")).shard_paths == source.shard_paths


def test_webdataset_survives_pickling_after_reads(shards):
    source = sources.WebDatasetSource([str(shards / "shard-00000.tar")])
    first = source[0]
    clone = pickle.loads(pickle.dumps(source))
    assert clone[0] == first and len(clone) == 3


def test_shard_paths_for_processes():
    paths = [f"s{i}.tar" for i in range(5)]
    per_process = [sources.shard_paths_for(paths, index, 2) for index in range(2)]
    assert per_process == [["s0.tar", "s2.tar", "s4.tar"], ["s1.tar", "s3.tar"]]
    with pytest.raises(ValueError, match="cannot be split over 8"):
        sources.shard_paths_for(paths, 0, 8)
    with pytest.raises(ValueError, match="process_index"):
        sources.shard_paths_for(paths, 2, 2)


def test_webdataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No shard matches"):
        sources.WebDatasetSource(str(tmp_path / "*.tar"))
    (tmp_path / "a.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="compressed"):
        sources.WebDatasetSource(str(tmp_path / "a.tar.gz"))


# --------------------------------------------------------------------------- arrayrecord

def test_arrayrecord_round_trip(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 3), dtype=np.uint8)
    records = [{"image": _image_bytes(0), "captions": ["a", "b"], "id": "x"},
               {"image": pixels, "captions": ["ü ñ"], "id": 12}]
    for shard, record in enumerate(records):
        writer = ArrayRecordWriter(str(tmp_path / f"r-{shard}.array_record"), "group_size:1")
        writer.write(sources.encode_record(record))
        writer.close()
    source = sources.make_source("arrayrecord", paths=str(tmp_path / "r-*.array_record"))
    assert len(source) == 2
    assert source[0] == records[0]
    assert source[1]["captions"] == ["ü ñ"] and source[1]["id"] == "12"
    np.testing.assert_array_equal(images.decode_image(source[1]["image"]), pixels)


def test_record_format_errors():
    with pytest.raises(ValueError, match="non-empty list"):
        sources.encode_record({"image": b"x", "captions": "a string", "id": "1"})
    with pytest.raises(ValueError, match="expected"):
        sources.decode_record(b"\x81\xa1a\x01")  # msgpack {"a": 1}
    with pytest.raises(FileNotFoundError, match="No ArrayRecord file"):
        sources.ArrayRecordSource("/nonexistent/*.array_record")


# ---------------------------------------------------------------------------------- tfds

def test_tfds_source_reads_array_record_builder(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 3)),
                "texts": tfds.features.Sequence(tfds.features.Text()),
                "meta": {"name": tfds.features.Text()},
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index in range(3):
                # A file object, not an array: TFDS encodes arrays with TensorFlow.
                yield str(index), {"picture": io.BytesIO(_image_bytes(index)),
                                   "texts": [f"cap {index}", f"alt {index}"],
                                   "meta": {"name": f"n{index}"}}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = sources.make_source("tfds", name="tiny_captions", split="train", data_dir=tmp_path,
                                 image_key="picture", caption_key="texts", id_key="meta/name")
    assert len(source) == 3
    by_id = {source[i]["id"]: source[i] for i in range(3)}
    assert by_id["n1"]["captions"] == ["cap 1", "alt 1"]
    assert isinstance(by_id["n1"]["image"], bytes)
    np.testing.assert_array_equal(images.decode_image(by_id["n1"]["image"]),
                                  images.decode_image(_image_bytes(1)))
    with pytest.raises(ValueError, match="no feature 'caption'"):
        sources.TfdsSource("tiny_captions", "train", tmp_path, image_key="picture")


# ------------------------------------------------------------------------ registry, grain

def test_make_source_errors_list_the_options():
    with pytest.raises(ValueError, match="valid kinds: .*'webdataset'"):
        sources.make_source("parquet", path="x")
    with pytest.raises(TypeError, match=r"takes arguments \['path', 'split', 'on_missing'\]"):
        sources.make_source("flickr8k", root="x")
    assert sources.parse_source_args(["split=test", "path=a=b"]) == {"split": "test", "path": "a=b"}


def test_sources_feed_grain(image_dir, tmp_path):
    import grain.python as grain

    table = tmp_path / "captions.csv"
    table.write_text("image,caption\nimg0.png,a\nimg1.png,b\nimg2.png,c\n")
    dataset = grain.MapDataset.source(sources.CaptionFolderSource(image_dir, table))
    dataset = dataset.map(lambda record: images.decode_image(record["image"]).shape)
    assert list(dataset) == [(6, 5, 3)] * 3


# ------------------------------------------------------------------------------ real data

def _require(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder.resolve()} (only on the dev box)")
    return folder


def test_flickr8k_official_splits():
    root = _require(SHARED_DATA / "flickr8k")
    splits = {split: sources.make_source("flickr8k", path=root, split=split)
              for split in ("train", "dev", "test", "all")}
    assert {split: len(source) for split, source in splits.items()} == {
        "train": 6000, "dev": 1000, "test": 1000, "all": 8091}
    names = {split: set(source.names) for split, source in splits.items()}
    assert not (names["train"] & names["dev"] or names["train"] & names["test"]
                or names["dev"] & names["test"])
    for split in ("train", "dev", "test"):
        source = splits[split]
        assert all(len(source.captions_by_name[name]) == 5 for name in source.names)
    assert sum(1 for _ in sources.iter_captions(splits["all"])) == 40455
    record = splits["test"][0]
    assert images.decode_image(record["image"]).shape == (128, 128, 3)


def test_coco_mini_counts():
    root = _require(SHARED_DATA / "coco_mini")
    for split, expected_images in (("train", 80), ("val", 79)):
        source = sources.make_source("coco2017", path=root, split=split)
        assert len(source) == expected_images and source.num_uncaptioned == 0
        assert sum(1 for _ in sources.iter_captions(source)) >= 5 * expected_images
        assert min(images.decode_image(source[0]["image"]).shape[:2]) == 160
