"""gs:// and s3:// for data and workdirs, against real servers on 127.0.0.1 (tests/remote_servers.py):
shards streamed from a bucket, metrics.jsonl in a bucket, Orbax checkpoints in a bucket, clear errors for
a missing bucket or shard, bounded retries; and a train -> SIGKILL -> rerun -> eval -> export run whose
workdir and shards are in the emulated GCS bucket."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import numpy as np
import pytest

from siglip_jax.data.sources import make_source
from siglip_jax.evaluation import command
from siglip_jax.inference import search
from siglip_jax.io import checkpoint, formats, loading
from siglip_jax.runtime import storage
from siglip_jax.training import metrics
from tests import test_resume
from tests.helpers import child_environment
from tests.remote_servers import storage_servers  # noqa: F401 -- a fixture
from tests.test_streaming import NUM_SHARDS, _jpeg, PER_SHARD, _shard_members, _take, _write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _upload_shards(tmp_path, bucket_url, count=NUM_SHARDS):
    prefix = f"{bucket_url}/shards-{uuid.uuid4().hex[:8]}"
    for shard in range(count):
        local = tmp_path / f"{shard:05d}.tar"
        _write_tar(local, list(_shard_members(shard)))
        fsspec.open(f"{prefix}/{shard:05d}.tar", "wb").open().close()  # creates the client for the scheme
        with fsspec.open(f"{prefix}/{shard:05d}.tar", "wb") as stream:
            stream.write(local.read_bytes())
    return f"{prefix}/{{00000..{count - 1:05d}}}.tar"


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_shards_stream_from_a_bucket(storage_servers, tmp_path, scheme):  # noqa: F811
    pattern = _upload_shards(tmp_path, storage_servers[scheme])
    source = make_source("webdataset_stream", shards=pattern, shuffle_buffer=8, open_shards=2)
    records = _take(iter(source.stream(seed=0, process_index=0, process_count=1, num_epochs=1)), NUM_SHARDS * PER_SHARD)
    assert sorted(record["id"] for record in records) == sorted(f"{s:02d}{i:03d}" for s in range(NUM_SHARDS) for i in range(PER_SHARD))
    with pytest.raises(FileNotFoundError, match="first shard"):
        make_source("webdataset_stream", shards=f"{storage_servers[scheme]}/nothing-here/{{00000..00003}}.tar")


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_metrics_jsonl_in_a_bucket(storage_servers, scheme, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    path = f"{storage_servers[scheme]}/run-{uuid.uuid4().hex[:8]}/metrics.jsonl"
    writer = metrics.JsonlWriter(path)
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    metrics.JsonlWriter(path, keep_through_step=2)  # a resumed run drops the later steps
    with fsspec.open(path, "r") as stream:
        assert [json.loads(line)["step"] for line in stream] == [1, 2]
    assert not os.path.exists(tmp_path / f"{scheme}:"), "nothing may be written to a local folder named after the scheme"


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_search_index_in_a_bucket(storage_servers, scheme, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    index = search.Index(paths=["/photos/a.jpg", "/photos/b.jpg"], embeddings=np.eye(2, 3, dtype=np.float32),
                         model="/models/m.msgpack", weights="ema")
    path = f"{storage_servers[scheme]}/index-{uuid.uuid4().hex[:8]}.npz"
    search.save_index(path, index)
    with fsspec.open(path, "rb") as stream:  # an object in the bucket, read by another client
        assert stream.read(2) == b"PK"  # the .npz (zip) written whole
    loaded = search.load_index(path)
    assert (loaded.paths, loaded.model, loaded.weights) == (index.paths, index.model, index.weights)
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    assert not os.path.exists(tmp_path / f"{scheme}:"), "nothing may be written to a local folder named after the scheme"


def test_missing_bucket_is_a_start_up_error(storage_servers):  # noqa: F811
    with pytest.raises(PermissionError, match="bucket 'no-such-bucket-x' exists"):
        storage.check_writable("gs://no-such-bucket-x/run")
    storage.check_writable(f"{storage_servers['gs']}/run-ok")


def test_tensorstore_follows_storage_emulator_host_and_keeps_explicit_settings():
    environ = {"STORAGE_EMULATOR_HOST": "127.0.0.1:9023"}
    assert storage.point_tensorstore_at_emulator(environ) == {
        "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:9023", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    explicit = {"STORAGE_EMULATOR_HOST": "http://a:1", "TENSORSTORE_GCS_HTTP_URL": "http://b:2"}
    storage.point_tensorstore_at_emulator(explicit)
    assert explicit["TENSORSTORE_GCS_HTTP_URL"] == "http://b:2"
    assert storage.point_tensorstore_at_emulator({}) == {}


def test_a_bucket_tensorstore_cannot_reach_is_a_bounded_start_up_error(storage_servers, monkeypatch):  # noqa: F811
    """gcsfs reaches the emulator, tensorstore (Orbax's arrays) an endpoint where nothing listens: the
    start-up check gives up after its timeout and names the bucket, the endpoint and the settings."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", dead)
    workdir = f"{storage_servers['gs']}/run-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with pytest.raises(PermissionError) as raised:
        storage.check_writable(workdir, timeout_s=2)
    assert time.monotonic() - started < 30
    message = str(raised.value)
    assert "\n" not in message
    assert f"Checkpoints cannot be written to {workdir}: tensorstore (Orbax's array writer) got no answer within 2 s from {dead}" in message
    assert f"TENSORSTORE_GCS_HTTP_URL={dead}" in message and f"STORAGE_EMULATOR_HOST={storage_servers['env']['STORAGE_EMULATOR_HOST']}" in message


