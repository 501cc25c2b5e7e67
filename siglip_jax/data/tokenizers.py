"""Text tokenizers with SigLIP's conventions: fixed length, EOS appended ("sticky", kept when the
caption is truncated) and padding with the pad id (SigLIP pads with EOS, id 1)."""
from __future__ import annotations

from typing import Sequence

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
