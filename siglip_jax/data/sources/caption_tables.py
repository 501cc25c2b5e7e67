"""Reading caption tables (CSV/TSV/"|"-separated or JSONL) into (image, caption) pairs.

A row that cannot give a pair (too few fields, a caption that is not text, a line that is not JSON) is
skipped, counted and named by file and line, so one bad row never costs the run and never vanishes
silently. What cannot be skipped safely (a file that is not in the encoding asked for, a quote that is
never closed and would swallow the rows after it) stops with an error naming the file and line.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from typing import Any, Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "file", "path")
CAPTION_COLUMNS = ("caption", "captions", "comment", "text")
# What the first field of a headerless table's rows looks like: an image file name (Flickr8k.token.txt's
# "1000268201_693b08cb0e.jpg#0").
IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_NAMED = 5  # skipped rows named in the log line; all of them are kept on the source


def read_text(path: str, encoding: str = "utf-8") -> str:
    """The file's text; a UTF-8 byte-order mark is dropped (Excel writes one, and it would otherwise
    stick to the first column's name). Bytes that are not `encoding` raise an error naming the line."""
    with open(path, "rb") as file:
        raw = file.read()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ValueError(
            f"{path!r} line {line} is not valid {encoding} (byte {raw[error.start:error.start + 1]!r} at offset "
            f"{error.start}). Re-save the file as UTF-8, or pass the file's encoding to the source, e.g. "
            "encoding='latin-1' (--config.data.train.args.encoding=latin-1).") from error
    except LookupError as error:
        raise ValueError(f"Unknown encoding {encoding!r} for {path!r}; use a Python codec name such as "
                         "'utf-8', 'latin-1' or 'cp1252'.") from error


def report_skipped(path: str, skipped: Sequence[str], usable: int, what: str = "rows") -> None:
    """One warning naming how many `what` of `path` were skipped and the first few; raises when nothing
    usable is left, since an empty data set is never what was meant."""
    if not skipped:
        return
    named = "; ".join(skipped[:MAX_NAMED]) + ("; ..." if len(skipped) > MAX_NAMED else "")
    if not usable:
        raise ValueError(f"{path!r} has no usable {what}: all {len(skipped)} were skipped: {named}.")
    logger.warning("Skipped %d unusable %s of %r (listed in the source's skipped_rows): %s", len(skipped), what,
                   path, named)


