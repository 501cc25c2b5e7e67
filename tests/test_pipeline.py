import numpy as np
import pytest

from siglip_jax.data import demo, pipeline, preprocess, streaming
from siglip_jax.data.demo import COLOURS, DemoSource, POSITIONS, SHAPES
from siglip_jax.data.tokenizers import ByteTokenizer

OPTIONS = preprocess.ImageOptions(image_size=16)


def test_demo_records_are_deterministic_and_splits_differ():
    train, again = DemoSource("train", 50, 16), DemoSource("train", 50, 16)
    held_out = DemoSource("eval", 50, 16)
    for index in (0, 7, 49):
        np.testing.assert_array_equal(train[index]["image"], again[index]["image"])
        assert train[index]["captions"] == again[index]["captions"]
    assert not any(np.array_equal(train[i]["image"], held_out[i]["image"]) for i in range(50))


def test_demo_captions_describe_the_picture():
    record = DemoSource("train", 10, 32)[3]
    assert len(record["captions"]) == 5
    first = record["captions"][0]
    assert any(colour in first for colour in COLOURS) and any(shape in first for shape in SHAPES)
    assert any(position in first for position in POSITIONS)
    image = record["image"]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # The shape is drawn in its colour: the brightest pixels are far from the dark background.
    assert image.max() > 150


def test_demo_eval_split_has_one_image_per_description():
    source = DemoSource("eval", 512, 16)  # one source: each new one renders its records again
    captions = [source[i]["captions"][0] for i in range(512)]
    assert len(set(captions)) == 512


def test_demo_pictures_at_two_aspect_ratios_keep_their_positions():
    source = DemoSource("eval", 64, 32, aspect_ratios=(2.0, 0.5))
    assert [source[i]["image"].shape for i in range(3)] == [(23, 45, 3), (45, 23, 3), (23, 45, 3)]
    assert all(record["image"].shape[0] * record["image"].shape[1] in range(1000, 1060) for record in source)
    for index in range(64):
        record = source[index]
        attributes = record["captions"][0]
        image = record["image"].astype(np.float32)
        colour = next(name for name in sorted(COLOURS, key=len, reverse=True) if name in attributes)
        shape_pixels = np.argwhere(np.abs(image - COLOURS[colour]).max(axis=-1) < 45)
        assert len(shape_pixels), (index, attributes)
        # The shape's centre lies in the 3 x 3 cell its caption names, on the whole (non-square) canvas.
        position = next(name for name in sorted(POSITIONS, key=len, reverse=True) if f"at the {name}" in attributes)
        row, column = POSITIONS[position]
        centre = shape_pixels.mean(axis=0) / image.shape[:2] * 3
        assert int(centre[0]) == row and int(centre[1]) == column, (index, attributes, centre)


@pytest.mark.parametrize("aspect_ratios", [(1.0,), (2.0, 0.5)])
def test_demo_renders_on_first_access_only_the_touched_blocks_and_each_record_as_if_alone(aspect_ratios):
    size = 3 * demo.RENDER_BLOCK + 5  # the last block is partial
    source = DemoSource("train", size, 16, aspect_ratios=aspect_ratios)
    first = source[demo.RENDER_BLOCK + 3]["image"]
    assert source._rendered.tolist() == [False, True, False, False]  # the first batch waits for its blocks only
    for index in np.random.default_rng(0).permutation(size):
        alone = source._render(np.array([index]))[0]  # the uncached path a split over CACHE_BYTES takes
        np.testing.assert_array_equal(source[int(index)]["image"], alone)
    np.testing.assert_array_equal(first, source[demo.RENDER_BLOCK + 3]["image"])
    assert source._rendered.all()


def test_demo_refuses_bad_aspect_ratios():
    with pytest.raises(ValueError, match="aspect_ratios must be positive"):
        DemoSource("eval", 8, 16, aspect_ratios=(1.0, 0.0))


def test_demo_refuses_unknown_split():
    with pytest.raises(ValueError, match="valid: train, eval"):
        DemoSource("test")


def _batches(source, **kwargs):
    return pipeline.train_batches(source, tokenizer=ByteTokenizer(12), options=OPTIONS, local_batch_size=4, seed=3, **kwargs)


def test_batches_have_shapes_and_resume_from_state():
    iterator = _batches(DemoSource("train", 40, 16))
    first = next(iterator)
    assert first["images"].shape == (4, 16, 16, 3) and first["images"].dtype == np.uint8
    assert first["tokens"].shape == (4, 12) and first["tokens"].dtype == np.int32
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(12)]  # crosses an epoch boundary (40 records / 4)
    resumed = _batches(DemoSource("train", 40, 16))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["images"], want["images"])
        np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_processes_read_disjoint_shares_of_each_epoch():
    source = DemoSource("train", 16, 16)
    seen = []
    for process in range(2):
        iterator = _batches(source, process_index=process, process_count=2)
        seen.append({bytes(image) for batch in (next(iterator), next(iterator)) for image in batch["images"]})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 16  # together, one full epoch


