"""Per-device memory and step time of the sharded contrastive-loss variants.

Compiles value_and_grad of `contrastive_loss` with respect to both embeddings, t and b (what the
train step compiles) on 2, 4, 8 and 16 simulated CPU devices at a fixed per-device batch, and prints
the per-device temporary bytes from `compiled.memory_analysis()`. Then times each variant at 8
devices, as a ratio to `all_gather` measured in the same run (CPU timings rank the variants; they
are not accelerator timings).

    python bench/loss_memory.py [--batch_per_device 1024] [--width 768] [--chunk_size 256] \
        [--time_batch_per_device 256] [--losses sigmoid,softmax]
"""
import os

# Simulated devices must be configured before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=16")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

jax.config.update("jax_num_cpu_devices", 16)
jax.config.update("jax_platforms", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from siglip_jax.losses import contrastive  # noqa: E402


def variants(chunk_size):
    """Row label -> keyword arguments of contrastive_loss."""
    return {
        "all_gather": dict(implementation="all_gather"),
        f"chunked({chunk_size})": dict(implementation="chunked", chunk_size=chunk_size),
        "ring": dict(implementation="ring"),
        f"ring+chunked({chunk_size})": dict(implementation="ring", chunk_size=chunk_size),
    }


def compile_step(loss_name, options, num_devices, batch_per_device, width):
    """Compiled value_and_grad of the loss on a 1-D `data` mesh of the first num_devices devices."""
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:num_devices])
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    embeddings = jax.ShapeDtypeStruct((num_devices * batch_per_device, width), jnp.float32,
                                      sharding=batch_sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)

    def loss(images, texts, log_temperature, bias):
        return contrastive.contrastive_loss(images, texts, log_temperature, bias, name=loss_name,
                                       mesh=mesh, **options)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    return step.lower(embeddings, embeddings, scalar, scalar).compile(), batch_sharding, replicated


def seconds_per_step(steps_by_label, shape, rounds):
    """Fastest of `rounds` timed steps per variant, taken round-robin so that load from other
    processes on a shared machine hits every variant alike. Returns {label: seconds}."""
    inputs = {}
    for label, (compiled, batch_sharding, replicated) in steps_by_label.items():
        keys = jax.random.split(jax.random.key(0), 2)
        images, texts = (jax.device_put(jax.random.normal(k, shape), batch_sharding) for k in keys)
        scalars = [jax.device_put(jnp.float32(v), replicated) for v in (2.3, -10.0)]
        inputs[label] = (images, texts, *scalars)
        jax.block_until_ready(compiled(*inputs[label]))  # warm-up
    best = {label: float("inf") for label in steps_by_label}
    for _ in range(rounds):
        for label, (compiled, _, _) in steps_by_label.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs[label]))
            best[label] = min(best[label], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_per_device", type=int, default=1024, help="for memory")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--chunk_size", type=int, default=256, help="keys scored at once")
    parser.add_argument("--time_batch_per_device", type=int, default=256,
                        help="smaller than the memory batch: 8 simulated devices share the CPU; "
                             "the timed chunk is scaled by the same factor")
    parser.add_argument("--time_rounds", type=int, default=7)
    parser.add_argument("--losses", default="sigmoid,softmax")
    args = parser.parse_args()
    device_counts, timed_devices = (2, 4, 8, 16), 8
    time_chunk = args.chunk_size * args.time_batch_per_device // args.batch_per_device

    for loss_name in args.losses.split(","):
        print(f"\n{loss_name}: per-device temp MiB of value_and_grad, batch/device "
              f"{args.batch_per_device}, width {args.width}; step time at {timed_devices} devices "
              f"(batch/device {args.time_batch_per_device}, chunks of {time_chunk}) relative to "
              f"all_gather, fastest of {args.time_rounds}\n")
        print(f"| variant | {' | '.join(f'{n} dev' for n in device_counts)} | 8 / 2 dev "
              f"| 16 / 2 dev | time vs all_gather |")
        print("|---|" + "---:|" * (len(device_counts) + 3))
        temp = {label: [compile_step(loss_name, options, n, args.batch_per_device,
                                     args.width)[0].memory_analysis().temp_size_in_bytes
                        for n in device_counts]
                for label, options in variants(args.chunk_size).items()}
        timed = {label: compile_step(loss_name, options, timed_devices,
                                     args.time_batch_per_device, args.width)
                 for label, options in zip(temp, variants(time_chunk).values())}
        seconds = seconds_per_step(
            timed, (timed_devices * args.time_batch_per_device, args.width), args.time_rounds)
        baseline = seconds["all_gather"]
        for label, sizes in temp.items():
            cells = " | ".join(f"{b / 2**20:.1f}" for b in sizes)
            print(f"| {label} | {cells} | {sizes[2] / sizes[0]:.2f}x "
                  f"| {sizes[3] / sizes[0]:.2f}x | {seconds[label] / baseline:.2f} "
                  f"({seconds[label] * 1e3:.0f} ms) |", flush=True)


if __name__ == "__main__":
    main()
