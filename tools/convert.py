"""Converts any data source into ArrayRecord shards or WebDataset tars, with a progress bar.

    python -m tools.convert --source flickr8k --path ../shared/data/flickr8k --arg split=train \
        --output_dir /data/flickr8k_ar --name train --num_shards 8

Images are copied byte for byte (no re-encoding, no quality loss); only arrays and formats the
WebDataset reader does not know (GIF, BMP) are stored as lossless PNG. With validation on (the
default) each image is decoded once: unreadable ones are skipped, counted and listed with the
reason in NAME.manifest.json, so nothing disappears silently. Shards appear under their final
name only when complete.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import tarfile
from typing import Callable, Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from siglip_jax.runtime import cli  # noqa: E402
from siglip_jax.data import images  # noqa: E402
from siglip_jax.data.sources import encode_record  # noqa: E402
from tools.source_flags import add_source_flags, source_from_flags  # noqa: E402

FORMATS = ("arrayrecord", "webdataset")
_WEBDATASET_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def shard_ranges(num_records: int, num_shards: int) -> list[range]:
    """Contiguous, near-equal record ranges, one per shard (sizes differ by at most one)."""
    return [range(num_records * shard // num_shards, num_records * (shard + 1) // num_shards)
            for shard in range(num_shards)]


def shard_path(output_dir: str, name: str, shard: int, num_shards: int, format: str) -> str:
    extension = "array_record" if format == "arrayrecord" else "tar"
    if not name and format == "webdataset":  # img2dataset's layout: 00000.tar, 00001.tar, ...
        return os.path.join(output_dir, f"{shard:05d}.tar")
    return os.path.join(output_dir, f"{name}-{shard:05d}-of-{num_shards:05d}.{extension}")


def _write_arrayrecord(path: str, records: Iterator[dict]) -> int:
    from array_record.python.array_record_module import ArrayRecordWriter

    # group_size:1 makes every record its own chunk: the fastest random access, which is what
    # grain's global shuffle does; images are already compressed, so chunking would gain little.
    writer = ArrayRecordWriter(path, "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(encode_record(record))
            count += 1
    finally:
        writer.close()
    return count


def _webdataset_image(image) -> tuple[bytes, str]:
    """(bytes, extension) for a tar member; re-encodes only what the reader cannot take as is."""
    if not isinstance(image, (bytes, bytearray)):
        return images.encode_image(images.decode_image(image), "png"), "png"
    extension = _WEBDATASET_EXTENSIONS.get(images.image_format(image))
    if extension is None:
        return images.encode_image(images.decode_image(image), "png"), "png"
    return bytes(image), extension


def _write_webdataset(path: str, records: Iterator[dict]) -> int:
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for record in records:
            key = f"{record['position']:09d}"  # dot-free and sortable, unlike arbitrary ids
            image, extension = _webdataset_image(record["image"])
            metadata = {"id": record["id"], "caption": record["captions"][0],
                        "captions": record["captions"]}
            for member_name, payload in (
                    (f"{key}.{extension}", image),
                    (f"{key}.txt", record["captions"][0].encode("utf-8")),
                    (f"{key}.json", json.dumps(metadata, ensure_ascii=False).encode("utf-8"))):
                info = tarfile.TarInfo(member_name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644  # reproducible shards
                archive.addfile(info, io.BytesIO(payload))
            count += 1
    return count


_WRITERS: dict[str, Callable[[str, Iterator[dict]], int]] = {
    "arrayrecord": _write_arrayrecord, "webdataset": _write_webdataset}


def records_for_shard_size(source, shard_size_mb: float, sample: int = 64) -> int:
    """Records per shard for shards of about `shard_size_mb`, from the mean size of the first images
    (plus ~2 KB of tar headers, caption and json per record)."""
    sizes = []
    for index in range(min(sample, len(source))):
        image = source[index]["image"]
        sizes.append((len(image) if isinstance(image, (bytes, bytearray)) else getattr(image, "nbytes", 0)) + 2048)
    return max(1, int(shard_size_mb * 1e6 / max(1.0, sum(sizes) / max(1, len(sizes)))))


def earlier_output(output_dir: str, name: str, format: str) -> list[str]:
    """Files in output_dir that a conversion of this name and format writes: shards of any count, their
    manifest, half-written shards. Other names' shards (train beside test) are not included."""
    if not os.path.isdir(output_dir):
        return []
    any_shard = os.path.basename(shard_path("", name, 0, 1, format))  # name-00000-of-00001.ext or 00000.tar
    shard = re.compile(re.escape(any_shard).replace("00000", r"\d{5}").replace("00001", r"\d{5}") + r"(\.partial)?")
    manifest = f"{name or 'shards'}.manifest.json"
    return sorted(entry for entry in os.listdir(output_dir) if shard.fullmatch(entry) or entry == manifest)


