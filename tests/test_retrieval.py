"""Retrieval metrics and top-k search: hand-computed cases, ties, and a float64 numpy reference.

Hand cases use a trick to pick the score matrix directly: with the images as the identity matrix
(width = num_images) and normalize=False, score(image i, caption j) = text_embeddings[j, i], so
text_embeddings = scores.T for any scores [num_images, num_captions] we want.
"""
import numpy as np
import pytest

from siglip_jax.evaluation import retrieval
from siglip_jax.inference import blockwise


def embeddings_for_scores(scores):
    """[num_images, num_captions] desired scores -> (image_embeddings, text_embeddings)."""
    scores = np.asarray(scores, np.float32)
    return np.eye(scores.shape[0], dtype=np.float32), np.ascontiguousarray(scores.T)


def reference_ranks(query_embeddings, query_targets, gallery_embeddings, gallery_owners):
    """Independent float64 reference: sort the whole gallery per query, with wrong items placed
    before correct ones among equal scores (the pessimistic rule), and read off the position of the
    first correct item."""
    query = np.asarray(query_embeddings, np.float64)
    gallery = np.asarray(gallery_embeddings, np.float64)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    ranks = []
    for row, target in zip(query @ gallery.T, query_targets):
        is_correct = gallery_owners == target
        # lexsort sorts by the last key first: descending score, then wrong (0) before correct (1).
        order = np.lexsort((is_correct.astype(int), -row))
        ranks.append(1 + np.flatnonzero(is_correct[order])[0])
    return np.array(ranks)


