"""The command-line flags that pick a data source, shared by the tools."""
from __future__ import annotations

import argparse

from siglip_jax.data import sources


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=sources.SOURCE_KINDS,
                        help="source kind (see siglip_jax/data/sources/__init__.py)")
    parser.add_argument("--path", help="shorthand for --arg path=PATH (flickr8k, coco2017)")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a source argument, repeatable: --arg split=test "
                             "--arg captions_file=captions.csv")


def source_from_flags(args: argparse.Namespace):
    kwargs = sources.parse_source_args(args.arg)
    if args.path is not None:
        kwargs["path"] = args.path
    return sources.make_source(args.source, **kwargs)
