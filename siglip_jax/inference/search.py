"""Text-to-image search over a folder of images.

    python -m siglip_jax.inference.search index IMAGE_DIR --model MODEL --output index.npz
    python -m siglip_jax.inference.search query index.npz "a dog on a beach" -k 10 [--html results.html]

MODEL is anything `siglip_jax.inference.predictor.load` reads (an exported params file, an HF SigLIP directory, a
big_vision .npz, or a training workdir, whose EMA weights `index --weights ema` takes). The index is an .npz of
image paths, their embeddings [n, embed], the model path and the weights, so `query` reloads the same model.
Results print one per line: rank, match probability, cosine similarity, path; ranking by either is the same.
The probability follows the model's loss (evaluation.scores), and stderr says which: sigmoid(t cos + b) per
image for a sigmoid-trained model, the softmax of t cos over the whole indexed gallery for a softmax one.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import io
import os
import sys
import urllib.parse
import zipfile
from typing import Sequence

import numpy as np

from siglip_jax.config import WEIGHTS
from siglip_jax.data import images as images_lib
from siglip_jax.inference import blockwise, predictor
from siglip_jax.runtime import cli, storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
CHUNK = 256  # images decoded at a time: bounds memory for large folders


@dataclasses.dataclass(frozen=True)
class Index:
    paths: list[str]
    embeddings: np.ndarray  # [n, embed] float32, L2-normalised
    model: str  # what predictor.load reads to embed queries
    weights: str = "raw"  # which weights of a workdir `model` is ("raw" or "ema")


@dataclasses.dataclass(frozen=True)
class Result:
    path: str
    probability: float
    cosine: float


def list_images(image_dir: str) -> list[str]:
    """Image files under `image_dir`, recursively, sorted, by extension (case-insensitive)."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"Image folder {image_dir!r} does not exist.")
    found = []
    for root, _, files in os.walk(image_dir):
        found += [os.path.join(root, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def build_index(embedder: predictor.Predictor, image_dir: str, model: str, weights: str = "raw") -> Index:
    """Embeds every readable image under `image_dir`; unreadable ones are reported on stderr and skipped."""
    paths, embeddings = [], []
    all_paths = list_images(image_dir)
    for start in range(0, len(all_paths), CHUNK):
        chunk_paths, pixels = [], []
        for path in all_paths[start:start + CHUNK]:
            try:
                pixels.append(predictor.load_image(path, embedder.image_options))
                chunk_paths.append(os.path.abspath(path))
            except (images_lib.DecodeError, OSError) as error:
                print(f"skipping {path}: {error}", file=sys.stderr)
        if pixels:
            embeddings.append(embedder.embed_images(pixels))
            paths += chunk_paths
    if not paths:
        raise ValueError(f"No readable images ({', '.join(IMAGE_EXTENSIONS)}) under {image_dir!r}.")
    return Index(paths=paths, embeddings=np.concatenate(embeddings), model=model, weights=weights)


def save_index(path: str, index: Index) -> None:
    """Writes the index to `path`: a local file, or an object in a gs:// or s3:// bucket."""
    buffer = io.BytesIO()  # a file object, so numpy does not append ".npz" to the name
    np.savez(buffer, paths=np.array(index.paths), embeddings=index.embeddings, model=np.array(index.model),
             weights=np.array(index.weights))
    location = storage.path(path)
    storage.with_retries(lambda: location.write_bytes(buffer.getvalue()), f"Writing {path}")


def load_index(path: str) -> Index:
    """Reads an index written by save_index (a local file or a bucket object)."""
    location = storage.path(path)
    if not location.is_file():
        raise FileNotFoundError(f"No search index at {path!r}; write one with `python -m siglip_jax.inference.search index "
                                "IMAGE_DIR --model MODEL --output INDEX`.")
    try:
        with np.load(io.BytesIO(storage.with_retries(location.read_bytes, f"Reading {path}")), allow_pickle=False) as data:
            index = Index(paths=[str(p) for p in data["paths"]], embeddings=data["embeddings"], model=str(data["model"]),
                          weights=str(data["weights"]) if "weights" in data else "raw")  # older indexes: raw
    except (ValueError, KeyError, OSError, EOFError, AttributeError, zipfile.BadZipFile) as error:
        # numpy's own message talks of pickles; the user only needs to know which file is not an index.
        raise ValueError(f"{path!r} is not a search index written by `search index` ({type(error).__name__}: "
                         f"{error}); build one with `python -m siglip_jax.inference.search index IMAGE_DIR --model MODEL "
                         "--output INDEX`.") from error
    if index.embeddings.ndim != 2 or index.embeddings.shape[0] != len(index.paths):
        raise ValueError(f"{path!r} is not a search index written by `search index`: {len(index.paths)} paths but "
                         f"embeddings of shape {index.embeddings.shape}; rebuild it.")
    return index


def positive_int(text: str) -> int:
    """argparse type for -k: a whole number >= 1 (a negative k would slice off the end of the ranking)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (how many results to print), got {value}")
    return value


def query_index(index: Index, embedder: predictor.Predictor, text: str, k: int = 10) -> list[Result]:
    """The k images most likely to match `text`, best first."""
    if not text.strip():
        raise ValueError("The query text is empty; pass what to look for, e.g. \"a dog on a beach\".")
    if k < 1:
        raise ValueError(f"k must be >= 1 (how many results), got {k}.")
    text_embedding = embedder.embed_texts([text])
    # Embeddings are L2-normalised, so the dot product is the cosine.
    cosines, best = blockwise.top_k_search(text_embedding, index.embeddings, k=min(k, len(index.paths)), normalize=False)
    cosines, best = cosines[0], best[0]
    # A softmax model normalises over the whole gallery, so score all of it, then pick.
    probabilities = embedder.probabilities(index.embeddings, text_embedding, over="images")[best, 0]
    return [Result(index.paths[i], float(p), float(c)) for i, p, c in zip(best, probabilities, cosines)]


def write_html(path: str, text: str, results: Sequence[Result], probability: str = "") -> None:
    """A page with the query, what its probabilities are, and a grid of the images found (linked relative
    to the page)."""
    page_dir = os.path.dirname(os.path.abspath(path))
    cells = []
    for rank, result in enumerate(results, 1):
        source = urllib.parse.quote(os.path.relpath(result.path, page_dir).replace(os.sep, "/"))
        cells.append(
            f'<figure><img src="{source}" alt="{html.escape(os.path.basename(result.path))}">'
            f"<figcaption>{rank}. p={result.probability:.4f} cos={result.cosine:.4f}<br>"
            f"{html.escape(os.path.basename(result.path))}</figcaption></figure>"
        )
    with open(path, "w", encoding="utf-8") as file:
        file.write(
            "<!doctype html><meta charset='utf-8'>"
            f"<title>{html.escape(text)}</title>"
            "<style>body{font-family:sans-serif}figure{display:inline-block;margin:8px;width:224px}"
            "img{width:224px;height:224px;object-fit:cover}</style>"
            f"<h1>{html.escape(text)}</h1>\n<p>p: {html.escape(probability)}</p>\n" + "\n".join(cells) + "\n"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m siglip_jax.inference.search", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    index_parser = commands.add_parser("index", help="embed a folder of images")
    index_parser.add_argument("image_dir")
    index_parser.add_argument("--model", required=True, help="exported params file, HF directory or .npz")
    index_parser.add_argument("--output", required=True, help="index file to write (.npz)")
    index_parser.add_argument("--batch_size", type=int, default=32)
    index_parser.add_argument("--weights", choices=WEIGHTS, default="raw",
                              help="a workdir's trained parameters (raw) or their moving average (ema)")
    query_parser = commands.add_parser("query", help="find the images matching a text")
    query_parser.add_argument("index")
    query_parser.add_argument("text")
    query_parser.add_argument("-k", type=positive_int, default=10, help="how many results (>= 1)")
    query_parser.add_argument("--model", default=None, help="defaults to the model the index was built with")
    query_parser.add_argument("--html", default=None, help="also write a page showing the images found")
    args = parser.parse_args(argv)

    if args.command == "index":
        embedder = predictor.load(args.model, batch_size=args.batch_size, weights=args.weights)
        index = build_index(embedder, args.image_dir, os.path.abspath(args.model), args.weights)
        save_index(args.output, index)
        print(f"indexed {len(index.paths)} images into {args.output}")
        return
    if not args.text.strip():
        query_parser.error("the query text is empty; pass what to look for, e.g. \"a dog on a beach\"")
    index = load_index(args.index)
    embedder = predictor.load(args.model or index.model, weights="raw" if args.model else index.weights)
    results = query_index(index, embedder, args.text, args.k)
    description = embedder.score_description(over="images")
    print(f"probability: {description}", file=sys.stderr)
    for rank, result in enumerate(results, 1):
        print(f"{rank}\t{result.probability:.4f}\t{result.cosine:.4f}\t{result.path}")
    if args.html:
        write_html(args.html, args.text, results, description)


if __name__ == "__main__":
    cli.run(main)
