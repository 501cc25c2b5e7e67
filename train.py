"""Train a SigLIP / CLIP model: python train.py --config configs/demo.py --workdir /tmp/demo

Multi-process runs (docs/multihost.md): on TPU pods, SLURM and Open MPI the processes find each other;
elsewhere give every process --coordinator_address, --num_processes and its own --process_id."""
from absl import flags
from ml_collections import config_flags

from siglip_jax.runtime import cli, compilation_cache, distributed
from siglip_jax.training import metrics, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and logs.")
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, compilation_cache.FLAG_HELP)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same on every process (or $SIGLIP_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (or $SIGLIP_NUM_PROCESSES); 1 forces one.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (or $SIGLIP_PROCESS_ID).")
_LOCAL_DEVICES = flags.DEFINE_integer(
    "local_device_count", None, "Devices this process drives: CPU devices to make (default: one, or one per core with "
    "mesh.cpu_devices_per_core), or GPUs per process (or $SIGLIP_LOCAL_DEVICE_COUNT).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    metrics.quiet_library_logs()
    compilation_cache.enable(_COMPILATION_CACHE.value, _WORKDIR.value)
    # Before anything else touches JAX: the devices are fixed by the first call.
    config = _CONFIG.value
    cpu_devices = None  # JAX's one CPU device
    if config.mesh.cpu_devices_per_core:
        cpu_devices = distributed.cpu_devices_per_core((config.data.batch_size, config.data.eval_batch_size),
                                                       config.mesh.shape)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICES.value,
                           default_cpu_devices=cpu_devices)
    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run_absl(main)
