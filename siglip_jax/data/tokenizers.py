"""Text tokenizers with SigLIP's conventions: fixed length, EOS appended ("sticky", kept when the
caption is truncated) and padding with the pad id (SigLIP pads with EOS, id 1)."""
from __future__ import annotations

import io
import os
from typing import Iterable, Iterator, Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens: needs no assets, so the demo and tests run anywhere.

    Ids: 0 unused, 1 end-of-sequence (also the pad id, as in SigLIP), 2 unknown, 3 + byte value.
    """

    offset = 3
    pad_id = 1
    eos_id = 1

    def __init__(self, max_len: int = 64, lowercase: bool = False):
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (one token and EOS), got {max_len}.")
        self.max_len = max_len
        self.lowercase = lowercase

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        return [byte + self.offset for byte in text.encode("utf-8")]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids [len(texts), max_len], int32: truncated to max_len-1 tokens, then EOS, then pad."""
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: self.max_len - 1] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")


def _pad_and_truncate(token_lists: Sequence[list[int]], max_len: int, eos_id: int,
                      pad_id: int) -> np.ndarray:
    """[len(token_lists), max_len] int32: each list cut to max_len-1, then EOS, then pad.

    The EOS is "sticky" as in big_vision's SigLIP tokenizer: it survives truncation, so the text
    tower always sees where the caption ends.
    """
    out = np.full((len(token_lists), max_len), pad_id, dtype=np.int32)
    for row, ids in enumerate(token_lists):
        ids = list(ids[: max_len - 1]) + [eos_id]
        out[row, : len(ids)] = ids
    return out


def _check_max_len(max_len: int) -> None:
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one token and EOS), got {max_len}.")


def _existing_file(path, what: str, fix: str) -> str:
    path = os.fspath(path) if path is not None else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path!r}. {fix}")
    return path


