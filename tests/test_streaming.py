"""Streaming WebDataset shards (data/sources/shard_stream.py, data/streaming.py): who reads which shard,
shuffling across open shards, epochs and resampling, exact positions, bad input, a changed process count."""
import collections
import gzip
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import pipeline, preprocess, streaming
from siglip_jax.data.sources import make_source, shard_stream
from siglip_jax.data.tokenizers import ByteTokenizer
from siglip_jax.io import checkpoint

NUM_SHARDS, PER_SHARD = 6, 10


def _jpeg(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), value % 256, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _write_tar(path, members, compress=False):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = payload.getvalue()
    with open(path, "wb") as stream:
        stream.write(gzip.compress(data) if compress else data)


def _shard_members(shard):
    for sample in range(PER_SHARD):
        key = f"{shard:02d}{sample:03d}"
        yield f"{key}.jpg", _jpeg(shard * PER_SHARD + sample)
        yield f"{key}.txt", f"shard {shard} sample {sample}".encode()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    for shard in range(NUM_SHARDS):
        _write_tar(directory / f"{shard:05d}.tar", list(_shard_members(shard)))
    return str(directory)


def _pattern(directory, count=NUM_SHARDS):
    return os.path.join(directory, f"{{00000..{count - 1:05d}}}.tar")


def _stream(directory, process_index=0, process_count=1, **args):
    args = {"shuffle_buffer": 8, "open_shards": 2, **args}
    source = make_source("webdataset_stream", shards=_pattern(directory), **args)
    return source.stream(seed=3, process_index=process_index, process_count=process_count)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_patterns_expand_without_listing_and_a_missing_shard_is_named(shard_dir, tmp_path):
    paths = shard_stream.expand_patterns([_pattern(shard_dir, 2), os.path.join(shard_dir, "00005.tar")])
    assert [os.path.basename(path) for path in paths] == ["00000.tar", "00001.tar", "00005.tar"]
    # 100,000 names from one range, no filesystem call but the first shard's existence
    assert len(shard_stream.expand_patterns(os.path.join(shard_dir, "{00000..99999}.tar"))) == 100_000
    assert len(shard_stream.expand_patterns(os.path.join(shard_dir, "*.tar"))) == NUM_SHARDS
    with pytest.raises(FileNotFoundError, match=r"first shard .*nowhere/00000.tar"):
        make_source("webdataset_stream", shards=str(tmp_path / "nowhere" / "{00000..00009}.tar"))
    with pytest.raises(FileNotFoundError, match="No shard matches"):
        make_source("webdataset_stream", shards=str(tmp_path / "*.tar"))


def test_each_epoch_reads_every_sample_once_split_by_shard_over_processes(shard_dir):
    per_process = []
    for process_index in range(2):
        records = _take(iter(_stream(shard_dir, process_index, 2)), NUM_SHARDS * PER_SHARD)  # two epochs' worth
        first_epoch = [record for record in records if record["epoch"] == 0]
        assert len(first_epoch) == NUM_SHARDS * PER_SHARD // 2
        per_process.append(first_epoch)
    shards = [{record["shard"] for record in records} for records in per_process]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == NUM_SHARDS // 2  # whole shards each
    ids = [record["id"] for records in per_process for record in records]
    assert sorted(ids) == sorted(f"{s:02d}{i:03d}" for s in range(NUM_SHARDS) for i in range(PER_SHARD))
    first_block = per_process[0][:8]
    assert len({record["shard"] for record in first_block}) == 2, "a block mixes the open shards"
    assert [record["id"] for record in first_block] != sorted(record["id"] for record in first_block)


def test_too_few_shards_for_processes_and_workers(shard_dir):
    with pytest.raises(ValueError, match="6 shards cannot feed 4 processes x 2 data workers"):
        _stream(shard_dir, 0, 4).set_slice(slice(0, None, 2))


def _epoch_shard_orders(directory, resampled, epochs=8):
    records = _take(iter(_stream(directory, resampled=resampled, open_shards=1, shuffle_buffer=1)), epochs * NUM_SHARDS * PER_SHARD)
    orders = collections.defaultdict(list)
    for record in records:
        if not orders[record["epoch"]] or orders[record["epoch"]][-1] != record["shard"]:
            orders[record["epoch"]].append(record["shard"])
    return [orders[epoch] for epoch in range(epochs)]


