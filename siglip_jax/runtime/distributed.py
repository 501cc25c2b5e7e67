"""Multi-process start-up: connects this process to the others with `jax.distributed.initialize` before
anything else touches JAX. One process per host (TPU pods, one per node or per GPU on SLURM), or
several on one machine for tests.

Where the values come from, first match wins:
  1. arguments (train.py's --coordinator_address, --num_processes, --process_id, --local_device_count);
  2. environment variables SIGLIP_COORDINATOR_ADDRESS ("host:port" of process 0), SIGLIP_NUM_PROCESSES,
     SIGLIP_PROCESS_ID, SIGLIP_LOCAL_DEVICE_COUNT;
  3. JAX's own cluster detection when a launcher is recognised: Cloud TPU VMs (pod slices), SLURM
     (srun with more than one task), Open MPI (mpirun with more than one rank);
  4. otherwise a single process, and nothing is initialised.
`num_processes=1` forces a single process even inside a launcher's environment.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from typing import Mapping, Sequence

import jax

logger = logging.getLogger(__name__)

ENV_COORDINATOR_ADDRESS = "SIGLIP_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SIGLIP_NUM_PROCESSES"
ENV_PROCESS_ID = "SIGLIP_PROCESS_ID"
ENV_LOCAL_DEVICE_COUNT = "SIGLIP_LOCAL_DEVICE_COUNT"
# cpu_devices_per_core makes at most this many CPU devices: each device holds a copy of the parameters and optimizer state
# (the default mesh replicates them over the data axis), so many cores must not mean many copies.
MAX_CPU_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started: `how` is "single process", "explicit" or a launcher's name (then
    the process count and id are JAX's to detect, and the fields here keep their defaults)."""

    how: str
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_count: int | None = None