class SentencePieceTokenizer:
    """A SentencePiece model (e.g. big_vision's c4_en, or one from tools/train_tokenizer.py).

    EOS and pad ids are read from the model. By default padding uses the EOS id, as SigLIP does
    (with c4_en/T5 vocabularies that is id 1, while the model's own pad id is 0); pad_with="pad"
    uses the model's pad id instead, as CLIP-style text towers expect.
    """

    def __init__(self, model_path, max_len: int = 64, lowercase: bool = False,
                 pad_with: str = "eos"):
        import sentencepiece

        _check_max_len(max_len)
        path = _existing_file(model_path, "SentencePiece model",
                              "Train one with tools/train_tokenizer.py or point to e.g. c4_en.model.")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=path)
        self.model_path = path
        self.max_len = max_len
        self.lowercase = lowercase
        self.eos_id = int(self.processor.eos_id())
        if self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {path!r} has no EOS piece (eos_id=-1), but SigLIP-style "
                "tokenization appends EOS. Retrain it with eos_id set (tools/train_tokenizer.py "
                "does), or use a model that has one.")
        if pad_with == "eos":
            self.pad_id = self.eos_id
        elif pad_with == "pad":
            self.pad_id = int(self.processor.pad_id())
            if self.pad_id < 0:
                raise ValueError(f"SentencePiece model {path!r} has no pad piece; use pad_with='eos'.")
        else:
            raise ValueError(f"pad_with must be 'eos' (SigLIP) or 'pad' (the model's pad id), "
                             f"got {pad_with!r}.")

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        return self.processor.encode(text, out_type=int)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids [len(texts), max_len], int32: truncated to max_len-1 tokens, then EOS, then pad."""
        # One string at a time: SentencePiece's list call starts its thread pool on every call, 20x the cost of
        # encoding one caption (0.1 ms against 0.005 ms measured), and the pipeline tokenizes one caption per example.
        token_lists = [self.encode(text) for text in texts]
        return _pad_and_truncate(token_lists, self.max_len, self.eos_id, self.pad_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first EOS."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.processor.decode([i for i in ids if i != self.pad_id])


# Names under which common tokenizer.json files spell end-of-sequence, most specific first.
_EOS_TOKEN_NAMES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|end_of_text|>")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (BPE, WordPiece, Unigram, ...).

    Special tokens from the file's post-processor (CLS, BOS, ...) are not added; we append EOS
    ourselves so every kind of vocabulary follows the same SigLIP convention. The EOS token is
    `eos_token` or else the first of </s>, <|endoftext|>, <eos>, [SEP] found in the vocabulary;
    the pad id is EOS unless `pad_token` names another token.
    """

    def __init__(self, tokenizer_json_path, max_len: int = 64, lowercase: bool = False,
                 eos_token: str | None = None, pad_token: str | None = None):
        import tokenizers

        _check_max_len(max_len)
        path = _existing_file(tokenizer_json_path, "tokenizer.json",
                              "Pass the path of a Hugging Face tokenizer.json file.")
        self.tokenizer = tokenizers.Tokenizer.from_file(path)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_len = max_len
        self.lowercase = lowercase
        self.eos_id = self._token_id(eos_token, path) if eos_token else self._find_eos(path)
        self.pad_id = self._token_id(pad_token, path) if pad_token else self.eos_id

    def _token_id(self, token: str, path: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Token {token!r} is not in the vocabulary of {path!r}; special tokens "
                             f"there: {self._special_tokens()}.")
        return int(token_id)

    def _find_eos(self, path: str) -> int:
        for name in _EOS_TOKEN_NAMES:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        raise ValueError(
            f"Found no end-of-sequence token in {path!r} (looked for {list(_EOS_TOKEN_NAMES)}); "
            f"its special tokens are {self._special_tokens()}. Pass eos_token='...'.")

    def _special_tokens(self) -> list[str]:
        return sorted(t.content for t in self.tokenizer.get_added_tokens_decoder().values())

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids [len(texts), max_len], int32: truncated to max_len-1 tokens, then EOS, then pad."""
        if self.lowercase:
            texts = [text.lower() for text in texts]
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return _pad_and_truncate([e.ids for e in encodings], self.max_len, self.eos_id, self.pad_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first EOS."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode([i for i in ids if i != self.pad_id])


def train_sentencepiece(captions: Iterable[str], output_path, vocab_size: int, *,
                        lowercase: bool = False, model_type: str = "unigram",
                        character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                        hard_vocab_limit: bool = True, seed: int = 0) -> int:
    """Trains on `captions`, writes the model to `output_path`; returns how many captions it saw.

    The folders are created and the file appears whole or not at all (written beside it, then renamed), so
    runs that start at once and each train the same vocabulary never read half a file.

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
    output_path = os.path.abspath(os.path.expanduser(os.fspath(output_path)))
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    partial = f"{output_path}.{os.getpid()}.partial"
    with open(partial, "wb") as file:
        file.write(model.getvalue())
    os.replace(partial, output_path)
    return counted["captions"]


TOKENIZER_KINDS = ("byte", "sentencepiece", "hf")


def make_tokenizer(kind: str, *, max_len: int, lowercase: bool = False, path=None):
    """The tokenizer named by `kind` ("byte", "sentencepiece" or "hf"); `path` is the model file
    for the latter two (a .model file, a tokenizer.json)."""
    if kind == "byte":
        if path is not None:
            raise ValueError(f"The byte tokenizer needs no model file, got path={path!r}; drop it "
                             "or pick kind='sentencepiece' / 'hf'.")
        return ByteTokenizer(max_len=max_len, lowercase=lowercase)
    if kind in ("sentencepiece", "hf") and path is None:
        raise ValueError(f"Tokenizer kind {kind!r} needs path= to its model file.")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, max_len=max_len, lowercase=lowercase)
    if kind == "hf":
        return HFTokenizer(path, max_len=max_len, lowercase=lowercase)
    raise ValueError(f"Unknown tokenizer kind {kind!r}; valid kinds: {list(TOKENIZER_KINDS)}.")
