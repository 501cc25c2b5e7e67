"""Storage servers on 127.0.0.1 for the remote-storage tests: the pure-Python GCS emulator
(gcp-storage-emulator) and moto's S3 server, each on a free port, started and stopped by PID within
timeouts; the environment points gcsfs, s3fs and tensorstore at them."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
GCS_BUCKET, S3_BUCKET = "siglip-test", "siglip-test-s3"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(command, port, log_path):
    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(log_path))
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, log
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"{command[0]} did not start on port {port} within {START_TIMEOUT_S} s; see {log_path}")
            time.sleep(0.2)


def _stop(process, log):
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


def _tool(name):
    found = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(found):
        raise RuntimeError(f"{name} is not installed (pip install -r requirements-test.txt)")
    return found


def start_servers(directory):
    """Starts both servers; returns (client environment, gs:// bucket, s3:// bucket, stop())."""
    gcs_port, s3_port = _free_port(), _free_port()
    gcs = _serve([_tool("gcp-storage-emulator"), "start", "-H", "127.0.0.1", "--port", str(gcs_port),
                  "--default-bucket", GCS_BUCKET, "--in-memory", "-q"], gcs_port, os.path.join(directory, "gcs.log"))
    try:
        s3 = _serve([_tool("moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], s3_port, os.path.join(directory, "s3.log"))
    except RuntimeError:
        _stop(*gcs)
        raise
    env = {
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_port}",  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{gcs_port}",  # tensorstore (Orbax's arrays)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed token, no search for credentials
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",  # s3fs (botocore) and tensorstore
        # gcsfs (2026.10) otherwise asks GCS's control plane, absent from the emulator, for each bucket's
        # layout, and logs a warning for every failed lookup.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }

    def stop():
        _stop(*gcs)
        _stop(*s3)

    return env, f"gs://{GCS_BUCKET}", f"s3://{S3_BUCKET}", stop


@pytest.fixture(scope="session")
def storage_servers(tmp_path_factory):
    """{"env": variables for clients (also for subprocesses), "gs": bucket URL, "s3": bucket URL}."""
    try:
        env, gs_bucket, s3_bucket, stop = start_servers(str(tmp_path_factory.mktemp("servers")))
    except RuntimeError as error:
        pytest.skip(str(error))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(S3_BUCKET)
        yield {"env": env, "gs": gs_bucket, "s3": s3_bucket}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop()
