"""Sources over image files on disk with captions in a table (CSV/TSV/JSONL) or COCO JSON.

Every source is a grain random-access data source: `len(source)` and `source[index]` ->
{"image": encoded bytes, "captions": list[str], "id": str}. Images are read as bytes only; the
pipeline decodes them, so a corrupt file costs one skipped example, not the run. Sources hold
plain Python data (no open files), so grain can pickle them into worker processes.
"""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from typing import Iterator, Sequence

_IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "file", "path")
_CAPTION_COLUMNS = ("caption", "captions", "comment", "text")
ON_MISSING = ("error", "skip")


def _pick_column(header: Sequence[str], names: Sequence[str], path: str, what: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise ValueError(f"{path!r} has columns {list(header)} but no {what} column; name it one of "
                     f"{list(names)}.")


def _read_delimited(path: str, delimiter: str | None) -> list[tuple[str, str]]:
    """(image, caption) rows of a CSV/TSV. With a header naming the columns, those are used;
    a headerless TSV is read as Flickr8k.token.txt: "name.jpg#3<TAB>caption"."""
    with open(path, newline="", encoding="utf-8") as file:
        first_line = file.readline()
        if delimiter is None:
            # Captions themselves contain commas, so a tab or "|" in the first line wins:
            # Flickr8k.token.txt is tab-separated, Flickr30k's Kaggle results.csv uses "|",
            # Flickr8k's Kaggle captions.txt (despite its name) is a comma CSV.
            delimiter = next((d for d in "\t|" if d in first_line), ",")
        file.seek(0)
        rows = list(csv.reader(file, delimiter=delimiter))
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    if any(name in header for name in _IMAGE_COLUMNS + _CAPTION_COLUMNS):
        image_column = _pick_column(header, _IMAGE_COLUMNS, path, "image")
        caption_column = _pick_column(header, _CAPTION_COLUMNS, path, "caption")
        body = rows[1:]
    else:
        image_column, caption_column, body = 0, len(rows[0]) - 1, rows
    pairs = []
    for line_number, row in enumerate(body, start=2 if body is not rows else 1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= max(image_column, caption_column):
            raise ValueError(f"{path!r} line {line_number} has {len(row)} fields, expected at "
                             f"least {max(image_column, caption_column) + 1}: {row!r}.")
        image = row[image_column].strip()
        if body is rows:
            image = image.split("#")[0]  # Flickr8k.token.txt numbers captions "name.jpg#0".
        pairs.append((image, row[caption_column].strip()))
    return pairs


def _read_jsonl(path: str) -> list[tuple[str, str]]:
    pairs = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                image = entry["image"]
                captions = entry["captions"] if "captions" in entry else entry["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path!r} line {line_number} is not a JSON object with 'image' and 'caption' "
                    f"(a string) or 'captions' (a list): {line.strip()[:200]!r} ({error}).") from error
            for caption in [captions] if isinstance(captions, str) else captions:
                pairs.append((image, caption))
    return pairs


def read_caption_table(path) -> list[tuple[str, str]]:
    """(image name, caption) pairs from a delimited table (.csv/.tsv/.txt; comma, tab or "|";
    with a header naming the image and caption columns, or headerless "image<TAB>caption") or
    .jsonl ({"image": ..., "caption": str} or {"captions": [...]})."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Captions file not found: {path!r}.")
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".json"):
        return _read_jsonl(path)
    if extension in (".csv", ".tsv", ".txt"):
        return _read_delimited(path, None)
    raise ValueError(f"Unknown captions file type {extension!r} for {path!r}; valid: .csv, .tsv, "
                     ".txt (comma, tab or | separated), .jsonl.")


def _group_captions(pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """image -> its captions, images in order of first appearance (dicts keep insertion order)."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for image, caption in pairs:
        grouped[image].append(caption)
    return dict(grouped)


def _read_split(path) -> list[str]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Split file not found: {path!r} (expected one image name a line).")
    with open(path, encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip()]


def _drop_missing(image_dir: str, names: list[str], on_missing: str) -> tuple[list[str], list[str]]:
    """Splits names into (present, missing) image files; raises if any are missing and
    on_missing == "error"."""
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {list(ON_MISSING)}, got {on_missing!r}.")
    present, missing = [], []
    for name in names:
        (present if os.path.isfile(os.path.join(image_dir, name)) else missing).append(name)
    if missing and on_missing == "error":
        raise FileNotFoundError(
            f"{len(missing)} of {len(names)} images are missing from {image_dir!r}, e.g. "
            f"{missing[:3]}. Check image_dir, or pass on_missing='skip' to leave them out (they are "
            "then listed in source.missing_images).")
    return present, missing


class _FileCaptionSource:
    """Shared behaviour: records from (file name, captions) held in memory, images read on demand."""

    image_dir: str
    names: list[str]
    captions_by_name: dict[str, list[str]]
    missing_images: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def _record_id(self, name: str) -> str:
        return name

    def __getitem__(self, index: int) -> dict:
        if not -len(self.names) <= index < len(self.names):
            raise IndexError(f"Index {index} out of range for a source of {len(self.names)} records.")
        name = self.names[index]
        with open(os.path.join(self.image_dir, name), "rb") as file:
            image = file.read()
        return {"image": image, "captions": list(self.captions_by_name[name]),
                "id": self._record_id(name)}

    def all_captions(self) -> Iterator[str]:
        """Every caption, without reading any image (for tokenizer training)."""
        for name in self.names:
            yield from self.captions_by_name[name]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.image_dir!r}, {len(self)} images, "
                f"{len(self.missing_images)} missing)")