def test_shard_order_reshuffles_each_epoch_or_resamples(shard_dir):
    orders = _epoch_shard_orders(shard_dir, resampled=False)
    assert all(sorted(order) == sorted(orders[0]) and len(order) == NUM_SHARDS for order in orders)
    assert len({tuple(order) for order in orders}) > 1, "the order changes between epochs"
    draws = _epoch_shard_orders(shard_dir, resampled=True)
    assert all(len(draw) <= NUM_SHARDS for draw in draws)
    # with replacement: 6 draws of 6 shards repeat one with probability 1 - 6!/6**6 = 98.5% per epoch
    assert sum(len(set(draw)) < NUM_SHARDS for draw in draws) >= 6


def test_position_restores_exactly_anywhere(shard_dir):
    stream = _stream(shard_dir, 1, 2, shuffle_buffer=7, open_shards=2)
    reference = [record["id"] for record in _take(iter(stream), 70)]
    for stop in (0, 1, 6, 7, 8, 29, 30, 31, 44):
        iterator = iter(stream)
        _take(iterator, stop)
        state = json.loads(json.dumps(iterator.get_state()))  # as the checkpoint writes and reads it
        resumed = iter(stream)
        resumed.set_state(state)
        assert [record["id"] for record in _take(resumed, 70 - stop)] == reference[stop:], f"stopped at {stop}"


def _batches(source, **kwargs):
    return pipeline.train_batches(source, tokenizer=ByteTokenizer(max_len=12), options=preprocess.ImageOptions(16, (0.5, 1.0), True),
                                  local_batch_size=4, seed=0, **kwargs)


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # workers: ~40 s to spawn
def test_batches_resume_bitwise(shard_dir, num_workers):
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    source = make_source("webdataset_stream", shards=_pattern(shard_dir), shuffle_buffer=5, open_shards=2)
    # The iterator whose state is taken goes on as the reference: one pipeline less to start (with
    # workers, two worker processes less to spawn).
    iterator = _batches(source, num_workers=num_workers)
    _take(iterator, 4)
    state = json.loads(json.dumps(iterator.get_state()))
    reference = [next(iterator) for _ in range(5)]
    resumed = _batches(source, num_workers=num_workers)
    resumed.set_state(state)
    for want in reference:
        got = next(resumed)
        assert set(got) == {"images", "tokens", "num_skipped", "skipped_shards", "epoch"}
        assert np.array_equal(got["images"], want["images"]) and np.array_equal(got["tokens"], want["tokens"])


def test_bad_samples_are_skipped_counted_and_named(tmp_path, caplog):
    caplog.set_level("WARNING")
    good = list(_shard_members(0))
    _write_tar(tmp_path / "00000.tar", good[:6] + [("x.txt", b"caption without image"), ("y.jpg", _jpeg(1)),  # no caption
                                                  ("z.jpg", b"not an image"), ("z.txt", b"junk")] + good[6:])
    _write_tar(tmp_path / "00001.tar.gz", list(_shard_members(1)), compress=True)
    truncated = tmp_path / "truncated.tar"
    _write_tar(truncated, list(_shard_members(2)))
    data = truncated.read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: len(data) // 2])  # cut midway through a member
    shards = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar.gz"), str(tmp_path / "00002.tar")]
    source = make_source("webdataset_stream", shards=shards, shuffle_buffer=4, open_shards=3)
    records = _take(iter(source.stream(seed=0, process_index=0, process_count=1, num_epochs=1)), 2 * PER_SHARD + 3)
    assert len([record for record in records if "error" not in record]) <= 2 * PER_SHARD + PER_SHARD // 2
    errors = sorted(record["error"] for record in records if "error" in record)
    assert any("x" in error and "no image" in error for error in errors)
    assert any("y" in error and "no caption" in error for error in errors)
    iterator = _batches(source)
    batches = _take(iterator, 6)
    assert all(batch["images"].shape == (4, 16, 16, 3) for batch in batches)
    skipped = sum(int(batch["num_skipped"].sum()) for batch in batches)
    assert skipped >= 3  # x, y, z of the first epoch
    log = caplog.text
    assert "00002.tar is truncated" in log and "00000.tar" in log and "z" in log


