"""Sources over image files on disk with captions in a table (CSV/TSV/JSONL) or COCO JSON.

Every source is a grain random-access data source: `len(source)` and `source[index]` ->
{"image": encoded bytes, "captions": list[str], "id": str}. Images are read as bytes only; the
pipeline decodes them, so a corrupt file costs one skipped example, not the run. Sources hold
plain Python data (no open files), so grain can pickle them into worker processes.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from typing import Iterator, Sequence

from siglip_jax.data.sources import caption_tables

logger = logging.getLogger(__name__)

ON_MISSING = ("error", "skip")


def read_caption_table(path, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """(image name, caption) pairs from a delimited table (.csv/.tsv/.txt; comma, tab or "|";
    with a header naming the image and caption columns, or headerless "image<TAB>caption") or
    .jsonl ({"image": ..., "caption": str} or {"captions": [...]}). Unusable rows are skipped and
    logged by file and line (see caption_tables.read_caption_rows for the list)."""
    return caption_tables.read_caption_rows(path, encoding)[0]


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
    if missing:
        logger.warning("Left out %d of %d images missing from %r (on_missing='skip'; all are listed in "
                       "source.missing_images), e.g. %s", len(missing), len(names), image_dir, missing[:5])
    return present, missing


class _FileCaptionSource:
    """Shared behaviour: records from (file name, captions) held in memory, images read on demand."""

    image_dir: str
    names: list[str]
    captions_by_name: dict[str, list[str]]
    missing_images: list[str]
    skipped_rows: list[str]  # "file line N: why" of each table row or annotation that gave no caption

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

    def __init__(self, image_dir, captions_file, split_file=None, on_missing: str = "error",
                 encoding: str = "utf-8"):
        self.image_dir = os.fspath(image_dir)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"Image folder not found: {self.image_dir!r}.")
        pairs, self.skipped_rows = caption_tables.read_caption_rows(captions_file, encoding)
        self.captions_by_name = _group_captions(pairs)
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

    def __init__(self, image_dir, annotations_json, on_missing: str = "error", encoding: str = "utf-8"):
        self.image_dir = os.fspath(image_dir)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"Image folder not found: {self.image_dir!r}.")
        path = os.fspath(annotations_json)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"COCO annotations file not found: {path!r}.")
        try:
            coco = json.loads(caption_tables.read_text(path, encoding))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path!r} line {error.lineno} column {error.colno} is not valid JSON: {error.msg}. "
                             "Re-download the annotations file; it is probably truncated.") from error
        if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
            raise ValueError(f"{path!r} is not COCO captions JSON: it has keys "
                             f"{sorted(coco) if isinstance(coco, dict) else type(coco).__name__}, "
                             "expected 'images' and 'annotations'.")
        self.skipped_rows = []
        captions_by_id: dict = defaultdict(list)
        for position, annotation in enumerate(coco["annotations"]):
            caption = annotation.get("caption") if isinstance(annotation, dict) else None
            if not isinstance(caption, str) or "image_id" not in annotation:
                self.skipped_rows.append(f"{path}: annotations[{position}]: needs 'image_id' and a string "
                                         f"'caption', got {json.dumps(annotation)[:100]}")
                continue
            captions_by_id[annotation["image_id"]].append(caption.strip())
        self.captions_by_name, self._id_by_name = {}, {}
        self.num_uncaptioned = 0
        for position, image in enumerate(coco["images"]):
            if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
                self.skipped_rows.append(f"{path}: images[{position}]: needs 'id' and a string 'file_name', got "
                                         f"{json.dumps(image)[:100]}")
                continue
            if not captions_by_id.get(image["id"]):
                self.num_uncaptioned += 1
            else:
                # Several ids naming one file (merged annotation sets) pool their captions; the record
                # keeps the first id.
                self.captions_by_name.setdefault(image["file_name"], []).extend(captions_by_id[image["id"]])
                self._id_by_name.setdefault(image["file_name"], str(image["id"]))
        caption_tables.report_skipped(path, self.skipped_rows, len(self.captions_by_name), "entries")
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


KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",), "all": ("train", "restval", "val", "test")}


class KarpathySplitSource(_FileCaptionSource):
    """COCO (or Flickr) images selected and captioned by Karpathy's split file (dataset_coco.json), the
    standard retrieval protocol: split "test" is the 5,000 test images with 25,010 captions; "train" the
    113,287 of train + restval.

    Images are found under `image_dir` as the file says (`<filepath>/<filename>`, the 2014 folders) or,
    for COCO 2017 folders, as `{train,val}2017/<cocoid as 12 digits>.jpg`.
    """

    def __init__(self, image_dir, karpathy_json, split: str = "test", on_missing: str = "error",
                 encoding: str = "utf-8"):
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"Unknown Karpathy split {split!r}; valid splits: {list(KARPATHY_SPLITS)}.")
        self.image_dir = os.fspath(image_dir)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"Image folder not found: {self.image_dir!r}.")
        path = os.fspath(karpathy_json)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Karpathy split file not found: {path!r} (dataset_coco.json of Karpathy's "
                                    "caption_datasets).")
        try:
            entries = json.loads(caption_tables.read_text(path, encoding)).get("images")
        except (json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"{path!r} is not a Karpathy split file (JSON with an 'images' list): {error}.") from error
        if not isinstance(entries, list):
            raise ValueError(f"{path!r} is not a Karpathy split file: it has no 'images' list.")
        self.skipped_rows, self.captions_by_name, self._id_by_name = [], {}, {}
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("split") not in KARPATHY_SPLITS[split]:
                continue
            captions = [sentence.get("raw", "").strip() for sentence in entry.get("sentences", ())
                        if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str)]
            name = self._image_name(entry)
            if not captions or name is None:
                self.skipped_rows.append(f"{path}: images[{position}]: needs 'filename' and 'sentences' with 'raw' "
                                         f"captions, got {json.dumps(entry)[:100]}")
                continue
            self.captions_by_name[name] = captions
            self._id_by_name[name] = str(entry.get("cocoid", entry.get("imgid", name)))
        caption_tables.report_skipped(path, self.skipped_rows, len(self.captions_by_name), "entries")
        if not self.captions_by_name:
            raise ValueError(f"{path!r} has no usable image in split {split!r}.")
        self.names, self.missing_images = _drop_missing(self.image_dir, list(self.captions_by_name), on_missing)

    def _image_name(self, entry: dict) -> str | None:
        if not isinstance(entry.get("filename"), str):
            return None
        as_written = os.path.join(entry.get("filepath", ""), entry["filename"])
        if "cocoid" in entry and not os.path.isfile(os.path.join(self.image_dir, as_written)):
            for folder in ("val2017", "train2017"):  # the 2017 release renamed the files by id
                renamed = os.path.join(folder, f"{int(entry['cocoid']):012d}.jpg")
                if os.path.isfile(os.path.join(self.image_dir, renamed)):
                    return renamed
        return as_written

    def _record_id(self, name: str) -> str:
        return self._id_by_name[name]