def test_processes_together_see_the_single_process_examples_with_the_same_augmentation():
    # A 2-process run must train on what a 1-process run trains on (tests/test_multihost.py compares
    # their losses), so captions and crops may depend on a record's global position only.
    source = DemoSource("train", 32, 16)
    augmented = preprocess.ImageOptions(image_size=16, random_crop_scale=(0.3, 1.0), random_flip=True)

    def first_batch(batch_size, **kwargs):
        iterator = pipeline.train_batches(
            source, tokenizer=ByteTokenizer(12), options=augmented, local_batch_size=batch_size, seed=3, **kwargs
        )
        return next(iterator)

    single = first_batch(8)
    shares = [first_batch(4, process_index=process, process_count=2) for process in range(2)]
    for key in ("images", "tokens"):
        # Process p reads block p of the global batch: stacked in process order, the rows are the single
        # process's rows in the same order, so the train step computes the same sums in the same order.
        np.testing.assert_array_equal(np.concatenate([share[key] for share in shares]), single[key])


class _WithBadRecords:
    """The demo data with every fifth image corrupt and record 3 without captions."""

    def __init__(self):
        self.inner = DemoSource("train", 40, 16)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        record = dict(self.inner[index])
        if index % 5 == 0:
            record["image"] = b"\xff\xd8\xff not really a jpeg"
        if index == 3:
            record["captions"] = ["", "  "]
        return record


def test_corrupt_images_and_empty_captions_are_replaced_and_counted():
    source = _WithBadRecords()
    iterator = _batches(source)
    batches = [next(iterator) for _ in range(10)]  # one epoch of 40 positions
    assert all(batch["images"].shape == (4, 16, 16, 3) for batch in batches)
    good_images = {bytes(source.inner[i]["image"]) for i in range(40) if i % 5 and i != 3}
    seen = [bytes(image) for batch in batches for image in batch["images"]]
    assert set(seen) <= good_images  # no bad record reaches a batch
    # 9 of the 40 records are unusable: at least 9 replacements in the epoch (a replacement can be bad too).
    assert int(sum(batch["num_skipped"].sum() for batch in batches)) >= 9


def test_too_small_source_is_refused():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _batches(DemoSource("train", 3, 16))


class _Unusable(_WithBadRecords):
    def __getitem__(self, index):
        return {**self.inner[index], "image": b"not an image"}


@pytest.mark.parametrize("as_stream", [False, True])
def test_both_pipelines_give_up_after_the_same_number_of_unusable_records(as_stream, caplog, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_UNUSABLE_IN_A_ROW", 50)  # the one limit both read (fewer log lines)
    source = _Unusable()
    if as_stream:  # the stream path (mixtures, shards) reads a random-access source through MapRecordStream
        source.stream = lambda **kwargs: streaming.MapRecordStream(_Unusable(), **kwargs)
    with pytest.raises(ValueError, match=f"^{preprocess.MAX_UNUSABLE_IN_A_ROW} training records in a row were unusable, "
                                         "the last: record .*tools/convert.py"):
        next(_batches(source))
    skipped = [record for record in caplog.records if record.getMessage().startswith("Skipped a training record")]
    assert len(skipped) >= preprocess.MAX_UNUSABLE_IN_A_ROW  # each named (reading threads may start more)


def test_a_stream_counts_skipped_records_like_the_index_pipeline():
    class Streamed(_WithBadRecords):
        def stream(self, **kwargs):
            return streaming.MapRecordStream(_WithBadRecords(), **kwargs)

    # 7 batches of 4 = 28 usable records of epoch 0, read in the stream's order of that epoch (seed 3).
    iterator = _batches(Streamed())
    batches = [next(iterator) for _ in range(7)]
    assert all(int(epoch) == 0 for batch in batches for epoch in batch["epoch"])
    order = np.random.default_rng([3, 0]).permutation(40)
    usable = np.array([index % 5 != 0 and index != 3 for index in order])
    passed_over = int(np.sum(~usable[: np.flatnonzero(usable)[27] + 1]))  # unusable ones before the 28th usable one
    assert int(sum(batch["num_skipped"].sum() for batch in batches)) == passed_over > 0
    shards = [name for batch in batches for names in batch["skipped_shards"] for name in str(names).split("\n") if name]
    assert shards == [streaming.UNNAMED_SOURCE] * passed_over
