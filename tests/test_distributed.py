"""Where a process's place in a multi-process run comes from (distributed.resolve_launch): flags, then
SIGLIP_* variables, then a launcher's environment. Pure decisions on a given environment; the real
multi-process start is tests/test_multihost.py."""
import os
import subprocess
import sys

import pytest

from siglip_jax.runtime import distributed
from tests.helpers import child_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLURM_TWO_TASKS = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                   "SLURM_STEP_NODELIST": "node[1-2]"}


def test_no_values_and_no_launcher_is_a_single_process():
    assert distributed.resolve_launch(environ={}) == distributed.Launch("single process")


def test_explicit_values_from_arguments():
    launch = distributed.resolve_launch("10.0.0.1:1234", 4, 3, local_device_count=2, environ={})
    assert launch == distributed.Launch("explicit", "10.0.0.1:1234", 4, 3, 2)


def test_explicit_values_from_the_environment_and_arguments_win():
    environ = {"SIGLIP_COORDINATOR_ADDRESS": "host:99", "SIGLIP_NUM_PROCESSES": "2", "SIGLIP_PROCESS_ID": "1",
               "SIGLIP_LOCAL_DEVICE_COUNT": "4"}
    assert distributed.resolve_launch(environ=environ) == distributed.Launch("explicit", "host:99", 2, 1, 4)
    assert distributed.resolve_launch(process_id=0, environ=environ).process_id == 0


def test_a_partial_explicit_launch_names_what_is_missing():
    with pytest.raises(ValueError, match=r"num_processes=2.*not coordinator_address, process_id.*--coordinator_address"):
        distributed.resolve_launch(num_processes=2, environ={})


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("localhost", 2, 0), r"'localhost' is not host:port"),
        (("localhost:1", 2, 2), r"process_id=2 is outside 0\.\.1"),
        (("localhost:1", 0, 0), r"num_processes=0 must be at least 1"),
        ((None, 1, 1), r"process_id=1 with num_processes=1"),
    ],
)
def test_bad_explicit_values_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve_launch(*arguments, environ={})


def test_a_non_integer_variable_is_named():
    with pytest.raises(ValueError, match=r"SIGLIP_NUM_PROCESSES='two' is not an integer"):
        distributed.resolve_launch(environ={"SIGLIP_NUM_PROCESSES": "two"})


def test_launchers_are_recognised_only_with_several_processes():
    assert distributed.resolve_launch(environ=SLURM_TWO_TASKS).how == "SLURM"
    assert distributed.resolve_launch(environ={**SLURM_TWO_TASKS, "SLURM_NTASKS": "1"}).how == "single process"
    assert distributed.resolve_launch(environ={"OMPI_COMM_WORLD_SIZE": "8"}).how == "Open MPI"
    assert distributed.resolve_launch(environ={"OMPI_COMM_WORLD_SIZE": "1"}).how == "single process"


def test_one_process_overrides_a_launcher():
    assert distributed.resolve_launch(num_processes=1, environ=SLURM_TWO_TASKS).how == "single process"


def test_a_single_process_initialize_touches_nothing():
    # jax.distributed.initialize refuses once JAX has run, as it has in this pytest process.
    launch = distributed.initialize(num_processes=1)
    assert launch.how == "single process"


@pytest.mark.parametrize(
    "batch_sizes, mesh_shape, cores, expected",
    [
        ((128, 200), (-1, 1, 1), 2, 2),  # one per core
        ((128, 200), (-1, 1, 1), 3, 2),  # 3 does not divide 128: the largest count that does
        ((7, 7), (-1, 1, 1), 2, 1),  # an odd batch stays on one device
        ((128, 256), (-1, 1, 1), 64, 8),  # at most MAX_CPU_DEVICES copies of the parameters
        ((128, 256), (-1, 2, 1), 2, 2),  # a fixed fsdp axis of 2: counts that are multiples of 2
        ((128, 256), (-1, 2, 1), 3, 2),
        ((128, 256), (1, 2, 1), 2, 1),  # no -1 axis: the mesh is the user's, JAX's one CPU device stays
    ],
)
def test_cpu_devices_per_core(batch_sizes, mesh_shape, cores, expected):
    assert distributed.cpu_devices_per_core(batch_sizes, mesh_shape, cores) == expected


@pytest.mark.parametrize(
    "environment, expected",
    [
        ({}, 3),  # nobody chose: the default given by train.py
        ({"SIGLIP_LOCAL_DEVICE_COUNT": "1"}, 1),  # the variable (and --local_device_count) wins
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}, 5),  # so does XLA's own flag
    ],
)
def test_default_cpu_devices_yield_to_a_choice(environment, expected):
    """A real JAX process each: the device count is fixed when its backends start."""
    program = ("from siglip_jax.runtime import distributed; distributed.initialize(default_cpu_devices=3); "
               "import jax; print(jax.device_count())")
    env = {**child_environment(None), **environment}
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(expected)
