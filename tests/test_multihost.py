"""Multi-host training, for real: `train.py` as 2 OS processes x 4 CPU devices joined by
jax.distributed on localhost, against 1 process x 8 devices with the same recipe. Each process loads
only its share of the data, so the global batch is a permutation of the 1-process one; the contrastive
loss sums over pairs and is invariant to it, so the losses match up to float summation order."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "multihost_recipe.py")
TOTAL_STEPS = 3
RUN_TIMEOUT_S = 120  # a wedged collective never returns; the test ends its children instead
LOSS_TOLERANCE = 1e-6  # relative: at a loss of ~10, 1e-6 absolute would be a single float32 ulp


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _child_environment() -> dict:
    # The device count comes from --local_device_count; the pytest process's forced count of 8
    # (tests/conftest.py) must not leak into the children.
    xla_flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                         if "xla_force_host_platform_device_count" not in flag)
    return dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")


def _launch(workdir: str, num_processes: int, devices_per_process: int, extra_flags: tuple[str, ...] = ()) -> None:
    """Runs train.py as `num_processes` processes and waits for all; on a failure or timeout, kills
    every child's process group (each child leads its own) and fails with the logs' tails."""
    coordinator = f"localhost:{_free_port()}"
    children = []
    try:
        for process_id in range(num_processes):
            command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={RECIPE}", f"--workdir={workdir}",
                       f"--local_device_count={devices_per_process}", f"--num_processes={num_processes}"]
            if num_processes > 1:
                command += [f"--coordinator_address={coordinator}", f"--process_id={process_id}"]
            command += list(extra_flags)
            log_path = f"{workdir}.process{process_id}.log"
            with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
                child = subprocess.Popen(command, cwd=REPO, env=_child_environment(), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            children.append((child, log_path))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while any(child.poll() is None for child, _ in children):
            if time.monotonic() > deadline or any(child.returncode not in (None, 0) for child, _ in children):
                break  # one failed process leaves the others waiting in a collective
            time.sleep(0.2)
    finally:
        for child, _ in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)  # only this child's own process group
                child.wait()
    failed = [(child.returncode, log_path) for child, log_path in children if child.returncode != 0]
    if failed:
        tails = "\n".join(f"--- {path} (exit {code}):\n" + open(path, errors="replace").read()[-3000:] for code, path in failed)
        pytest.fail(f"train.py as {num_processes} process(es) failed or ran past {RUN_TIMEOUT_S} s:\n{tails}")


def _metrics_by_step(workdir: str) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as stream:
        return {entry["step"]: entry for entry in map(json.loads, stream)}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    single, multi = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    _launch(single, num_processes=1, devices_per_process=8)
    _launch(multi, num_processes=2, devices_per_process=4)

    expected, got = _metrics_by_step(single), _metrics_by_step(multi)
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL_STEPS + 1)), "process 0 logs every step, once"
    differences = {step: abs(got[step]["loss"] - expected[step]["loss"]) / abs(expected[step]["loss"]) for step in expected}
    assert max(differences.values()) <= LOSS_TOLERANCE, f"relative loss difference per step: {differences}"
    # The eval at the end embeds inputs every process holds in full; recalls are counts over 24 items.
    recalls = sorted(key for key in expected[TOTAL_STEPS] if key.startswith("retrieval/"))
    assert recalls, f"no eval metrics at the last step: {sorted(expected[TOTAL_STEPS])}"
    # Known open regression (issue 12, the one embedder): with 2 processes the end-of-run eval can differ by
    # one rank from 1 process. Recorded here and reported as xfail at the end, after the checks below ran.
    eval_mismatches = {key: (got[TOTAL_STEPS][key], expected[TOTAL_STEPS][key]) for key in recalls
                       if got[TOTAL_STEPS][key] != pytest.approx(expected[TOTAL_STEPS][key], abs=1e-6)}
    # Process 0 alone writes the metrics; every process writes its shards of the final checkpoint.
    assert not [name for name in os.listdir(multi) if name.startswith("metrics") and name != "metrics.jsonl"]
    assert os.path.isdir(os.path.join(multi, "checkpoints", str(TOTAL_STEPS)))

    # Resume both runs to step 5 as 1 process x 8 devices: the two-process checkpoint (its shards written
    # by two processes, two data positions) restores onto one process and continues the same stream.
    longer = ("--config.total_steps=5",)
    _launch(single, num_processes=1, devices_per_process=8, extra_flags=longer)
    _launch(multi, num_processes=1, devices_per_process=8, extra_flags=longer)
    for workdir in (single, multi):
        assert "Resumed from step 3" in open(f"{workdir}.process0.log", errors="replace").read()
    expected, got = _metrics_by_step(single), _metrics_by_step(multi)
    for step in (4, 5):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=LOSS_TOLERANCE), step
    if eval_mismatches:
        pytest.xfail(f"2-process eval differs from 1 process (open, issue 12): {eval_mismatches}")
