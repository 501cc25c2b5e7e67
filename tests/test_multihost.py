"""Multi-host training and evaluation, for real: `train.py` as 2 OS processes x 4 CPU devices joined by
jax.distributed on localhost, against 1 process x 8 devices with the same recipe.

Training: each process loads only its block of every global batch, so the global batch is the 1-process
one, row for row; the losses still differ in the last bits, because the cross-process collectives (gloo)
sum the devices' partial results in another order than the in-process ones.

Evaluation: each process reads and embeds only its share of the eval set. Compared on the same
parameters, a 2-process eval equals the 1-process one exactly. Comparing the two training runs' evals
would not test that: after 3 steps the 24-item eval has near-ties that the last-bit differences above
flip (one rank in recall@1)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import child_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "multihost_recipe.py")
EVAL_DRIVER = os.path.join(REPO, "tests", "multihost_eval.py")
TOTAL_STEPS = 3
RUN_TIMEOUT_S = 600  # a wedged collective never returns; the test ends its children (a loaded 2-core machine took 6 min)
LOSS_TOLERANCE = 1e-6  # relative: at a loss of ~10, 1e-6 absolute would be a single float32 ulp


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _start(program: str, log_prefix: str, num_processes: int, devices_per_process: int, flags: tuple[str, ...]) -> list:
    """Starts `program` as `num_processes` processes, each leading its own process group."""
    coordinator = f"localhost:{_free_port()}"
    children = []
    for process_id in range(num_processes):
        command = [sys.executable, program, f"--local_device_count={devices_per_process}",
                   f"--num_processes={num_processes}", *flags]
        if num_processes > 1:
            command += [f"--coordinator_address={coordinator}", f"--process_id={process_id}"]
        log_path = f"{log_prefix}.process{process_id}.log"
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            child = subprocess.Popen(command, cwd=REPO, env=child_environment(None), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        children.append((child, log_path))
    return children


def _wait(*runs: list) -> None:
    """Waits for every child of `runs` (started together, so they share the machine); on a failure or
    timeout, kills every child's process group and fails with the failed logs' tails."""
    children = [child for run in runs for child in run]
    try:
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
        pytest.fail(f"children failed or ran past {RUN_TIMEOUT_S} s:\n{tails}")


def _train(workdir: str, num_processes: int, devices_per_process: int, extra_flags: tuple[str, ...] = ()) -> list:
    return _start(os.path.join(REPO, "train.py"), workdir, num_processes, devices_per_process,
                  (f"--config={RECIPE}", f"--workdir={workdir}", *extra_flags))


def _metrics_by_step(workdir: str) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as stream:
        return {entry["step"]: entry for entry in map(json.loads, stream)}


def _reference_eval(workdir: str, step: int) -> dict[str, float]:
    """The evals of the recipe on `workdir`'s checkpoint `step`, here: one process of 8 devices, through
    eval.py's path (runner.evaluate_params)."""
    from siglip_jax.data.from_config import build_source, build_tokenizer
    from siglip_jax.evaluation import runner
    from siglip_jax.io import loading
    from siglip_jax.runtime import sharding
    from tests import multihost_recipe

    config = multihost_recipe.get_config()
    mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axis_names)
    params = loading.load_model(workdir, step=step, mesh=mesh).params
    return runner.evaluate_params(config, params, build_tokenizer(config), build_source, mesh)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    """Slow (73-82 s under two workers, 2026-12-06): seven real processes (two training runs, a 2-process eval, two resumed
    runs), each a Python + JAX start-up; a process boundary is what this tests."""
    single, multi = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    _wait(_train(single, num_processes=1, devices_per_process=8), _train(multi, num_processes=2, devices_per_process=4))

    expected, got = _metrics_by_step(single), _metrics_by_step(multi)
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL_STEPS + 1)), "process 0 logs every step, once"
    differences = {step: abs(got[step]["loss"] - expected[step]["loss"]) / abs(expected[step]["loss"]) for step in expected}
    assert max(differences.values()) <= LOSS_TOLERANCE, f"relative loss difference per step: {differences}"
    # Process 0 alone writes the metrics; every process writes its shards of the final checkpoint.
    assert not [name for name in os.listdir(multi) if name.startswith("metrics") and name != "metrics.jsonl"]
    assert os.path.isdir(os.path.join(multi, "checkpoints", str(TOTAL_STEPS)))

    # At once: the 2-process checkpoint evaluated again by 2 processes that count the records each reads;
    # both runs resumed to step 5 as 1 process x 8 devices (the 2-process checkpoint, its shards written by
    # two processes and two data positions, restores onto one process and continues the same stream).
    longer = ("--config.total_steps=5",)
    evaluated = str(tmp_path / "eval")
    runs = [_start(EVAL_DRIVER, evaluated, 2, 4, (f"--workdir={multi}", f"--step={TOTAL_STEPS}", f"--output={evaluated}")),
            _train(single, 1, 8, longer), _train(multi, 1, 8, longer)]
    reference = _reference_eval(multi, TOTAL_STEPS)  # meanwhile, in this process: 1 x 8 on the same parameters
    _wait(*runs)

    recalls = sorted(key for key in reference if key.startswith("retrieval/"))
    assert "retrieval/image_to_text/recall@1" in recalls and reference["retrieval/num_images"] == 24
    # The training run's own 2-process eval at step 3 saw these parameters: equal, rank for rank.
    assert {key: got[TOTAL_STEPS][key] for key in recalls} == {key: reference[key] for key in recalls}
    shares = [json.load(open(f"{evaluated}.process{index}.json")) for index in range(2)]
    for share in shares:
        assert share["metrics"] == reference
    # Each process read (and decoded) only its half of the 24 records, each record once.
    assert [share["read"]["retrieval"] for share in shares] == [list(range(12)), list(range(12, 24))]

    for workdir in (single, multi):
        assert "Resumed from step 3" in open(f"{workdir}.process0.log", errors="replace").read()
    expected, got = _metrics_by_step(single), _metrics_by_step(multi)
    for step in (4, 5):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=LOSS_TOLERANCE), step
