"""Trains a SentencePiece tokenizer on the captions of any data source.

    python -m tools.train_tokenizer --source flickr8k --path ../shared/data/flickr8k \
        --vocab_size 8000 --output tok.model

The model follows T5/c4_en id conventions (pad 0, EOS 1, unknown 2, no BOS), so
SentencePieceTokenizer treats it exactly like big_vision's SigLIP vocabulary.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Iterable, Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from siglip_jax.runtime import cli  # noqa: E402
from siglip_jax.data import sources  # noqa: E402
from tools.source_flags import add_source_flags, source_from_flags  # noqa: E402


def train_sentencepiece(captions: Iterable[str], output_path, vocab_size: int, *,
                        lowercase: bool = False, model_type: str = "unigram",
                        character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                        hard_vocab_limit: bool = True, seed: int = 0) -> int:
    """Trains on `captions`, writes the model to `output_path`; returns how many captions it saw.

    lowercase must match the tokenizer's `lowercase` at training time of the model that uses it.
    Up to `max_sentences` captions, sampled at random, enter training (SentencePiece holds them in
    memory). hard_vocab_limit=False lets a small corpus yield fewer than vocab_size pieces
    instead of failing.
    """
    import sentencepiece

    counted = {"captions": 0}

    def lines() -> Iterator[str]:
        for caption in captions:
            caption = " ".join(caption.split())  # SentencePiece reads one sentence per line.
            if caption:
                counted["captions"] += 1
                yield caption.lower() if lowercase else caption

    sentencepiece.set_random_generator_seed(seed)  # the sentence sample, hence the model
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            hard_vocab_limit=hard_vocab_limit, num_threads=min(4, os.cpu_count() or 1),
            minloglevel=2)
    except RuntimeError as error:
        raise RuntimeError(f"SentencePiece training failed: {str(error).rstrip('.')}. If the "
                           f"vocabulary is too large for this corpus, lower vocab_size (was "
                           f"{vocab_size}) or pass hard_vocab_limit=False (--soft_vocab_limit).") from error
    if counted["captions"] == 0:
        raise ValueError("The source has no non-empty captions to train on.")
    with open(output_path, "wb") as file:
        file.write(model.getvalue())
    return counted["captions"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_flags(parser)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--output", required=True, help="where to write the .model file")
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