class CaptionFolderSource(_FileCaptionSource):
    """A folder of images plus a captions table; one record per image with all its captions.

    Fits the Flickr8k/Flickr30k "Kaggle" layout (captions.txt: `image,caption`), TSV and JSONL
    tables. `split_file` (one image name a line) keeps only those images, in that file's order.
    """

    def __init__(self, image_dir, captions_file, split_file=None, on_missing: str = "error"):
        self.image_dir = os.fspath(image_dir)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"Image folder not found: {self.image_dir!r}.")
        self.captions_by_name = _group_captions(read_caption_table(captions_file))
        names = list(self.captions_by_name)
        if split_file is not None:
            names = _read_split(split_file)
            uncaptioned = [name for name in names if name not in self.captions_by_name]
            if uncaptioned:
                raise ValueError(
                    f"{len(uncaptioned)} images in split file {os.fspath(split_file)!r} have no "
                    f"caption in {os.fspath(captions_file)!r}, e.g. {uncaptioned[:3]}; the split "
                    "and the captions file do not belong together.")
        self.names, self.missing_images = _drop_missing(self.image_dir, names, on_missing)
        # Keep only this split's captions: grain pickles the source into every worker.
        self.captions_by_name = {name: self.captions_by_name[name] for name in self.names}


class CocoCaptionsSource(_FileCaptionSource):
    """COCO captions: `annotations_json` as in captions_train2017.json, images in `image_dir`.

    Records follow the JSON's image order; the id is the COCO image id as a string. Images with
    no caption are left out and counted in `num_uncaptioned`.
    """

    def __init__(self, image_dir, annotations_json, on_missing: str = "error"):
        self.image_dir = os.fspath(image_dir)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"Image folder not found: {self.image_dir!r}.")
        path = os.fspath(annotations_json)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"COCO annotations file not found: {path!r}.")
        with open(path, encoding="utf-8") as file:
            coco = json.load(file)
        if "images" not in coco or "annotations" not in coco:
            raise ValueError(f"{path!r} is not COCO captions JSON: it has keys {sorted(coco)}, "
                             "expected 'images' and 'annotations'.")
        captions_by_id: dict[int, list[str]] = defaultdict(list)
        for annotation in coco["annotations"]:
            captions_by_id[annotation["image_id"]].append(annotation["caption"].strip())
        self.captions_by_name, self._id_by_name = {}, {}
        for image in coco["images"]:
            if captions_by_id.get(image["id"]):
                self.captions_by_name[image["file_name"]] = captions_by_id[image["id"]]
                self._id_by_name[image["file_name"]] = str(image["id"])
        self.num_uncaptioned = len(coco["images"]) - len(self.captions_by_name)
        self.names, self.missing_images = _drop_missing(
            self.image_dir, list(self.captions_by_name), on_missing)

    def _record_id(self, name: str) -> str:
        return self._id_by_name[name]


FLICKR8K_SPLITS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt", "all": None}


def flickr8k(path, split: str = "train", on_missing: str = "error") -> CaptionFolderSource:
    """Flickr8k in the Kaggle layout: path/Images/, path/captions.txt, path/Flickr_8k.*Images.txt."""
    if split not in FLICKR8K_SPLITS:
        raise ValueError(f"Unknown Flickr8k split {split!r}; valid splits: {list(FLICKR8K_SPLITS)}.")
    split_name = FLICKR8K_SPLITS[split]
    return CaptionFolderSource(
        os.path.join(path, "Images"), os.path.join(path, "captions.txt"),
        split_file=os.path.join(path, split_name) if split_name else None, on_missing=on_missing)


def coco2017(path, split: str = "train", on_missing: str = "error") -> CocoCaptionsSource:
    """COCO 2017 captions: path/{split}2017/ and path/annotations/captions_{split}2017.json."""
    if split not in ("train", "val"):
        raise ValueError(f"Unknown COCO split {split!r}; valid splits: ['train', 'val'].")
    return CocoCaptionsSource(
        os.path.join(path, f"{split}2017"),
        os.path.join(path, "annotations", f"captions_{split}2017.json"), on_missing=on_missing)
