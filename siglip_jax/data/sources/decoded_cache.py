"""A random-access source whose records are decoded once and then served from memory (data.cache_decoded_mb).

For small training sets read for many epochs (Flickr8k: 6,000 photos, 40 epochs in its recipe) reading the
file and decoding the JPEG are most of the input pipeline's CPU, and on a 2-core machine that CPU is taken from
the training step. The cache keeps each record with its image as decoded [H, W, 3] uint8 pixels, up to a byte
budget; records past the budget, and records whose image does not decode, are read from the source each time
as before (a bad image is still skipped and counted by the pipeline).
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from siglip_jax.data import images

logger = logging.getLogger(__name__)


class DecodedRecordCache:
    """`source` (random access: len and [index]) with each record's "image" decoded on first read and kept,
    with the rest of the record, while the kept pixels stay within `max_bytes`. Reading threads may share it;
    each worker process holds its own copy (data.num_workers > 0 multiplies the memory)."""

    def __init__(self, source: Any, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}; leave the source uncached instead.")
        self.source = source
        self.max_bytes = max_bytes
        self.cached_bytes = 0
        self._records: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._full = False

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str) -> Any:  # the source's own extras (all_captions, ...)
        if name == "source":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def __getitem__(self, index: int) -> dict:
        cached = self._records.get(index)
        if cached is not None:
            return dict(cached)  # a shallow copy: a consumer may replace keys, never our pixels
        record = self.source[index]
        if self._full:
            return record
        try:
            pixels = images.decode_image(record["image"])
        except images.DecodeError:
            return record  # the pipeline decodes it again, fails the same way, and skips it with its reason
        pixels.flags.writeable = False  # shared by every later read of this record
        with self._lock:
            if self.cached_bytes + pixels.nbytes > self.max_bytes:
                if not self._full:
                    self._full = True
                    logger.warning(
                        "data.cache_decoded_mb: %d of %d training records kept decoded (%.0f MB); the rest are read "
                        "and decoded each time. Raise data.cache_decoded_mb to keep them all.",
                        len(self._records), len(self.source), self.cached_bytes / 2**20)
            elif index not in self._records:
                self._records[index] = dict(record, image=pixels)
                self.cached_bytes += pixels.nbytes
        return dict(record, image=pixels)