def test_skips_are_counted_per_shard_and_batches_keep_their_size(tmp_path, caplog):
    """One epoch of three shards: 00000.tar holds x (no image), y (no caption) and z (not an image),
    00001.tar is whole, 00002.tar is cut short: 3 + 0 + 1 records skipped, each counted for its shard."""
    caplog.set_level("WARNING")
    good = list(_shard_members(0))
    _write_tar(tmp_path / "00000.tar", good[:6] + [("x.txt", b"caption without image"), ("y.jpg", _jpeg(1)),
                                                  ("z.jpg", b"not an image"), ("z.txt", b"junk")] + good[6:])
    _write_tar(tmp_path / "00001.tar", list(_shard_members(1)))
    _write_tar(tmp_path / "whole.tar", list(_shard_members(2)))
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: len(data) // 2])
    shards = [str(tmp_path / f"{shard:05d}.tar") for shard in range(3)]
    with tarfile.open(shards[2], mode="r|") as archive:  # complete samples before the cut, counted by hand
        names = []
        try:
            names += [info.name for info in archive]
        except tarfile.ReadError:
            pass
    whole_samples_in_cut = len({name.split(".")[0] for name in names}) - 1  # the last one is cut midway
    source = make_source("webdataset_stream", shards=shards, shuffle_buffer=4, open_shards=3)
    options = preprocess.ImageOptions(16, (0.5, 1.0), True)
    tokenizer = ByteTokenizer(max_len=12)
    examples = streaming.StreamExamples(source.stream(seed=0, process_index=0, process_count=1, num_epochs=1),
                                        lambda record, rng: preprocess.make_example(record, rng, tokenizer, options), seed=0)
    batches = list(examples.batch(4, drop_remainder=False))
    counts = collections.Counter()
    for batch in batches:
        streaming.count_skipped_by_shard(batch["skipped_shards"], counts)
    assert dict(counts) == {shards[0]: 3, shards[2]: 1}
    assert sum(int(batch["num_skipped"].sum()) for batch in batches) == 4
    assert sum(len(batch["images"]) for batch in batches) == 2 * PER_SHARD + whole_samples_in_cut
    assert all(batch["images"].shape == (4, 16, 16, 3) for batch in batches[:-1])
    assert f"of {shards[2]}: Shard {shards[2]} is truncated" in caplog.text
    assert f"of {shards[0]}: sample x of shard {shards[0]} has no image" in caplog.text