def test_an_upload_to_a_bucket_that_never_answers_fails_after_bounded_retries(tmp_path):
    """gcsfs's own requests have no timeout: before configure_bucket_clients an upload waited forever."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    (tmp_path / "file.txt").write_text("x")
    code = ("import sys; from siglip_jax.runtime import storage; storage.GCS_REQUEST_TIMEOUT_S = 1; "
            "storage.configure_bucket_clients(); storage.upload(sys.argv[1], 'gs://bucket/file.txt')")
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{silent.getsockname()[1]}", "PYTHONPATH": REPO}
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "file.txt")], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        silent.close()
    assert done.returncode != 0 and time.monotonic() - started < 60
    assert "Writing gs://bucket/file.txt failed 5 times, the last with FSTimeoutError" in done.stderr, done.stderr[-2000:]


def test_a_checkpoint_saves_to_an_emulator_named_by_storage_emulator_host_alone(storage_servers, monkeypatch):  # noqa: F811
    """What a user of a GCS emulator sets is STORAGE_EMULATOR_HOST; before issue 29 tensorstore ignored it and
    the first save waited forever on storage.googleapis.com."""
    import jax.numpy as jnp

    from siglip_jax.data import pipeline, preprocess
    from siglip_jax.data.demo import DemoSource
    from siglip_jax.data.tokenizers import ByteTokenizer
    from tests.helpers import tiny_config

    for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        monkeypatch.delenv(name)
    workdir = f"{storage_servers['gs']}/run-{uuid.uuid4().hex[:8]}"
    storage.check_checkpoint_location(workdir)  # train.py's start-up: derives tensorstore's settings
    storage.check_writable(workdir, timeout_s=30)
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == storage_servers["env"]["STORAGE_EMULATOR_HOST"]
    batches = pipeline.train_batches(DemoSource("train", 40, 16), tokenizer=ByteTokenizer(12),
                                     options=preprocess.ImageOptions(16), local_batch_size=4, seed=0)
    with checkpoint.Checkpointer(workdir, save_timeout_s=60) as checkpointer:
        checkpointer.save(1, {"w": jnp.ones((4, 4))}, batches, tiny_config())
    assert checkpoint.latest_step(workdir) == 1


def test_a_save_the_bucket_stops_answering_ends_in_one_line_naming_it(storage_servers, monkeypatch, caplog):  # noqa: F811
    """The start-up check passed, then the endpoint stops answering (a listener that never replies): the save
    is bounded by its timeout and ends in an error naming the checkpoint folder, the endpoint and the settings."""
    import jax.numpy as jnp

    from siglip_jax.data import pipeline, preprocess
    from siglip_jax.data.demo import DemoSource
    from siglip_jax.data.tokenizers import ByteTokenizer
    from tests.helpers import tiny_config

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts connections into its backlog and never answers
    try:
        batches = pipeline.train_batches(DemoSource("train", 40, 16), tokenizer=ByteTokenizer(12),
                                         options=preprocess.ImageOptions(16), local_batch_size=4, seed=0)
        workdir = f"{storage_servers['gs']}/run-{uuid.uuid4().hex[:8]}"
        checkpointer = checkpoint.Checkpointer(workdir, save_timeout_s=3)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", silent_url)
        started = time.monotonic()
        checkpointer.save(1, {"w": jnp.ones((4, 4))}, batches, tiny_config())
        with pytest.raises(TimeoutError) as raised:
            checkpointer.close()
        assert time.monotonic() - started < 60
    finally:
        silent.close()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"Saving a checkpoint under {workdir}/checkpoints did not finish within 3 s (endpoint {silent_url}; "
                              f"settings: STORAGE_EMULATOR_HOST={storage_servers['env']['STORAGE_EMULATOR_HOST']}, ")
    assert not any(record.exc_info for record in caplog.records if record.name == "absl")  # no traceback in the log


def test_checkpointer_in_a_bucket_starts_fresh_and_drops_a_killed_save(storage_servers):  # noqa: F811
    workdir = f"{storage_servers['gs']}/run-{uuid.uuid4().hex[:8]}"
    with checkpoint.Checkpointer(workdir) as checkpointer:  # a bucket has no empty folder: nothing there yet
        assert checkpointer.latest_step() is None
    # What a save killed midway leaves in a bucket (Orbax writes steps in place there): its objects, no
    # commit_success.txt. Orbax deletes such a step at start-up; nothing may list it after that.
    root = storage.path(checkpoint.checkpoint_root(workdir))
    (root / "20" / "state").mkdir(parents=True, exist_ok=True)
    (root / "20" / "state" / "params.w").write_bytes(b"half")
    with checkpoint.Checkpointer(workdir) as checkpointer:
        assert checkpointer.latest_step() is None and checkpointer.all_steps() == []
    assert storage.list_folder(root) == []


def test_a_folder_moves_within_a_bucket(storage_servers):  # noqa: F811
    """How checkpoint.py sets an unreadable step aside: buckets have no rename and no empty folders."""
    root = storage.path(f"{storage_servers['gs']}/run-{uuid.uuid4().hex[:8]}")
    for name, data in (("10/state/a", b"a"), ("10/state/b/0", b"b0"), ("10/commit_success.txt", b"")):
        (root / name).write_bytes(data)
    storage.move_tree(root / "10", root / "broken" / "10.x")
    assert [path.name for path in storage.list_folder(root)] == ["broken"]
    moved = root / "broken" / "10.x"
    assert (moved / "state" / "a").read_bytes() == b"a" and (moved / "state" / "b" / "0").read_bytes() == b"b0"
    assert (moved / "commit_success.txt").exists()
    with pytest.raises(FileNotFoundError, match="holds no objects"):
        storage.move_tree(root / "nothing", root / "broken" / "nothing")


def test_unreadable_bucket_shards_are_a_start_up_error_naming_the_fix(monkeypatch):
    from etils import epath

    class DefaultCredentialsError(Exception):  # what google.auth raises without credentials
        pass

    def no_credentials(path):
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(epath.gpath.PosixGPath, "exists", no_credentials)
    with pytest.raises(PermissionError, match=r"first shard 'gs://data-x/web/00000.tar'.*credentials were not found.*"
                                              r"bucket 'data-x' exists and that credentials are set"):
        make_source("webdataset_stream", shards="gs://data-x/web/{00000..00009}.tar")


def test_transient_failures_are_retried_then_reported():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "read"

    assert storage.with_retries(flaky, "Reading x", first_wait_s=0.01) == "read" and len(calls) == 3
    with pytest.raises(OSError, match="Reading y failed 3 times, the last with TimeoutError"):
        storage.with_retries(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "Reading y", retries=2, first_wait_s=0.01)


def test_s3_workdir_is_refused_at_start_up_with_the_fix():
    with pytest.raises(ValueError, match="checkpoints cannot be written to s3://.*Use a gs:// or a local workdir"):
        storage.check_checkpoint_location("s3://bucket/run")
    storage.check_checkpoint_location("gs://bucket/run")
    storage.check_checkpoint_location("relative/run")
    from siglip_jax.training import trainer
    from tests.helpers import tiny_config

    with pytest.raises(ValueError, match="checkpoints cannot be written to s3://"):  # before anything is built
        trainer.train(tiny_config(), "s3://bucket/run")


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_tensorboard_events_reach_a_bucket(storage_servers, scheme, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    logdir = f"{storage_servers[scheme]}/run-{uuid.uuid4().hex[:8]}/tensorboard"
    writer = metrics.TensorBoardWriter(logdir)
    writer.write(1, {"loss": 2.5})
    [name] = os.listdir(writer.mirror.local)
    with fsspec.open(f"{logdir}/{name}", "rb") as stream:  # synced after each write, before close
        after_first = stream.read()
    writer.write(2, {"loss": 1.5})
    writer.close()
    with fsspec.open(f"{logdir}/{name}", "rb") as stream:
        remote = stream.read()
    assert name.startswith("events.out.tfevents") and remote == open(os.path.join(writer.mirror.local, name), "rb").read()
    assert len(remote) > len(after_first) > 0
    assert not os.path.exists(tmp_path / f"{scheme}:")


E2E_STEPS = 20  # checkpoints at 10 and 20 (the recipe saves every 10 steps)
E2E_TIMEOUT_S = 900  # per train.py run: ~1 min alone on 2 cores, many times that beside the whole suite
# One device: Orbax writes one object per array chunk, and the emulator rewrites its whole object table
# (JSON) on every insert, so a save's cost grows with objects x objects already stored. One chunk per array
# (no 8-way sharding) cuts a save of the recipe's 255 arrays from ~1,100 requests to ~550.
# SGD without momentum and no EMA: the state is the parameters and one buffer like them, half the arrays
# (and requests) of Adam's two moments and the EMA. What is saved does not matter here, where it goes does;
# the bitwise resume of Adam and the EMA is tests/test_resume.py's. It is also the single-device step of
# tests/test_train_step.py (SGD at 0.5), which the session's compilation cache may then already hold (not verified).
E2E_OVERRIDES = (f"--config.total_steps={E2E_STEPS}", "--config.tensorboard=True", "--config.optim.name=sgd",
                 "--config.optim.learning_rate=0.5", "--config.optim.b1=0.0", "--config.optim.ema_decay=0.0")


def _start(workdir, shards, env, log):
    command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={test_resume.RECIPE}:{shards}", f"--workdir={workdir}",
               *E2E_OVERRIDES]
    environment = child_environment(1, **env, PYTHONUNBUFFERED="1")
    # Only what a user of a GCS emulator sets: train.py derives tensorstore's settings from
    # STORAGE_EMULATOR_HOST (without them its first checkpoint save waited forever, issue 29).
    for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        environment.pop(name)
    with open(log, "ab") as stream:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=stream, stderr=subprocess.STDOUT)


def _remote_metrics(workdir):
    path = storage.path(workdir) / "metrics.jsonl"
    if not path.exists():
        return {}
    return {entry["step"]: entry for entry in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_train_kill_rerun_eval_export_in_a_bucket(storage_servers, tmp_path):  # noqa: F811
    """The workdir in the emulated GCS bucket, shards read from it and from the S3 one: train, SIGKILL
    after the step-10 checkpoint, rerun (resumes), then eval and export (their engines, in this process) into
    the bucket and back; nothing lands in a local gs: folder. Slow (72-84 s under two workers, 2026-12-06): two train.py starts
    against the single-threaded emulator, which rewrites its object table on every write."""
    gs_shards = _upload_shards(tmp_path, storage_servers["gs"], count=2)
    s3_shards = _upload_shards(tmp_path, storage_servers["s3"], count=4).replace("{00000..00003}", "{00002..00003}")
    shards = f"{gs_shards};{s3_shards}"
    workdir = f"{storage_servers['gs']}/run-{uuid.uuid4().hex[:8]}"
    log = str(tmp_path / "train.log")
    process = _start(workdir, shards, storage_servers["env"], log)
    checkpoints = storage.path(workdir) / "checkpoints"
    # On GCS Orbax writes a step in place and marks it complete last (no atomic rename in buckets).
    test_resume._wait_for(lambda: (checkpoints / "10" / "commit_success.txt").exists(), process, log, timeout=E2E_TIMEOUT_S)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.latest_step(workdir) == 10, "the kill came after the step-20 save: the rerun would not resume"
    assert test_resume._finish(_start(workdir, shards, storage_servers["env"], log), log, timeout=E2E_TIMEOUT_S) == 0, open(log).read()[-3000:]
    resumed = _remote_metrics(workdir)
    assert sorted(resumed) == list(range(1, E2E_STEPS + 1))
    assert "Resumed from step 10" in open(log).read()
    assert np.isfinite(resumed[E2E_STEPS]["loss"]) and resumed[E2E_STEPS]["data/epoch"] >= 0
    assert checkpoint.latest_step(workdir) == E2E_STEPS

    image = tmp_path / "photo.jpg"
    image.write_bytes(_jpeg(5))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": str(image), "text": "photo 5 of set 0"}) + "\n")
    # eval.py's and export.py's engines, in this process (the storage servers' environment is set here
    # too): the CLIs' own flag handling is tested in tests/test_workdir_tools.py and tests/test_cli.py.
    command.write_output(command.run(None, workdir, None, str(pairs)), f"{workdir}/eval.json")
    [scored] = json.loads((storage.path(workdir) / "eval.json").read_text())["pairs"]
    assert scored["text"] == "photo 5 of set 0" and 0 <= scored["probability"] <= 1
    formats.export_model(loading.load_model(workdir), "params", f"{workdir}/export/model.msgpack")
    assert (storage.path(workdir) / "export" / "model.msgpack").stat().length > 0
    # The export read back from the bucket is the same model: the same pair probability as the workdir's.
    [from_export] = command.run(None, None, f"{workdir}/export/model.msgpack", str(pairs))["pairs"]
    assert from_export["probability"] == pytest.approx(scored["probability"], abs=1e-6)
    # Both runs' TensorBoard events reach the bucket (tensorboardX writes locally; storage.LocalMirror copies).
    events = [name.name for name in (storage.path(workdir) / "tensorboard").iterdir() if name.name.startswith("events.out.tfevents")]
    assert len(events) == 2, events
    for scheme in ("gs:", "s3:"):
        assert not os.path.exists(os.path.join(REPO, scheme)) and not os.path.exists(tmp_path / scheme)
