"""The NaFlex tower and its images (SigLIP 2), against independent references: torch's antialiased
bilinear resize (the one HF's Siglip2 uses), HF's Siglip2ImageProcessor, and padding invariance."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from siglip_jax.data import naflex  # noqa: E402
from siglip_jax.models import two_towers  # noqa: E402
from siglip_jax.models.naflex import resize_position_embedding  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402
from tests.params_helpers import random_params  # noqa: E402

torch = pytest.importorskip("torch", reason="the references need PyTorch (CPU): pip install -r requirements-test.txt")
transformers = pytest.importorskip("transformers", reason="the references need transformers")


def naflex_config(**overrides):
    return tiny_config(**{"model.image.kind": "naflex", "model.image.pooling": "map", "model.image.max_num_patches": 16,
                          **overrides})


@pytest.mark.parametrize("grid", [(4, 4), (2, 8), (1, 16), (3, 5), (7, 2), (6, 6), (9, 2), (1, 1)])
def test_position_embedding_resize_equals_torch_antialiased_bilinear(grid):
    rows, cols = grid
    posemb = np.random.default_rng(0).normal(size=(4, 4, 8)).astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(posemb).permute(2, 0, 1)[None], size=grid, mode="bilinear", align_corners=False,
        antialias=True)[0].reshape(8, rows * cols).T.numpy()
    ours = np.asarray(resize_position_embedding(jnp.asarray(posemb), jnp.array([grid]), 64))[0, : rows * cols]
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_one_column_grids_follow_torch_transposed_where_torch_repeats_row_zero():
    """torch 2.x's CPU antialiased kernel returns row 0 for every row when the output is one column wide
    (a (9, 1) resize of a grid whose rows differ gives nine equal values); ours equals torch's resize of the
    transposed grid to one row, (1, 9), transposed back, as the filter is the same on both axes. A 1-column
    grid needs an image at least `rows` times taller than wide."""
    posemb = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 4, 8)).astype(np.float32))
    resize = lambda grid, size: torch.nn.functional.interpolate(  # noqa: E731
        grid.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    one_column = resize(posemb, (9, 1))[:, :, 0].T.numpy()
    transposed = resize(posemb.transpose(0, 1), (1, 9))[:, 0, :].T.numpy()
    ours = np.asarray(resize_position_embedding(jnp.asarray(posemb.numpy()), jnp.array([(9, 1)]), 9))[0]
    np.testing.assert_allclose(ours, transposed, atol=1e-6)
    assert np.abs(one_column - one_column[0]).max() == 0  # torch's quirk, the reason for the transposed reference


@pytest.mark.parametrize("height, width", [(224, 224), (480, 640), (1000, 37), (37, 1000), (15, 16), (300, 299)])
@pytest.mark.parametrize("max_patches", [16, 256, 1024])
def test_grid_size_equals_hf_image_processor(height, width, max_patches):
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    if height < 16 or np.ceil(max(height, width) / min(height, width)) > max_patches:
        with pytest.raises(ValueError, match="patch|max_patches"):
            naflex.image_size_for_max_patches(height, width, 16, max_patches)
        return
    assert naflex.image_size_for_max_patches(height, width, 16, max_patches) == \
        get_image_size_for_max_num_patches(height, width, 16, max_patches)


def test_transform_equals_hf_siglip2_image_processor():
    processor = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=24)
    rng = np.random.default_rng(0)
    for height, width in ((20, 40), (37, 11), (16, 16)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        theirs = processor(images=[image], return_tensors="np")
        patches, mask, grid = naflex.unpack(naflex.naflex_transform(image, 4, 24))
        assert grid == tuple(theirs["spatial_shapes"][0])
        np.testing.assert_array_equal(mask, theirs["pixel_attention_mask"][0].astype(bool))
        # Padding differs by convention only (HF pads after normalising, we before); both are masked.
        np.testing.assert_allclose(patches[mask] / 127.5 - 1, theirs["pixel_values"][0][mask], atol=1e-5)


def test_bad_images_and_budgets_are_refused():
    with pytest.raises(ValueError, match=r"3x40 is smaller than one 4x4 patch"):
        naflex.image_size_for_max_patches(3, 40, 4, 16)
    with pytest.raises(ValueError, match=r"needs at least 20 patches for one row.*raise the budget to >= 20"):
        naflex.image_size_for_max_patches(10, 200, 4, 16)
    with pytest.raises(ValueError, match="exceeds max_patches=4"):
        naflex.pack(np.zeros((6, 48), np.uint8), (2, 3), 4)
    with pytest.raises(ValueError, match="not a square"):
        two_towers.build_model(naflex_config(**{"model.image.max_num_patches": 20}).model)


@pytest.fixture(scope="module")
def tower():
    config = naflex_config()
    params = random_params(config)
    model = two_towers.build_model(config.model)
    embed = jax.jit(lambda params, images: model.apply({"params": params}, images, method=model.embed_images))
    return config, params, embed


def test_padding_budget_does_not_change_the_embedding(tower):
    config, params, embed = tower
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((20, 40, 3), (40, 13, 3), (16, 16, 3))]
    tight = np.stack([naflex.naflex_transform(picture, 4, 16) for picture in pictures])
    # The same grids padded to larger budgets: copy each image's valid patches into a longer array.
    embeddings = [np.asarray(embed(params, tight))]
    for budget in (17, 40):
        padded = np.stack([naflex.pack(*_patches_and_grid(packed), budget) for packed in tight])
        embeddings.append(np.asarray(embed(params, padded)))
    for other in embeddings[1:]:
        np.testing.assert_allclose(other, embeddings[0], atol=1e-6)
    # An embedding does depend on the patches (the check can fail).
    assert np.abs(embeddings[0][0] - embeddings[0][1]).max() > 1e-3


def test_garbage_in_the_padding_does_not_change_the_embedding(tower):
    config, params, embed = tower
    picture = np.random.default_rng(2).integers(0, 256, (12, 30, 3), dtype=np.uint8)
    packed = naflex.naflex_transform(picture, 4, 16)
    _, mask, _ = naflex.unpack(packed)
    assert not mask.all()
    noisy = packed.copy()
    noisy[~mask, :-naflex.GRID_CHANNELS] = 200
    np.testing.assert_allclose(np.asarray(embed(params, noisy[None])), np.asarray(embed(params, packed[None])),
                               atol=1e-6)


def _patches_and_grid(packed):
    patches, mask, grid = naflex.unpack(packed)
    return patches[mask], grid


def test_checkpoint_posemb_that_is_no_square_grid_is_refused_with_sizes():
    from siglip_jax.models import init_mapping

    fresh = {"img": {"pos_embedding": np.zeros((1, 16, 8), np.float32)}}
    loaded = {"img": {"pos_embedding": np.zeros((1, 20, 8), np.float32)}}
    with pytest.raises(ValueError, match=r"\(1, 20, 8\) in the checkpoint is no square grid.*resized to \(1, 16, 8\)"):
        init_mapping.fit_params(loaded, fresh)