# --- hand-computed cases --------------------------------------------------------------------------
def test_five_captions_per_image_hand_computed():
    # Two images, five captions each: captions 0-4 belong to image 0, captions 5-9 to image 1.
    caption_image_ids = np.array([0] * 5 + [1] * 5)
    scores = [
        # own captions 0-4            | image 1's captions 5-9
        [0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.95, 0.0, 0.0, 0.0],  # image 0
        [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.3, 0.8, 0.1],  # image 1
    ]
    images, texts = embeddings_for_scores(scores)
    # image_to_text: image 0's best own caption scores 0.9, beaten by caption 6 (0.95) -> rank 2.
    #   image 1's best own caption is caption 8 (0.8); no caption of image 0 reaches 0.8 -> rank 1.
    # text_to_image, each caption compares its column: (own image score, other image score)
    #   c0 (0.1 vs 0.7) 2, c1 (0.9 vs 0.6) 1, c2 (0.2 vs 0.5) 2, c3 (0.3 vs 0.4) 2, c4 (0.4 vs 0.3) 1,
    #   c5 (0.2 vs 0.5) 2, c6 (0.1 vs 0.95) 2, c7 (0.3 vs 0.0) 1, c8 (0.8 vs 0.0) 1, c9 (0.1 vs 0.0) 1.
    image_to_text, text_to_image = retrieval.retrieval_ranks(images, texts, caption_image_ids, normalize=False)
    np.testing.assert_array_equal(image_to_text, [2, 1])
    np.testing.assert_array_equal(text_to_image, [2, 1, 2, 2, 1, 2, 2, 1, 1, 1])

    metrics = retrieval.retrieval_metrics(images, texts, caption_image_ids, normalize=False)
    expected = {
        "image_to_text/recall@1": 0.5, "image_to_text/recall@5": 1.0, "image_to_text/recall@10": 1.0,
        # ranks [2, 1]: median 1.5 floors to 1, mean 1.5.
        "image_to_text/median_rank": 1.0, "image_to_text/mean_rank": 1.5,
        # five of ten captions at rank 1.
        "text_to_image/recall@1": 0.5, "text_to_image/recall@5": 1.0, "text_to_image/recall@10": 1.0,
        "text_to_image/median_rank": 1.0, "text_to_image/mean_rank": 1.5,
        # (0.5 + 1 + 1 + 0.5 + 1 + 1) / 6
        "mean_recall": 5 / 6,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_ties_count_against_the_query():
    scores = [
        [0.5, 0.5, 0.1],  # image 0
        [0.5, 0.5, 0.5],  # image 1
        [0.2, 0.3, 0.4],  # image 2
    ]
    images, texts = embeddings_for_scores(scores)
    # text_to_image, one caption per image, reading columns (image 0, image 1, image 2):
    #   caption 0 (0.5, 0.5, 0.2): own 0.5 ties image 1 -> rank 2 (an index rule would say 1).
    #   caption 1 (0.5, 0.5, 0.3): own 0.5 ties image 0 -> rank 2.
    #   caption 2 (0.1, 0.5, 0.4): own 0.4, image 1 is higher -> rank 2.
    # image_to_text, reading rows:
    #   image 0: own 0.5 ties caption 1 -> rank 2.  image 1: own 0.5 ties captions 0 and 2 -> rank 3.
    #   image 2: own 0.4, captions 0 and 1 score 0.2 and 0.3 -> rank 1.
    image_to_text, text_to_image = retrieval.retrieval_ranks(images, texts, [0, 1, 2], normalize=False)
    np.testing.assert_array_equal(text_to_image, [2, 2, 2])
    np.testing.assert_array_equal(image_to_text, [2, 3, 1])


def test_ties_between_own_captions_do_not_count():
    # Image 0 has captions 0 and 1, both scoring 0.7; image 1's caption 2 scores 0.6 for it.
    scores = [[0.7, 0.7, 0.6],
              [0.1, 0.2, 0.9]]
    images, texts = embeddings_for_scores(scores)
    image_to_text, _ = retrieval.retrieval_ranks(images, texts, [0, 0, 1], normalize=False)
    # Only captions of other images can push an image down: image 0 -> 1, image 1 -> 1.
    np.testing.assert_array_equal(image_to_text, [1, 1])


def test_collapsed_model_gets_the_worst_ranks():
    # Every embedding equal: every score ties. 3 images, 2 captions each.
    images = np.ones((3, 4), np.float32)
    texts = np.ones((6, 4), np.float32)
    caption_image_ids = np.array([0, 0, 1, 1, 2, 2])
    metrics = retrieval.retrieval_metrics(images, texts, caption_image_ids, ks=(1, 3))
    # image_to_text rank = 1 + 4 captions of other images = 5; text_to_image rank = 3 images.
    assert metrics["image_to_text/mean_rank"] == 5.0
    assert metrics["text_to_image/mean_rank"] == 3.0
    assert metrics["image_to_text/recall@1"] == 0.0
    assert metrics["text_to_image/recall@3"] == 1.0
    assert metrics["mean_recall"] == pytest.approx((0 + 0 + 0 + 1) / 4)


def test_median_rank_floors_even_counts_and_is_exact_for_odd():
    assert retrieval.summarize_ranks("x", np.array([1, 2, 4, 7]), (1,))["x/median_rank"] == 3.0
    assert retrieval.summarize_ranks("x", np.array([1, 2, 9]), (1,))["x/median_rank"] == 2.0


# --- against the float64 reference ----------------------------------------------------------------
@pytest.fixture(scope="module")
def random_retrieval_set():
    rng = np.random.default_rng(0)
    num_images, width = 23, 16
    # 1 to 5 captions per image, shuffled so a block mixes captions of many images.
    caption_image_ids = np.repeat(np.arange(num_images), rng.integers(1, 6, size=num_images))
    caption_image_ids = rng.permutation(caption_image_ids)
    images = rng.normal(size=(num_images, width)).astype(np.float32)
    # Captions near their image so the ranks spread over 1..many rather than all being random.
    texts = (images[caption_image_ids] + 1.5 * rng.normal(size=(len(caption_image_ids), width))).astype(np.float32)
    return images, texts, caption_image_ids


@pytest.mark.parametrize("block_size", [1, 7, 64, None])
def test_ranks_match_numpy_reference_for_any_block_size(random_retrieval_set, block_size):
    images, texts, caption_image_ids = random_retrieval_set
    image_to_text, text_to_image = retrieval.retrieval_ranks(images, texts, caption_image_ids, block_size)
    np.testing.assert_array_equal(
        image_to_text, reference_ranks(images, np.arange(len(images)), texts, caption_image_ids))
    np.testing.assert_array_equal(
        text_to_image, reference_ranks(texts, caption_image_ids, images, np.arange(len(images))))
    assert 1 < text_to_image.max() and text_to_image.min() == 1  # the set is neither trivial nor random


def test_metrics_match_numpy_reference(random_retrieval_set):
    images, texts, caption_image_ids = random_retrieval_set
    i2t = reference_ranks(images, np.arange(len(images)), texts, caption_image_ids)
    t2i = reference_ranks(texts, caption_image_ids, images, np.arange(len(images)))
    metrics = retrieval.retrieval_metrics(images, texts, caption_image_ids, ks=(1, 5, 10), block_size=5)
    for direction, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in (1, 5, 10):
            assert metrics[f"{direction}/recall@{k}"] == pytest.approx(np.mean(ranks <= k))
        assert metrics[f"{direction}/median_rank"] == np.floor(np.median(ranks))
        assert metrics[f"{direction}/mean_rank"] == pytest.approx(ranks.mean())
    recalls = [np.mean(r <= k) for r in (i2t, t2i) for k in (1, 5, 10)]
    assert metrics["mean_recall"] == pytest.approx(np.mean(recalls))


def test_normalize_is_cosine_similarity(random_retrieval_set):
    images, texts, caption_image_ids = random_retrieval_set
    scaled_images = images * np.linspace(0.1, 10, len(images), dtype=np.float32)[:, None]
    unit_images = images / np.linalg.norm(images, axis=1, keepdims=True)
    unit_texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    np.testing.assert_array_equal(
        np.concatenate(retrieval.retrieval_ranks(scaled_images, texts * 3, caption_image_ids)),
        np.concatenate(retrieval.retrieval_ranks(unit_images, unit_texts, caption_image_ids, normalize=False)))


def test_accepts_bfloat16_and_device_arrays(random_retrieval_set):
    import jax.numpy as jnp
    images, texts, caption_image_ids = random_retrieval_set
    metrics = retrieval.retrieval_metrics(jnp.asarray(images, jnp.bfloat16), jnp.asarray(texts, jnp.bfloat16),
                                          caption_image_ids, block_size=4)
    reference = retrieval.retrieval_metrics(images, texts, caption_image_ids)
    # bfloat16 rounding may swap a few close pairs, not the overall picture.
    assert metrics["mean_recall"] == pytest.approx(reference["mean_recall"], abs=0.1)


# --- top-k search ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gallery_block_size", [4, 10, 1000])
def test_top_k_matches_numpy_reference(gallery_block_size):
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(9, 8)).astype(np.float32)
    gallery = rng.normal(size=(30, 8)).astype(np.float32)  # 30 is not a multiple of 4
    scores, indices = blockwise.top_k_search(queries, gallery, k=5, block_size=4,
                                             gallery_block_size=gallery_block_size)
    unit_gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected_scores = unit_queries.astype(np.float64) @ unit_gallery.T.astype(np.float64)
    expected_indices = np.argsort(-expected_scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, np.take_along_axis(expected_scores, expected_indices, 1), atol=1e-5)


