"""Image-text retrieval metrics: recall@K and ranks in both directions, several captions per image.

Protocol (the multi-caption one of CLIP, ALIGN and CLIP_benchmark):
  * image_to_text: each image is a query over all captions; it is a hit at K when *any* of its own
    captions is among the top K. Its rank is the position of its best-scoring own caption.
  * text_to_image: each caption is a query over all images with exactly one correct image.
  * Ranks are 1-based. Recall@K is the fraction of queries with rank <= K, in [0, 1].
  * median_rank is floor(median(ranks)), the convention of open_clip's `get_clip_metrics`
    (it matters only for an even number of queries); mean_rank is the plain mean.
  * mean_recall is the mean of every recall@K of both directions: with ks=(1, 5, 10) it is ALBEF's
    and BLIP's `r_mean` (rsum / 6). CLIP_benchmark and open_clip report no aggregate of their own.
  * CLIP_benchmark names by what is retrieved: its `text_retrieval_recall@K` is our
    `image_to_text/recall@K` and its `image_retrieval_recall@K` our `text_to_image/recall@K`.
  * Similarity is cosine (embeddings L2-normalised here unless normalize=False), as in CLIP_benchmark.

Ties are pessimistic: an item of the wrong kind that scores exactly as high as the best correct one
is ranked above it. So rank = 1 + #{wrong items with score >= best correct score}. We chose this over
breaking ties by index because an index rule rewards data order: a collapsed model whose embeddings
are all equal would score recall@1 = 1 for every caption that happens to sit first. Pessimistic ties
make that model score the worst possible ranks, and the rule needs no sort, only a count.

The ranks are computed in blocks on device by blockwise.py, which also holds top-k search and the
input checks shared with classification.py; their public names are importable from here too.
"""
from typing import Sequence

import numpy as np

from siglip_jax.inference.blockwise import (check_embeddings, check_index_array, check_ks, check_same_width,
                                            positive_ranks)

DEFAULT_KS = (1, 5, 10)


def retrieval_ranks(image_embeddings, text_embeddings, caption_image_ids,
                    block_size: int | None = None, normalize: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-query ranks for both directions (useful for per-item error analysis).

    Args:
      image_embeddings: [num_images, width].
      text_embeddings: [num_captions, width].
      caption_image_ids: [num_captions] int, the index of each caption's image; every image needs
        at least one caption.
    Returns:
      (image_to_text_ranks [num_images], text_to_image_ranks [num_captions]), int32, 1-based.
    """
    check_embeddings("image_embeddings", image_embeddings)
    check_embeddings("text_embeddings", text_embeddings)
    check_same_width("image_embeddings", image_embeddings, "text_embeddings", text_embeddings)
    num_images, num_captions = image_embeddings.shape[0], text_embeddings.shape[0]
    caption_image_ids = check_index_array(
        "caption_image_ids", caption_image_ids, num_captions, num_images, "image_embeddings")
    captions_per_image = np.bincount(caption_image_ids, minlength=num_images)
    uncaptioned = np.flatnonzero(captions_per_image == 0)
    if uncaptioned.size:
        raise ValueError(
            f"{uncaptioned.size} of {num_images} images have no caption (first: {uncaptioned[:5].tolist()}); "
            "image-to-text recall is undefined for them. Drop those images or add their captions to "
            "text_embeddings and caption_image_ids.")
    image_ids = np.arange(num_images, dtype=np.int32)
    image_to_text = positive_ranks(
        image_embeddings, image_ids, text_embeddings, caption_image_ids, block_size, normalize,
        query_name="image_embeddings", gallery_name="text_embeddings")
    text_to_image = positive_ranks(
        text_embeddings, caption_image_ids, image_embeddings, image_ids, block_size, normalize,
        query_name="text_embeddings", gallery_name="image_embeddings")
    return image_to_text, text_to_image


def summarize_ranks(prefix: str, ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """1-based ranks [num_queries] -> {prefix/recall@K, prefix/median_rank, prefix/mean_rank}."""
    metrics = {f"{prefix}/recall@{k}": float(np.mean(ranks <= k)) for k in ks}
    metrics[f"{prefix}/median_rank"] = float(np.floor(np.median(ranks)))
    metrics[f"{prefix}/mean_rank"] = float(np.mean(ranks))
    return metrics


def retrieval_metrics(image_embeddings, text_embeddings, caption_image_ids,
                      ks: Sequence[int] = DEFAULT_KS, block_size: int | None = None,
                      normalize: bool = True) -> dict[str, float]:
    """Image-to-text and text-to-image retrieval metrics with several captions per image.

    Args:
      image_embeddings: [num_images, width] float, numpy or jax.
      text_embeddings: [num_captions, width] float.
      caption_image_ids: [num_captions] int, the index into image_embeddings of each caption's image.
      ks: the K of recall@K.
      block_size: queries per device block; None keeps each block of scores under 256 MiB.
      normalize: compare by cosine similarity (True) or raw dot product (False).
    Returns:
      {"image_to_text/recall@K", "text_to_image/recall@K" for K in ks,
       "{image_to_text,text_to_image}/{median_rank,mean_rank}", "mean_recall"}; recalls in [0, 1].
      See the module docstring for the protocol and the tie rule.
    """
    ks = check_ks(ks)
    image_to_text, text_to_image = retrieval_ranks(
        image_embeddings, text_embeddings, caption_image_ids, block_size, normalize)
    metrics = {**summarize_ranks("image_to_text", image_to_text, ks),
               **summarize_ranks("text_to_image", text_to_image, ks)}
    recalls = [metrics[f"{direction}/recall@{k}"]
               for direction in ("image_to_text", "text_to_image") for k in ks]
    metrics["mean_recall"] = float(np.mean(recalls))
    return metrics