def _int_or_none(value: int | str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; pass a whole number, e.g. {name}=2.") from None


def detect_launcher(environ: Mapping[str, str] = os.environ) -> str | None:
    """The name of a multi-process launcher whose environment this process runs in, or None.

    A one-task SLURM job or a one-rank mpirun is not multi-process, so it is not reported. Any Cloud
    TPU VM is (a pod slice's workers learn their peers from the TPU metadata; on one host it is a
    single process and initialising is harmless)."""
    if _int_or_none(environ.get("SLURM_NTASKS"), "SLURM_NTASKS") not in (None, 1) and "SLURM_PROCID" in environ:
        return "SLURM"
    if _int_or_none(environ.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") not in (None, 1):
        return "Open MPI"
    # libtpu is only installed on TPU VMs (jax[tpu]); its absence rules out a pod without touching JAX.
    if importlib.util.find_spec("libtpu") is not None and "TPU_SKIP_MDS_QUERY" not in environ:
        return "Cloud TPU"
    return None


def resolve_launch(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Launch:
    """Decides how to start from arguments, then SIGLIP_* variables, then a recognised launcher; checks
    explicit values and says which are missing or wrong. Touches no JAX state."""
    coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR_ADDRESS) or None
    num_processes = num_processes if num_processes is not None else _int_or_none(environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int_or_none(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    if local_device_count is None:
        local_device_count = _int_or_none(environ.get(ENV_LOCAL_DEVICE_COUNT), ENV_LOCAL_DEVICE_COUNT)
    if local_device_count is not None and local_device_count < 1:
        raise ValueError(f"local_device_count={local_device_count} must be at least 1 (or unset for all devices).")

    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be at least 1.")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"process_id={process_id} with num_processes=1: the only process is 0.")
        return Launch("single process", local_device_count=local_device_count)

    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    given = {name for name, value in explicit.items() if value is not None}
    if given:
        missing = sorted(set(explicit) - given)
        if missing:
            raise ValueError(
                f"Got {', '.join(f'{name}={explicit[name]!r}' for name in sorted(given))} but not "
                f"{', '.join(missing)}: a multi-process run needs all three, on every process (flags "
                f"--{' --'.join(missing)}, or {ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}). "
                "Leave all three unset on TPU pods, SLURM and Open MPI, where they are detected."
            )
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"coordinator_address={coordinator_address!r} is not host:port; give process 0's address and "
                "a free port every process can reach, e.g. 10.0.0.1:1234."
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id={process_id} is outside 0..{num_processes - 1} for num_processes={num_processes}; "
                "number the processes 0, 1, ..., num_processes - 1, each once."
            )
        return Launch("explicit", coordinator_address, num_processes, process_id, local_device_count)

    launcher = detect_launcher(environ)
    if launcher is None:
        return Launch("single process", local_device_count=local_device_count)
    return Launch(launcher, local_device_count=local_device_count)


def cpu_devices_per_core(batch_sizes: Sequence[int], mesh_shape: Sequence[int], cores: int | None = None) -> int:
    """How many CPU devices a single process makes for a config with mesh.cpu_devices_per_core (train.py): one
    per core, data-parallel.

    XLA:CPU spreads each operation over the cores, but most of a small model's ~270 operations a step are too
    small to keep two cores busy, so one device per core, each running the whole step on its share of the
    batch, keeps them busier: configs/flickr8k.py's step took 0.78-0.94x the one-device time (2-core machine,
    2026-12-07, docs/speed.md). A larger model's operations already fill the cores and each device repeats
    the optimizer update, so it loses (S/16 at batch 32: 1.04-1.09x); hence the opt-in. The count divides every
    batch size and fits the mesh's fixed axes (a mesh with no -1 axis keeps JAX's own single CPU device); at
    most MAX_CPU_DEVICES."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shape = [int(size) for size in mesh_shape]
    if -1 not in shape:
        return 1
    fixed = math.prod(size for size in shape if size != -1)
    for count in range(min(cores, MAX_CPU_DEVICES), 0, -1):
        if count % fixed == 0 and all(size % count == 0 for size in batch_sizes):
            return count
    return 1


def _cpu_devices_chosen() -> bool:
    return ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices != -1)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    default_cpu_devices: int | None = None,
) -> Launch:
    """Joins this process to a multi-process run (see the module docstring for where values come
    from); a no-op for a single process. Must run before any other JAX call: JAX fixes its devices when
    the first one runs.

    `local_device_count`: the devices this process drives. On CPU it is the number of CPU devices JAX
    makes (several per process simulate a multi-host mesh); in a multi-process GPU run this process
    uses GPUs 0..local_device_count-1 of its node, for one process per node under SLURM or Open MPI
    (JAX's detection otherwise gives each process one GPU). Leave it unset on TPU.

    `default_cpu_devices`: the CPU devices a single process makes when neither local_device_count (flag or
    variable) nor XLA's --xla_force_host_platform_device_count says (train.py: cpu_devices_per_core). Only
    the CPU backend sees it: on a GPU or TPU machine JAX still trains on the accelerators.
    """
    launch = resolve_launch(coordinator_address, num_processes, process_id, local_device_count)
    if launch.local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", launch.local_device_count)
    elif launch.how == "single process" and default_cpu_devices and not _cpu_devices_chosen():
        jax.config.update("jax_num_cpu_devices", default_cpu_devices)
        # Said only where JAX trains on the CPU: a GPU or TPU machine ignores the CPU device count. Asking the
        # backend starts JAX, which is fine here: a single process has nothing left to configure.
        if default_cpu_devices > 1 and jax.default_backend() == "cpu":
            logger.warning("On CPU: %d devices, one per core, each training on its share of the batch "
                           "(--local_device_count=1 for one).", default_cpu_devices)
    if launch.how == "single process":
        return launch
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Cross-process collectives on CPU devices (tests, CPU clusters) need an implementation; gloo
        # runs over TCP with no extra install. Accelerators use their own collectives regardless.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local_device_ids = None if launch.local_device_count is None else list(range(launch.local_device_count))
    if launch.how == "Cloud TPU":
        local_device_ids = None  # JAX never restricts TPU devices; the TPU runtime owns them
        try:
            jax.distributed.initialize()
        except ValueError as error:  # a TPU VM outside a GCE/GKE pod: no peers to find
            logger.warning("Found libtpu but no TPU pod to join (%s); running as a single process.", error)
            return Launch("single process", local_device_count=launch.local_device_count)
    else:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator_address,
            num_processes=launch.num_processes if launch.how == "explicit" else None,
            process_id=launch.process_id if launch.how == "explicit" else None,
            local_device_ids=local_device_ids,
        )
    # jax.process_index() would start the backends here; callers read it once they need devices.
    logger.info("Joined a multi-process run (%s).", launch.how)
    return launch