def test_top_k_ties_go_to_the_lower_index_across_gallery_blocks():
    # Gallery rows 1, 4, 8 and 9 are the same vector; with gallery blocks of 3 they sit in different
    # blocks, and 10 rows means the last block (rows 9..11) slides back to rows 7..9.
    gallery = np.zeros((10, 3), np.float32)
    gallery[:, 1] = 1.0  # every other row is orthogonal to the query: score 0
    gallery[[1, 4, 8, 9]] = [1.0, 0.0, 0.0]
    query = np.array([[2.0, 0.0, 0.0]], np.float32)
    scores, indices = blockwise.top_k_search(query, gallery, k=6, gallery_block_size=3, normalize=False)
    # Four ties at score 2 in index order, then the score-0 rows from the lowest index: 0, 2.
    np.testing.assert_array_equal(indices, [[1, 4, 8, 9, 0, 2]])
    np.testing.assert_array_equal(scores, [[2, 2, 2, 2, 0, 0]])


def test_top_k_whole_gallery_is_a_permutation():
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(11, 4)).astype(np.float32)
    _, indices = blockwise.top_k_search(gallery[:3], gallery, k=11, gallery_block_size=4)
    for row in indices:
        np.testing.assert_array_equal(np.sort(row), np.arange(11))


# --- bad inputs -----------------------------------------------------------------------------------
@pytest.fixture
def small_set():
    return np.ones((3, 4), np.float32), np.ones((6, 4), np.float32), np.array([0, 0, 1, 1, 2, 2])


def test_mismatched_widths_are_named(small_set):
    images, texts, ids = small_set
    with pytest.raises(ValueError, match="width 4 but text_embeddings has width 5"):
        retrieval.retrieval_metrics(images, np.ones((6, 5), np.float32), ids)


@pytest.mark.parametrize("bad_id", [-1, 3])
def test_caption_ids_out_of_range_are_named(small_set, bad_id):
    images, texts, ids = small_set
    ids = ids.copy()
    ids[4] = bad_id
    with pytest.raises(ValueError, match=rf"\[0, 3\).*entry 4 is {bad_id}"):
        retrieval.retrieval_metrics(images, texts, ids)


def test_images_without_captions_are_listed(small_set):
    images, texts, _ = small_set
    with pytest.raises(ValueError, match=r"1 of 3 images have no caption \(first: \[1\]\)"):
        retrieval.retrieval_metrics(images, texts, np.array([0, 0, 2, 2, 2, 2]))


def test_caption_ids_of_wrong_length_or_type(small_set):
    images, texts, ids = small_set
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        retrieval.retrieval_metrics(images, texts, ids[:5])
    with pytest.raises(ValueError, match="integer"):
        retrieval.retrieval_metrics(images, texts, ids.astype(np.float32))


def test_nan_embeddings_are_rejected(small_set):
    images, texts, ids = small_set
    texts = texts.copy()
    texts[2, 1] = np.nan
    with pytest.raises(ValueError, match="text_embeddings contains NaN"):
        retrieval.retrieval_metrics(images, texts, ids)


def test_bad_ks_k_and_shapes(small_set):
    images, texts, ids = small_set
    with pytest.raises(ValueError, match="ks must be"):
        retrieval.retrieval_metrics(images, texts, ids, ks=(0, 5))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 6\]"):
        blockwise.top_k_search(images, texts, k=7)
    with pytest.raises(ValueError, match="2-D array"):
        retrieval.retrieval_metrics(images[0], texts, ids)


def test_balanced_block_size_pads_at_most_one_row_per_block():
    assert blockwise.balanced_block_size(1000, 671) == 500  # 2 blocks of 500, not 671 + 329 padded
    assert blockwise.balanced_block_size(23, 7) == 6  # 4 blocks, 24 rows: one padded row
    assert blockwise.balanced_block_size(5, 64) == 5
