"""The training loop: builds mesh, data, model, optimizer and the compiled step from a config, then
steps, with logging and evaluation hung off the loop as every-N-steps hooks. The only module that knows
all the others."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import zlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from siglip_jax import config as config_lib
from siglip_jax import metrics as metrics_lib
from siglip_jax import checkpoint, optim, preemption, safeguards, sharding, storage
from siglip_jax.data import pipeline, sources, tokenizers
from siglip_jax.evaluation import runner
from siglip_jax.models import flops, two_towers
from siglip_jax.train_step import TrainState, create_train_state, train_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Hook:
    """Runs `fn(step, state) -> metrics` every `every_steps` steps (0: never periodically) and at the end."""

    every_steps: int
    fn: Callable[[int, TrainState], dict[str, float]]
    at_end: bool = True

    def due(self, step: int, is_last: bool) -> bool:
        return (is_last and self.at_end) or (self.every_steps > 0 and step % self.every_steps == 0)


class NonFiniteGuard:
    """Counts steps whose loss or gradient was not finite (the step skipped the update) and stops the run
    after `max_in_a_row` in a row. Reads each step's flag only after the next step is dispatched, so the
    check never leaves the accelerator idle."""

    def __init__(self, max_in_a_row: int, checkpointer: checkpoint.Checkpointer):
        self.max_in_a_row = max_in_a_row
        self.checkpointer = checkpointer
        self.total = 0
        self.in_a_row = 0
        self._held: tuple[int, Any] | None = None

    def check_previous_and_hold(self, step: int, step_metrics: Any) -> None:
        self.check_held()
        self._held = (step, step_metrics["nonfinite"])

    def held_step_finite(self) -> bool:
        """Whether the step just held (not yet counted) had a finite loss, gradient and update; waits for it."""
        return self._held is None or not int(self._held[1])

    def check_held(self) -> None:
        if self._held is None:
            return
        step, flag = self._held
        self._held = None
        if not int(flag):
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        logger.warning("Step %d had a non-finite loss, gradient or update; it was skipped (%d in a row).", step, self.in_a_row)
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            # Steps inside the streak are never saved (see held_step_finite), so the latest is from before it.
            latest = self.checkpointer.latest_step()
            where = (f"step {latest} in {self.checkpointer.root} (saved before the streak began at step "
                     f"{step - self.in_a_row + 1})" if latest is not None else "none saved yet")
            raise FloatingPointError(
                f"{self.in_a_row} steps in a row had a NaN or Inf loss, gradient or update, the last at step {step}. "
                f"Last good checkpoint: {where}. Lower optim.learning_rate, check the data, or raise "
                "max_nonfinite_steps."
            )


class Profiler:
    """Traces steps [first, last) with jax.profiler (view in TensorBoard's profile tab or Perfetto)."""

    def __init__(self, logdir: str, first: int, last: int):
        if last < first:
            raise ValueError(f"profile_steps ({first}, {last}) must be (first, last) with last >= first.")
        self.logdir, self.first, self.last = logdir, first, last
        self.active = False

    def before_step(self, step: int) -> None:
        if step == self.first and self.last > self.first and jax.process_index() == 0:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after_step(self, step: int, step_metrics: Any) -> None:
        if self.active and step == self.last - 1:
            jax.block_until_ready(step_metrics)  # the trace must hold the whole step
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logger.info("Wrote a profile of steps %d-%d to %s", self.first, self.last - 1, self.logdir)


def initial_params(config: ml_collections.ConfigDict, params: Any, shardings: Any) -> Any:
    """`params` with the groups in `config.init_towers` (all when empty) replaced by those of the model at
    `config.init_from`: a workdir, an exported params file, an HF SigLIP directory or a big_vision .npz."""
    from siglip_jax import inference  # loading every format is only needed here

    from siglip_jax.models import layout

    loaded = layout.to_layout(inference.load_params(config.init_from).params, config.model.scan_layers)
    groups = tuple(config.init_towers) or tuple(params)
    unknown = sorted(set(groups) - set(params))
    if unknown:
        raise ValueError(f"init_towers names {unknown}; valid parameter groups: {sorted(params)}.")
    from siglip_jax.models import init_mapping

    try:
        fitted, notes = init_mapping.fit_params(loaded, jax.device_get(params), tuple(config.init_skip), groups)
    except ValueError as error:
        raise ValueError(f"init_from={config.init_from!r} does not fit this model. {error}") from None
    for note in notes:
        logger.warning("init_from: %s", note)
    replaced = {group: jax.device_put(fitted[group], shardings[group]) for group in groups}
    logger.warning("Initialised %s from %s.", ", ".join(groups), config.init_from)
    return {**params, **replaced}


def build_source(source: ml_collections.ConfigDict) -> Any:
    return sources.make_source(source.kind, **source.args.to_dict())


def build_tokenizer(config: ml_collections.ConfigDict) -> Callable:
    tokenizer = tokenizers.make_tokenizer(
        config.data.tokenizer,
        max_len=config.model.text.max_len,
        lowercase=config.data.lowercase,
        path=config.data.tokenizer_path or None,
    )
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but model.text.vocab_size is "
            f"{config.model.text.vocab_size}; set model.text.vocab_size >= {tokenizer.vocab_size}."
        )
    return tokenizer


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains per `config`, writing metrics to `workdir`; returns the last logged metrics."""
    config = config_lib.validate(config)
    storage.path(workdir).mkdir(parents=True, exist_ok=True)  # a local directory or a bucket prefix
    storage.check_writable(workdir)
    is_lead = jax.process_index() == 0

    # ---- Mesh ------------------------------------------------------------------------------------
    mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axis_names)
    axis_rules = sharding.rules_as_tuples(config.mesh.axis_rules)
    sharding.check_batch_size(config.data.batch_size, mesh, axis_rules)
    sharding.check_accumulation(config.data.batch_size, config.accum_steps, mesh, axis_rules)
    batch_sharding = sharding.batch_sharding(mesh, axis_rules)
    batch_axes = sharding.batch_axes(mesh, axis_rules)

    # ---- Input -----------------------------------------------------------------------------------
    image_size = config.model.image.image_size
    tokenizer = build_tokenizer(config)
    local_batch_size = config.data.batch_size // jax.process_count()
    batches = pipeline.train_batches(
        build_source(config.data.train),
        tokenizer=tokenizer,
        options=pipeline.ImageOptions(image_size, tuple(config.data.random_crop_scale), config.data.random_flip),
        local_batch_size=local_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.data.num_workers,
        prefetch_batches=config.data.prefetch_batches,
    )

    # ---- Model and optimizer ---------------------------------------------------------------------
    model = two_towers.build_model(config.model)
    schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
    optimizer = optim.build_optimizer(config.optim, config.total_steps)
    state, state_shardings = create_train_state(
        model,
        optimizer,
        image_size=image_size,
        text_length=config.model.text.max_len,
        mesh=mesh,
        axis_rules=axis_rules,
        rng=jax.random.key(config.seed),
    )

    # ---- Checkpoints: continue where the last run in this workdir stopped (see checkpoint.py) ------
    checkpointer = checkpoint.Checkpointer(
        workdir, keep_checkpoints=config.keep_checkpoints, keep_every_steps=config.keep_every_steps
    )
    if checkpointer.latest_step() is not None:
        target = checkpoint.abstract_like(state, state_shardings)
        del state  # frees the fresh state before the restored one arrives
        state, restored_step = checkpointer.restore(target, batches, config)
        safeguards.check_restored_params(state.params, restored_step, checkpointer.root)
        safeguards.check_total_steps(restored_step, config.total_steps, checkpointer.root)
        logger.warning("Resumed from step %d of %s.", restored_step, checkpointer.root)
    elif config.init_from:
        state = state.replace(params=initial_params(config, state.params, state_shardings.params))

    # ---- The step: one jit site ------------------------------------------------------------------
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            loss_config=config.loss,
            axis_rules=axis_rules,
            mesh=mesh,
            batch_axes=batch_axes,
            accum_steps=config.accum_steps,
            frozen=tuple(config.optim.frozen),
        ),
        in_shardings=(state_shardings, batch_sharding),  # (state, batch)
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),  # (state, scalar metrics)
        donate_argnums=0,  # the old state's buffers are reused for the new one
    )

    # ---- Evaluation hooks ------------------------------------------------------------------------
    embedder = runner.Embedder(model, mesh, axis_rules, config.data.eval_batch_size, state_shardings.params)
    evaluators = runner.build_evaluators(config, tokenizer, build_source)

    def evaluate(step: int, state: TrainState) -> dict[str, float]:
        return safeguards.run_evals(evaluators, embedder, state.params, step)  # non-finite: reported, not raised

    hooks = [Hook(config.eval_every_steps, evaluate)] if evaluators else []

    def save_checkpoint(step: int, state: TrainState) -> dict[str, float]:
        if not nonfinite.held_step_finite():  # only finite steps are saved, so every checkpoint is a good one
            logger.warning("Not saving step %d: it was non-finite and skipped; the latest checkpoint stays step %s.",
                           step, checkpointer.latest_step())
            return {}
        checkpointer.save(step, state, batches, config)  # asynchronous: returns once off the devices
        return {}

    hooks.append(Hook(config.checkpoint_every_steps, save_checkpoint))
    preemption_watch = preemption.PreemptionWatch()

    # ---- Loop ------------------------------------------------------------------------------------
    first_step = int(state.step)
    writers = [metrics_lib.ConsoleWriter(config.total_steps, first_step, enabled=is_lead)]
    if is_lead:
        if first_step == 0:  # nothing restored: an earlier run's metrics are moved aside, not dropped
            safeguards.set_aside_old_metrics(os.path.join(workdir, "metrics.jsonl"))
        # A resumed run rewrites the steps after its checkpoint, so drop the killed run's lines for them.
        writers.append(metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), keep_through_step=first_step))
        if config.tensorboard:
            writers.append(metrics_lib.TensorBoardWriter(os.path.join(workdir, "tensorboard")))
    writer = metrics_lib.MultiWriter(writers)
    throughput = metrics_lib.Throughput(
        config.data.batch_size,
        mesh.size,
        flops.train_flops_per_example(config.model, config.data.batch_size),
        metrics_lib.peak_tflops(jax.devices()[0].device_kind, config.peak_tflops_per_device),
    )
    profiler = Profiler(os.path.join(workdir, "profile"), *config.profile_steps)
    nonfinite = NonFiniteGuard(config.max_nonfinite_steps, checkpointer)
    loss_watch = safeguards.LossWatch(config.loss_rise_factor)
    last_metrics: dict[str, float] = {}
    throughput.reset(first_step)
    num_skipped = 0
    try:
        for step in range(first_step + 1, config.total_steps + 1):
            wait_start = time.perf_counter()
            local_batch = next(batches)
            throughput.add_data_wait(time.perf_counter() - wait_start)
            num_skipped += int(np.sum(local_batch.pop("num_skipped")))
            epochs = local_batch.pop("epoch", None)  # streamed sources say which epoch each example is from
            batch = sharding.host_local_to_global(local_batch, batch_sharding)
            profiler.before_step(step)
            with jax.set_mesh(mesh):
                state, step_metrics = step_fn(state, batch)
            profiler.after_step(step, step_metrics)
            nonfinite.check_previous_and_hold(step, step_metrics)
            is_last = step == config.total_steps
            logged: dict[str, float] = {}
            if step % config.log_every_steps == 0 or is_last or step == first_step + 1:
                logged.update(metrics_lib.to_python(step_metrics))  # syncs with the device
                logged.update(loss_watch.check(step, logged))
                logged.update(throughput.measure(step))
                logged["data/num_skipped"] = float(num_skipped)  # records this process replaced in this run
                logged["nonfinite_skipped_total"] = float(nonfinite.total)
                if epochs is not None:
                    logged["data/epoch"] = float(np.max(epochs))
                if config.log_batch_checksums:  # exact in a float: CRC32 < 2**53
                    logged["data/batch_crc32"] = float(zlib.crc32(local_batch["images"].tobytes() + local_batch["tokens"].tobytes()))
            for hook in hooks:
                if hook.due(step, is_last):
                    logged.update(hook.fn(step, state))
                    throughput.reset(step)  # evaluation time is not training throughput
            if logged:
                writer.write(step, logged)
                last_metrics.update(logged)
            writers[0].advance(step)
            if not is_last and preemption_watch.should_stop(step):
                finite = nonfinite.held_step_finite()
                if finite:
                    checkpointer.save(step, state, batches, config)
                logger.warning("Preempted: %s; rerun the same command to continue.",
                               f"saved step {step}" if finite else f"step {step} was not finite, so not saved")
                break
        nonfinite.check_held()
    finally:
        profiler.stop()
        checkpointer.close()  # waits for the last save to be complete on disk, also after an error
        preemption_watch.close()
        writer.close()
    return last_metrics