@pytest.mark.slow  # a whole (tiny) training run: one compile of the step
def test_metrics_count_skips_per_shard(tmp_path):
    """The trainer's metrics.jsonl: data/skipped/<shard> for each shard with skipped records, adding
    up to data/num_skipped at every step."""
    from siglip_jax.config import source_config
    from siglip_jax.training import trainer
    from tests.helpers import tiny_config

    good = list(_shard_members(0))
    _write_tar(tmp_path / "00000.tar", good[:4] + [("x.txt", b"caption without image"), ("z.jpg", b"not an image"),
                                                  ("z.txt", b"junk")] + good[4:])
    _write_tar(tmp_path / "00001.tar", list(_shard_members(1)))
    shards = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    config = tiny_config(total_steps=3)
    config.data.train = source_config("webdataset_stream", shards=shards, shuffle_buffer=4, open_shards=2)
    trainer.train(config, str(tmp_path / "run"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        per_shard = {key[len("data/skipped/"):]: value for key, value in line.items() if key.startswith("data/skipped/")}
        assert set(per_shard) <= {shards[0]} and sum(per_shard.values()) == line["data/num_skipped"]
    # 3 steps x 16 examples = 48 of the 20 good samples an epoch: the 2 bad ones of each of 2 full epochs at least
    assert lines[-1]["step"] == 3 and lines[-1][f"data/skipped/{shards[0]}"] >= 4


def test_changed_process_count_starts_the_next_epoch_everywhere(shard_dir):
    states = {}
    for process_index in range(2):
        iterator = iter(_stream(shard_dir, process_index, 2))
        _take(iterator, 12)
        states[process_index] = json.loads(json.dumps(iterator.get_state()))
    moved = pipeline.redistribute_positions(states, 3)
    assert len(moved) == 3
    seen = []
    for process_index, state in enumerate(moved):
        iterator = iter(_stream(shard_dir, process_index, 3))
        iterator.set_state(state)
        records = _take(iterator, 30)  # blocks run across the epoch boundary: epoch 2 begins within these
        assert min(record["epoch"] for record in records) == 1
        seen += [record["id"] for record in records if record["epoch"] == 1]
    assert len(seen) == len(set(seen)) == 60, "the three processes read disjoint shards of epoch 1, all of it"
    with pytest.raises(ValueError, match="num_workers"):
        streaming.redistribute_stream_states({0: {"workers_state": {}}}, 2)


# ----------------------------------------------------------------------------- mixtures

def _mixture(shard_dir, on_exhausted="restart", web_weight=0.9):
    return make_source("mixture", on_exhausted=on_exhausted, sources={
        "web": dict(kind="webdataset_stream", weight=web_weight, args=dict(shards=_pattern(shard_dir), shuffle_buffer=4)),
        "curated": dict(kind="demo", weight=1 - web_weight, args=dict(split="train", size=30, image_size=16)),
    })


def test_mixture_shares_follow_the_weights(shard_dir):
    iterator = iter(_mixture(shard_dir).stream(seed=0, process_index=0, process_count=1))
    counts = collections.Counter(next(iterator)["source"] for _ in range(20_000))
    assert abs(counts["web"] / 20_000 - 0.9) < 0.02 and abs(counts["curated"] / 20_000 - 0.1) < 0.02


def test_mixture_position_restores_each_source(shard_dir):
    stream = _mixture(shard_dir, web_weight=0.6).stream(seed=1, process_index=0, process_count=1)
    reference = [(record["source"], record["id"]) for record in _take(iter(stream), 150)]
    iterator = iter(stream)
    _take(iterator, 77)
    state = json.loads(json.dumps(iterator.get_state()))
    assert set(state["sources"]) == {"web", "curated"} and state["count"] == 77
    resumed = iter(stream)
    resumed.set_state(state)
    assert [(record["source"], record["id"]) for record in _take(resumed, 73)] == reference[77:]


def test_mixture_restarts_or_ends_when_a_source_runs_out(shard_dir):
    ended = iter(_mixture(shard_dir, on_exhausted="end", web_weight=0.5).stream(seed=0, process_index=0, process_count=1))
    records = list(ended)  # the 30 demo records run out first, after about 60 examples
    assert collections.Counter(record["source"] for record in records)["curated"] == 30
    assert len(records) < 30 + NUM_SHARDS * PER_SHARD
    restarted = iter(_mixture(shard_dir, web_weight=0.5).stream(seed=0, process_index=0, process_count=1))
    curated = [record for record in _take(restarted, 400) if record["source"] == "curated"]
    assert {record["epoch"] for record in curated} >= {0, 1, 2}
    first_epoch = [record["id"] for record in curated if record["epoch"] == 0]
    assert sorted(first_epoch) == sorted(set(first_epoch)) and len(first_epoch) == 30


def test_an_ended_mixture_ends_the_run_with_a_final_checkpoint(tmp_path, caplog):
    """on_exhausted="end": the 32 examples of one half-weighted source run out after about 64 examples,
    i.e. within 4 batches of 16, long before step 40; the run stops there, saving the last step."""
    from siglip_jax.config import source_config
    from siglip_jax.training import trainer
    from tests.helpers import tiny_config

    config = tiny_config(total_steps=40, checkpoint_every_steps=100)
    config.data.train = source_config("mixture", on_exhausted="end", sources={
        name: dict(kind="demo", weight=0.5, args=dict(split="train", size=32, image_size=16)) for name in ("a", "b")})
    with caplog.at_level("WARNING", logger="siglip_jax.training.trainer"):
        trainer.train(config, str(tmp_path))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= max(steps) <= 5 and steps == list(range(1, max(steps) + 1))
    assert checkpoint.latest_step(str(tmp_path)) == max(steps)
    assert f"The data ended before step {max(steps) + 1}" in caplog.text


def test_mixture_config_errors(shard_dir):
    with pytest.raises(ValueError, match="valid: restart, end"):
        make_source("mixture", sources={"a": dict(kind="demo")}, on_exhausted="stop")
    with pytest.raises(ValueError, match="weights must be positive"):
        make_source("mixture", sources={"a": dict(kind="demo", weight=0, args=dict(split="train"))})
