"""Trains a SentencePiece tokenizer on the captions of any data source.

    python -m tools.train_tokenizer --source flickr8k --path ../shared/data/flickr8k \
        --vocab_size 8000 --output tok.model

The model follows T5/c4_en id conventions (pad 0, EOS 1, unknown 2, no BOS), so
SentencePieceTokenizer treats it exactly like big_vision's SigLIP vocabulary.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from siglip_jax.runtime import cli  # noqa: E402
from siglip_jax.data import sources  # noqa: E402
from siglip_jax.data.tokenizers import train_sentencepiece  # noqa: E402
from tools.source_flags import add_source_flags, source_from_flags  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_flags(parser)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--output", required=True, help="where to write the .model file (folders are created)")
    parser.add_argument("--lowercase", action="store_true",
                        help="lowercase captions (then use the tokenizer with lowercase=True)")
    parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
    parser.add_argument("--character_coverage", type=float, default=0.9995)
    parser.add_argument("--max_sentences", type=int, default=2_000_000)
    parser.add_argument("--soft_vocab_limit", action="store_true",
                        help="allow fewer pieces than --vocab_size on a small corpus")
    args = parser.parse_args(argv)
    source = source_from_flags(args)
    count = train_sentencepiece(sources.iter_captions(source), args.output, args.vocab_size,
                                lowercase=args.lowercase, model_type=args.model_type,
                                character_coverage=args.character_coverage,
                                max_sentences=args.max_sentences,
                                hard_vocab_limit=not args.soft_vocab_limit)
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=args.output).get_piece_size()
    print(f"Trained a {pieces}-piece {args.model_type} model on {count} captions of "
          f"{source!r}; wrote {args.output}.")


if __name__ == "__main__":
    cli.run(main)
