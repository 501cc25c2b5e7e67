"""init_from shape fitting: bilinear position-embedding resampling against hand-computed values and
scipy.ndimage.zoom (big_vision's resample_posemb), text truncate/extend, init_skip, and errors."""
import numpy as np
import pytest
import scipy.ndimage

from siglip_jax.models import init_mapping


def test_resample_posemb_hand_computed_2x2_to_3x3():
    # Corners kept, edge midpoints the mean of two corners, the centre the mean of all four.
    posemb = np.array([0.0, 2.0, 4.0, 6.0], np.float32).reshape(1, 4, 1)
    resampled = init_mapping.resample_posemb(posemb, (3, 3))
    np.testing.assert_allclose(resampled.reshape(3, 3), [[0, 1, 2], [2, 3, 4], [4, 5, 6]], atol=1e-6)


def test_resample_posemb_equals_scipy_zoom_order_1():
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, 7 * 7, 5)).astype(np.float32)
    for new in (4, 12):
        expected = scipy.ndimage.zoom(posemb.reshape(7, 7, 5), (new / 7, new / 7, 1), order=1)
        actual = init_mapping.resample_posemb(posemb, (new, new))
        np.testing.assert_allclose(actual.reshape(new, new, 5), expected, rtol=1e-5, atol=1e-5)


def _trees(image_tokens=4, text_len=3):
    fresh = {"img": {"pos_embedding": np.full((1, image_tokens, 1), -1.0), "head": {"kernel": np.full((2, 2), 9.0)}},
             "txt": {"pos_embedding": np.full((1, text_len, 2), -1.0)}}
    loaded = {"img": {"pos_embedding": np.array([0.0, 2.0, 4.0, 6.0]).reshape(1, 4, 1),
                      "head": {"kernel": np.zeros((2, 2))}},
              "txt": {"pos_embedding": np.arange(8.0).reshape(1, 4, 2)}}
    return loaded, fresh


def test_fit_params_resamples_resizes_and_skips():
    loaded, fresh = _trees(image_tokens=9, text_len=3)
    params, notes = init_mapping.fit_params(loaded, fresh, skip=("img/head/.*",))
    np.testing.assert_allclose(params["img"]["pos_embedding"].reshape(3, 3), [[0, 1, 2], [2, 3, 4], [4, 5, 6]])
    np.testing.assert_array_equal(params["img"]["head"]["kernel"], np.full((2, 2), 9.0))  # fresh, skipped
    np.testing.assert_array_equal(params["txt"]["pos_embedding"], [[[0, 1], [2, 3], [4, 5]]])  # truncated
    assert any("resampled" in note for note in notes) and any("truncated" in note for note in notes)
    assert any("img/head/kernel: kept the fresh" in note for note in notes)
    # Longer text: the loaded 4 rows, then the fresh row.
    loaded, fresh = _trees(text_len=5)
    params, _ = init_mapping.fit_params(loaded, fresh)
    np.testing.assert_array_equal(params["txt"]["pos_embedding"][0, 4], [-1.0, -1.0])
    np.testing.assert_array_equal(params["txt"]["pos_embedding"][0, :4], np.arange(8.0).reshape(4, 2))


def test_unmappable_arrays_list_both_shapes_and_the_fix():
    loaded, fresh = _trees()
    fresh["img"]["head"]["kernel"] = np.zeros((3, 2))
    fresh["img"]["MAPHead_0"] = {"probe": np.zeros((1, 1, 2))}
    with pytest.raises(ValueError, match=r"(?s)img/head/kernel: \(2, 2\) in the checkpoint, \(3, 2\) here; add it to "
                                         r"init_skip.*img/MAPHead_0/probe \(1, 1, 2\): missing in the checkpoint"):
        init_mapping.fit_params(loaded, fresh)
    with pytest.raises(ValueError, match=r"init_skip regex 'img/nothing' matches no parameter path.*img/head/kernel"):
        init_mapping.fit_params(loaded, fresh, skip=("img/nothing",))
