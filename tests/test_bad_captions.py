"""Hostile caption tables (issue 19): every unusable row is skipped, counted and named by file and line,
or the read stops with one error naming the file, the line and the fix; nothing vanishes silently."""
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import sources


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        buffer = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), index, np.uint8)).save(buffer, "PNG")
        (folder / f"img{index}.png").write_bytes(buffer.getvalue())
    return folder


def test_unterminated_quote_stops_naming_the_line_instead_of_swallowing_the_file(image_dir, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text('image,caption\nimg0.png,a cat\nimg1.png,"a dog\nimg2.png,a bird\nimg0.png,more\n')
    with pytest.raises(ValueError, match=r"captions\.csv'? line 3: a quoted field runs over lines 3-5.*Close the quote"):
        sources.CaptionFolderSource(image_dir, table)


def test_malformed_row_is_skipped_and_named_at_its_physical_line(image_dir, tmp_path, caplog):
    table = tmp_path / "captions.csv"
    # The quoted caption on line 2 spans no lines but the row on line 4 has one field only.
    table.write_text('image,caption\nimg0.png,"a cat, sitting"\nimg1.png,a dog\njust-one-field\nimg2.png,a bird\n')
    with caplog.at_level(logging.WARNING):
        source = sources.CaptionFolderSource(image_dir, table)
    assert [source[i]["id"] for i in range(len(source))] == ["img0.png", "img1.png", "img2.png"]
    assert len(source.skipped_rows) == 1 and source.skipped_rows[0].startswith(f"{table} line 4: 1 fields")
    assert f"Skipped 1 unusable rows of '{table}'" in caplog.text and f"{table} line 4" in caplog.text


@pytest.mark.parametrize("line,why", [
    ('{"image": "img1.png", "captions": {"a": 1}}', "'captions' must be a string or a list of strings"),
    ('{"image": "img1.png", "caption": null}', "'caption' must be a string or a list of strings"),
    ('{"image": "img1.png", "caption": 7}', "'caption' must be a string or a list of strings"),
    ('{"image": "img1.png", "captions": ["ok", 3]}', "'captions' must be a string or a list of strings"),
    ('{"image": null, "caption": "x"}', "'image' must be a non-empty string"),
    ('{"image": "img1.png", "caption": "torn', "not JSON"),
    ('["img1.png", "a list"]', "not a JSON object"),
])
def test_jsonl_caption_that_is_not_text_is_skipped_and_named(image_dir, tmp_path, line, why):
    table = tmp_path / "captions.jsonl"
    table.write_text('{"image": "img0.png", "caption": "a cat"}\n' + line + '\n{"image": "img2.png", "captions": ["a", "b"]}\n')
    source = sources.CaptionFolderSource(image_dir, table)
    assert [(source[i]["id"], source[i]["captions"]) for i in range(len(source))] == [
        ("img0.png", ["a cat"]), ("img2.png", ["a", "b"])]
    assert len(source.skipped_rows) == 1
    assert source.skipped_rows[0].startswith(f"{table} line 2: ") and why in source.skipped_rows[0]


def test_table_with_no_usable_row_is_an_error_naming_lines(image_dir, tmp_path):
    table = tmp_path / "captions.jsonl"
    table.write_text('{"image": "img0.png", "caption": null}\n\n{"image": "img1.png", "caption": 1}\n')
    with pytest.raises(ValueError, match=r"no usable rows: all 2 were skipped: .*captions\.jsonl line 1: .*captions\.jsonl line 3: "):
        sources.CaptionFolderSource(image_dir, table)


def test_utf8_byte_order_mark_is_dropped(image_dir, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_bytes(b"\xef\xbb\xbfimage,caption\nimg0.png,caf\xc3\xa9\n")
    source = sources.CaptionFolderSource(image_dir, table)
    assert source[0]["captions"] == ["caf\u00e9"]


def test_latin1_table_names_file_line_and_the_encoding_option(image_dir, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_bytes("image,caption\nimg0.png,a cat\nimg1.png,caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"captions\.csv'? line 3 is not valid utf-8.*encoding='latin-1'"):
        sources.CaptionFolderSource(image_dir, table)
    source = sources.make_source("caption_folder", image_dir=image_dir, captions_file=table, encoding="latin-1")
    assert source[1]["captions"] == ["caf\u00e9 cr\u00e8me"]


def test_on_missing_skip_logs_how_many_and_which(image_dir, tmp_path, caplog):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\nimg0.png,a\ngone.png,b\nlost.png,c\n")
    with caplog.at_level(logging.WARNING):
        source = sources.CaptionFolderSource(image_dir, table, on_missing="skip")
    assert source.missing_images == ["gone.png", "lost.png"]
    assert "Left out 2 of 3 images missing" in caplog.text and "gone.png" in caplog.text and "lost.png" in caplog.text


def _coco(tmp_path, coco):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_entries_sharing_a_file_name_merge_their_captions(image_dir, tmp_path):
    path = _coco(tmp_path, {
        "images": [{"id": 7, "file_name": "img0.png"}, {"id": 8, "file_name": "img0.png"},
                   {"id": 9, "file_name": "img1.png"}],
        "annotations": [{"image_id": 7, "caption": "first"}, {"image_id": 8, "caption": "second"},
                        {"image_id": 9, "caption": "dog"}, {"image_id": 8, "caption": "third"}]})
    source = sources.CocoCaptionsSource(image_dir, path)
    assert len(source) == 2 and source.num_uncaptioned == 0
    assert source[0]["captions"] == ["first", "second", "third"] and source[0]["id"] == "7"


def test_coco_null_and_numeric_captions_are_skipped_and_named(image_dir, tmp_path, caplog):
    path = _coco(tmp_path, {
        "images": [{"id": 7, "file_name": "img0.png"}, {"id": 9, "file_name": "img1.png"}, {"id": 10}],
        "annotations": [{"image_id": 7, "caption": None}, {"image_id": 7, "caption": "a cat"},
                        {"image_id": 9, "caption": 12}, {"caption": "no id"}]})
    with caplog.at_level(logging.WARNING):
        source = sources.CocoCaptionsSource(image_dir, path)
    assert len(source) == 1 and source[0]["captions"] == ["a cat"] and source.num_uncaptioned == 1
    assert [row.split(": ")[1] for row in source.skipped_rows] == [
        "annotations[0]", "annotations[2]", "annotations[3]", "images[2]"]
    assert "Skipped 4 unusable entries" in caplog.text


def test_truncated_coco_json_names_line_and_column(image_dir, tmp_path):
    path = tmp_path / "captions.json"
    path.write_text('{"images": [{"id": 7, "file_name": "img0.png"}],\n "annotations": [{"image_id": 7, ')
    with pytest.raises(ValueError, match=r"line 2 column \d+ is not valid JSON.*truncated"):
        sources.CocoCaptionsSource(image_dir, path)


def test_an_empty_captions_file_says_it_is_empty(image_dir, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("")  # was read as 0 records, then "use a smaller batch size"
    with pytest.raises(ValueError, match=r"captions\.csv'? has no \(image, caption\) rows \(it is empty\)"):
        sources.CaptionFolderSource(image_dir, table)


def test_a_header_with_unknown_column_names_is_named_not_read_as_data(image_dir, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("photo,description\nimg0.png,a cat\n")  # was read as an image called "photo"
    with pytest.raises(ValueError, match=r"line 1: \['photo', 'description'\] is neither a header naming an image "
                                         r"column \(one of image, .*\) and a caption column .*'image,caption'"):
        sources.CaptionFolderSource(image_dir, table)
