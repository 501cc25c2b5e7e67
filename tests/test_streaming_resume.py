"""A run reading streamed WebDataset shards, killed (SIGKILL) and rerun, gives the same batches and losses
step by step as an uninterrupted run: the shard stream's position travels in the checkpoint."""
import os
import signal

import pytest

from siglip_jax.io import checkpoint
from tests import test_resume
from tests.test_streaming import _jpeg, _write_tar

NUM_SHARDS, PER_SHARD = 4, 40  # 160 samples: the 40 steps of 16 go through four epochs


def _start(workdir, shards):
    # the demo resume test's environment and logging, its recipe reading the shards
    return test_resume._start(workdir, recipe=f"{test_resume.RECIPE}:{shards}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream_shards")
    for shard in range(NUM_SHARDS):
        members = []
        for sample in range(PER_SHARD):
            key = f"{shard}{sample:03d}"
            members += [(f"{key}.jpg", _jpeg(7 * shard + sample)), (f"{key}.txt", f"photo {sample} of set {shard}".encode())]
        _write_tar(directory / f"{shard:05d}.tar", members)
    return os.path.join(str(directory), f"{{00000..{NUM_SHARDS - 1:05d}}}.tar")


@pytest.mark.slow
def test_sharded_run_resumes_bitwise_after_sigkill(shards, tmp_path):
    """Slow (~1 min on 2 cores): three train.py runs (uninterrupted, killed, rerun): a SIGKILL needs a
    process of its own."""
    reference = str(tmp_path / "uninterrupted")
    os.makedirs(reference)
    assert test_resume._finish(_start(reference, shards), reference) == 0
    uninterrupted = test_resume._metrics_by_step(reference)
    assert sorted(uninterrupted) == list(range(1, test_resume.TOTAL_STEPS + 1))
    assert uninterrupted[test_resume.TOTAL_STEPS]["data/epoch"] >= 3

    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    process = _start(workdir, shards)
    test_resume._wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "20")), process, workdir)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(test_resume._metrics_by_step(workdir)) < test_resume.TOTAL_STEPS, "finished before the kill"
    resumed_from = checkpoint.latest_step(workdir)
    assert resumed_from in (20, 30)
    assert test_resume._finish(_start(workdir, shards), workdir) == 0
    resumed = test_resume._metrics_by_step(workdir)
    for step in range(resumed_from + 1, test_resume.TOTAL_STEPS + 1):
        assert resumed[step]["data/batch_crc32"] == uninterrupted[step]["data/batch_crc32"], f"step {step}: another batch"
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], f"step {step}: loss differs"
        assert resumed[step]["data/epoch"] == uninterrupted[step]["data/epoch"]