def _pick_column(header: Sequence[str], names: Sequence[str], path: str, what: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise ValueError(f"{path!r} has columns {list(header)} but no {what} column; name it one of "
                     f"{list(names)}.")


def _records(path: str, text: str, delimiter: str):
    """(first line, last line, row) of each CSV record, by physical line numbers of the file."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    first_line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise ValueError(f"{path!r} line {first_line}: {error}. A quote (\") opened on this line is probably "
                             "never closed; close it, or double it (\"\") inside a quoted caption.") from error
        last_line = reader.line_num
        # A record spanning lines means a quote opened on `first_line` and closed far later (or never):
        # every row in between would silently become part of one caption.
        if last_line > first_line and any("\n" in cell or "\r" in cell for cell in row):
            raise ValueError(
                f"{path!r} line {first_line}: a quoted field runs over lines {first_line}-{last_line}, so those "
                f"{last_line - first_line + 1} lines would become one caption. Close the quote (\") on line "
                f"{first_line}, or double it (\"\") inside a quoted caption.")
        yield first_line, last_line, row
        first_line = last_line + 1


def read_delimited(path: str, text: str, skipped: list[str]) -> list[tuple[str, str]]:
    """(image, caption) rows of a CSV/TSV. With a header naming the columns, those are used; a
    headerless TSV is read as Flickr8k.token.txt: "name.jpg#3<TAB>caption". Rows that cannot give a
    pair are appended to `skipped` as "path line N: why"."""
    first_text_line = text.split("\n", 1)[0]
    # Captions themselves contain commas, so a tab or "|" in the first line wins:
    # Flickr8k.token.txt is tab-separated, Flickr30k's Kaggle results.csv uses "|",
    # Flickr8k's Kaggle captions.txt (despite its name) is a comma CSV.
    delimiter = next((d for d in "\t|" if d in first_text_line), ",")
    records = _records(path, text, delimiter)
    first = next(records, None)
    if first is None:
        return []
    header = [cell.strip().lower() for cell in first[2]]
    headerless = not any(name in header for name in IMAGE_COLUMNS + CAPTION_COLUMNS)
    if headerless:
        image_column, caption_column = 0, len(header) - 1
        if not first[2][0].strip().split("#")[0].lower().endswith(IMAGE_FILE_EXTENSIONS):
            raise ValueError(
                f"{path} line {first[0]}: {first[2]!r} is neither a header naming an image column (one of "
                f"{', '.join(IMAGE_COLUMNS)}) and a caption column (one of {', '.join(CAPTION_COLUMNS)}) nor a row "
                "that starts with an image file name. Put a header such as 'image,caption' on the first line.")
        body = [first, *records]
    else:
        image_column = _pick_column(header, IMAGE_COLUMNS, path, "image")
        caption_column = _pick_column(header, CAPTION_COLUMNS, path, "caption")
        body = records
    needed = max(image_column, caption_column) + 1
    pairs = []
    for line, _, row in body:
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < needed:
            skipped.append(f"{path} line {line}: {len(row)} fields, expected at least {needed}: {row!r}"[:300])
            continue
        image = row[image_column].strip()
        if headerless:
            image = image.split("#")[0]  # Flickr8k.token.txt numbers captions "name.jpg#0".
        if not image:
            skipped.append(f"{path} line {line}: empty image name")
            continue
        pairs.append((image, row[caption_column].strip()))
    return pairs


def _jsonl_pairs(entry) -> list[tuple[str, str]] | str:
    """The pairs of one JSONL entry, or why it has none."""
    if not isinstance(entry, dict) or "image" not in entry or not ({"caption", "captions"} & set(entry)):
        return "not a JSON object with 'image' and 'caption' (a string) or 'captions' (a list of strings)"
    image = entry["image"]
    if not isinstance(image, str) or not image.strip():
        return f"'image' must be a non-empty string, got {image!r}"
    key = "captions" if "captions" in entry else "caption"
    captions = entry[key]
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
        return f"{key!r} must be a string or a list of strings, got {json.dumps(captions)[:100]}"
    return [(image, caption) for caption in captions]


def json_lines(path: str, lines: Iterable[str], skipped: list[str]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; a line that is not JSON is named
    in `skipped` ("path line N: not JSON ...") and passed over, so the rest are still read."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            skipped.append(f"{path} line {line_number}: not JSON ({error}): {line.strip()[:100]!r}")
            continue
        yield line_number, entry


def read_jsonl(path: str, text: str, skipped: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for line_number, entry in json_lines(path, text.splitlines(), skipped):
        found = _jsonl_pairs(entry)
        if isinstance(found, str):
            skipped.append(f"{path} line {line_number}: {found}")
        else:
            pairs += found
    return pairs


def read_caption_rows(path, encoding: str = "utf-8") -> tuple[list[tuple[str, str]], list[str]]:
    """((image name, caption) pairs, skipped rows as "path line N: why") of a caption table."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Captions file not found: {path!r}.")
    extension = os.path.splitext(path)[1].lower()
    readers = {".jsonl": read_jsonl, ".json": read_jsonl, ".csv": read_delimited, ".tsv": read_delimited,
               ".txt": read_delimited}
    if extension not in readers:
        raise ValueError(f"Unknown captions file type {extension!r} for {path!r}; valid: .csv, .tsv, "
                         ".txt (comma, tab or | separated), .jsonl.")
    skipped: list[str] = []
    pairs = readers[extension](path, read_text(path, encoding), skipped)
    report_skipped(path, skipped, len(pairs))
    if not pairs:
        raise ValueError(f"Captions file {path!r} has no (image, caption) rows"
                         + (f": all {len(skipped)} were skipped, e.g. {skipped[0]}" if skipped else " (it is empty)")
                         + ".")
    return pairs, skipped