def convert(source, output_dir, *, format: str = "arrayrecord", name: str = "data",
            num_shards: int | None = None, records_per_shard: int = 10_000, shard_size_mb: float = 0.0,
            validate: bool = True, progress: bool = True, overwrite: bool = False) -> dict:
    """Writes every readable record of `source` into shards; returns (and saves as
    output_dir/NAME.manifest.json) the counts, the shard paths and the skipped records.

    Shards of the same name already in output_dir are refused (a glob would mix stale ones in); with
    `overwrite` they are deleted first."""
    from tqdm import tqdm

    if format not in _WRITERS:
        raise ValueError(f"Unknown output format {format!r}; valid formats: {list(FORMATS)}.")
    num_records = len(source)
    if num_shards is None and shard_size_mb > 0:
        records_per_shard = records_for_shard_size(source, shard_size_mb)
    if num_shards is None:
        num_shards = max(1, math.ceil(num_records / records_per_shard))
    if not 1 <= num_shards:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}.")
    output_dir = os.fspath(output_dir)
    earlier = earlier_output(output_dir, name, format)
    if earlier and not overwrite:
        shown = ", ".join(earlier[:4]) + (f", ... ({len(earlier)} files)" if len(earlier) > 4 else "")
        raise FileExistsError(f"{output_dir} already holds {format} output named {name!r} ({shown}); a glob over "
                              "it would mix stale shards in. Pass --overwrite to replace them, or choose another "
                              "--output_dir or --name.")
    for entry in earlier:
        os.remove(os.path.join(output_dir, entry))
    os.makedirs(output_dir, exist_ok=True)
    skipped: list[dict] = []
    bar = tqdm(total=num_records, desc=f"{name} -> {format}", unit="rec", disable=not progress)

    def readable(indices: range) -> Iterator[dict]:
        for index in indices:
            bar.update(1)
            try:
                record = source[index]
                if validate:
                    images.decode_image(record["image"])
            except (images.DecodeError, OSError, ValueError) as error:
                skipped.append({"index": index, "reason": f"{type(error).__name__}: {error}"})
                bar.set_postfix(skipped=len(skipped))
                continue
            yield {**record, "position": index}

    shards, written = [], 0
    for shard, indices in enumerate(shard_ranges(num_records, num_shards)):
        path = shard_path(output_dir, name, shard, num_shards, format)
        partial = path + ".partial"
        written += _WRITERS[format](partial, readable(indices))
        os.replace(partial, path)
        shards.append(path)
    bar.close()
    manifest = {"source": repr(source), "format": format, "records_in_source": num_records,
                "records_written": written, "records_skipped": len(skipped),
                "shards": [os.path.basename(path) for path in shards], "skipped": skipped}
    if not name and format == "webdataset":
        manifest["pattern"] = os.path.join(output_dir, f"{{00000..{num_shards - 1:05d}}}.tar")  # for webdataset_stream
    with open(os.path.join(output_dir, f"{name or 'shards'}.manifest.json"), "w") as file:
        json.dump(manifest, file, indent=1)
    return manifest


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_flags(parser)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--format", default="arrayrecord", choices=FORMATS)
    parser.add_argument("--name", default="data", help="shard file prefix, e.g. train; '' with "
                        "--format webdataset: img2dataset's 00000.tar, 00001.tar, ... for webdataset_stream")
    parser.add_argument("--num_shards", type=int, default=None,
                        help="default: ceil(records / --records_per_shard)")
    parser.add_argument("--records_per_shard", type=int, default=10_000)
    parser.add_argument("--shard_size_mb", type=float, default=0.0,
                        help="target shard size; sets records per shard from the first images (img2dataset uses ~256)")
    parser.add_argument("--no_validate", action="store_true",
                        help="copy images without decoding them once (faster, keeps bad files)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards of the same --name already in --output_dir (refused otherwise)")
    args = parser.parse_args(argv)
    manifest = convert(source_from_flags(args), args.output_dir, format=args.format,
                       name=args.name, num_shards=args.num_shards,
                       records_per_shard=args.records_per_shard, shard_size_mb=args.shard_size_mb,
                       validate=not args.no_validate, overwrite=args.overwrite)
    print(f"Wrote {manifest['records_written']} records in {len(manifest['shards'])} shards to "
          f"{args.output_dir}; skipped {manifest['records_skipped']} (see "
          f"{args.name or 'shards'}.manifest.json)." + (f" Pattern: {manifest['pattern']}" if "pattern" in manifest else ""))
    return manifest


if __name__ == "__main__":
    cli.run(main)
