"""The training loop: builds mesh, data and the compiled step (train_step.build_training) from a config,
then steps; every periodic action (log, eval, checkpoint, profile window, non-finite check, progress,
preemption) is a hook from hooks.py with its cadence from the config. The only module that knows all
the others; only the CLIs import it."""
from __future__ import annotations

import collections
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from siglip_jax import config as config_lib
from siglip_jax.data import pipeline, streaming
from siglip_jax.data.from_config import build_source, build_tokenizer, cached_source, missing_data_error
from siglip_jax.evaluation import runner
from siglip_jax.inference.embedder import Embedder
from siglip_jax.io import checkpoint, loading
from siglip_jax.models import flops, two_towers
from siglip_jax.runtime import sharding, storage
from siglip_jax.training import hooks, metrics as metrics_lib, preemption, safeguards, workdir as workdir_lib
from siglip_jax.training.train_step import build_training

logger = logging.getLogger(__name__)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains per `config`, writing metrics to `workdir`; returns the last logged metrics."""
    config = config_lib.validate(config)
    # Listening from the start: a SIGTERM (or Ctrl-C) during start-up stops before the first step, said in a
    # line, instead of killing the process with no word (exit 143).
    watch = preemption.PreemptionWatch()
    try:
        return _train(config, workdir, watch)
    finally:
        watch.close()


def _train(config: ml_collections.ConfigDict, workdir: str, watch: preemption.PreemptionWatch) -> dict[str, float]:
    storage.check_checkpoint_location(workdir)  # before anything is written
    workdir_lib.prepare(workdir)  # creates it (a local directory or a bucket prefix), checks and locks it
    is_lead = jax.process_index() == 0

    # ---- Mesh, model, optimizer, state and the one jitted step -------------------------------------
    mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axis_names)
    checkpointer = checkpoint.Checkpointer(
        workdir, keep_checkpoints=config.keep_checkpoints, keep_every_steps=config.keep_every_steps
    )
    resuming = checkpointer.latest_step() is not None
    tokenizer = build_tokenizer(config)  # its EOS id ends the captions a decoder predicts
    training = build_training(config, mesh, eos_id=tokenizer.eos_id)
    distillation = training.distillation  # SigLIP 2's SILC / TIPS, or None

    # ---- Input -----------------------------------------------------------------------------------
    try:
        train_source = build_source(config.data.train)
    except FileNotFoundError as error:
        raise missing_data_error(error, "data.train", config.data.train) from error
    if config.data.cache_decoded_mb:
        train_source = cached_source(train_source, config.data)
    batches = pipeline.train_batches(
        train_source,
        tokenizer=tokenizer,
        options=two_towers.image_options(config),
        local_batch_size=config.data.batch_size // jax.process_count(),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.data.num_workers,
        prefetch_batches=config.data.prefetch_batches,
        # SigLIP 2's local crops are cut from the step that reads them (before it, zeros of their shape)
        local_crops_from_batch=distillation.start_step if distillation is not None else 0,
    )

    # ---- Checkpoints: continue where the last run in this workdir stopped (see checkpoint.py) ------
    if resuming:
        state, restored_step = checkpointer.restore(training.abstract_state, batches, config)
        safeguards.check_restored_params(state.params, restored_step, checkpointer.root)
        safeguards.check_total_steps(restored_step, config.total_steps, checkpointer.root)
        logger.warning("Resumed from step %d of %s.", restored_step, checkpointer.root)
    else:
        state = training.init_state(jax.random.key(config.seed))
        if config.init_from:  # the EMA (optim.ema_decay) starts from the loaded parameters too
            state = state.with_params(loading.initial_params(config, state.params, training.state_shardings.params))

    # ---- Hooks, in the order they run after each step ----------------------------------------------
    first_step = int(state.step)
    console = metrics_lib.ConsoleWriter(config.total_steps, first_step, enabled=is_lead)
    writers = [console]
    if is_lead:
        if first_step == 0:  # nothing restored: an earlier run's metrics are moved aside, not dropped
            safeguards.set_aside_old_metrics(os.path.join(workdir, "metrics.jsonl"))
        # A resumed run rewrites the steps after its checkpoint, so drop the killed run's lines for them.
        writers.append(metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), keep_through_step=first_step))
        if config.tensorboard:
            writers.append(metrics_lib.TensorBoardWriter(os.path.join(workdir, "tensorboard")))
    # SigLIP 2's distillation views join at model.distill.start_fraction of the run: the step's FLOPs grow there.
    step_flops = {distilling: flops.train_flops_per_example(config.model, config.data.batch_size, distilling)
                  for distilling in (False, True)}
    throughput = metrics_lib.Throughput(
        config.data.batch_size,
        mesh.size,
        lambda step: step_flops[distillation is not None and step > distillation.start_step],
        metrics_lib.peak_tflops(jax.devices()[0].device_kind, config.peak_tflops_per_device),
    )
    embedder = Embedder(
        training.model, mesh, training.axis_rules, config.data.eval_batch_size, training.state_shardings.params
    )
    evaluators = runner.build_evaluators(config, tokenizer, build_source)

    def evaluate(info: hooks.StepInfo) -> dict[str, float]:
        # Non-finite embeddings are reported as a metric, not raised, so the checkpoint after it is still saved.
        results = runner.run_evaluators(evaluators, embedder, info.state.params, info.step)
        if config.optim.ema_decay:  # the moving average beside the raw weights, on the same sets
            ema_results = runner.run_evaluators(evaluators, embedder, info.state.ema_params, info.step)
            results.update({f"ema/{key}": value for key, value in ema_results.items()})
        throughput.reset(info.step)  # evaluation time is not training throughput
        return results

    nonfinite = hooks.NonFiniteGuard(config.max_nonfinite_steps, checkpointer)

    def save_if_finite(step: int, state) -> bool:
        """Saves `step` unless it was non-finite (and skipped): every checkpoint is then a good one."""
        if not nonfinite.held_step_finite():
            latest = checkpointer.latest_step()
            logger.warning("Not saving step %d: it was non-finite and skipped; %s.", step,
                           "no checkpoint has been saved yet" if latest is None else f"the latest checkpoint stays step {latest}")
            return False
        checkpointer.save(step, state, batches, config)  # asynchronous: returns once off the devices
        return True

    def save_checkpoint(info: hooks.StepInfo) -> dict[str, float]:
        save_if_finite(info.step, info.state)
        throughput.reset(info.step)
        return {}

    write = hooks.Write(metrics_lib.MultiWriter(writers))
    preempted = hooks.Preemption(watch, save_if_finite)
    loop_hooks = [
        hooks.ProfileWindow(os.path.join(workdir, "profile"), *config.profile_steps),
        nonfinite,
        hooks.Log(config.log_every_steps, first_step, throughput, nonfinite, config.log_batch_checksums,
                  safeguards.LossWatch(config.loss_rise_factor)),
        *([hooks.Periodic(config.eval_every_steps, evaluate)] if evaluators else []),
        hooks.Periodic(config.checkpoint_every_steps, save_checkpoint),
        write,
        hooks.Progress(console),
        preempted,
    ]

    # ---- Loop ------------------------------------------------------------------------------------
    throughput.reset(first_step)
    num_skipped = 0
    skipped_by_shard: collections.Counter = collections.Counter()  # streamed sources: shard -> records skipped
    try:
        if watch.should_stop(first_step):  # the finally below closes what start-up opened
            logger.warning("Stopped during start-up, before step %d: nothing was trained, so nothing new was saved; "
                           "rerun the same command to %s.", first_step + 1, "continue" if first_step else "start")
            return {}
        for step in range(first_step + 1, config.total_steps + 1):
            wait_start = time.perf_counter()
            try:
                local_batch = next(batches)
            except StopIteration:  # a mixture with on_exhausted="end" ran out of one of its sources
                if step - 1 > first_step and checkpointer.latest_step() != step - 1:
                    save_if_finite(step - 1, state)
                logger.warning("The data ended before step %d (a mixture with on_exhausted=\"end\"): stopping after "
                               "step %d.", step, step - 1)
                break
            throughput.add_data_wait(time.perf_counter() - wait_start)
            num_skipped += int(np.sum(local_batch.pop("num_skipped")))
            if "skipped_shards" in local_batch:
                streaming.count_skipped_by_shard(local_batch.pop("skipped_shards"), skipped_by_shard)
            epochs = local_batch.pop("epoch", None)  # streamed sources say which epoch each example is from
            batch = sharding.host_local_to_global(local_batch, training.batch_sharding)
            for hook in loop_hooks:
                hook.before_step(step)
            with jax.set_mesh(mesh):
                state, step_metrics = training.step(state, batch)
            info = hooks.StepInfo(step, state, step_metrics, local_batch, step == config.total_steps, num_skipped, epochs,
                                  dict(skipped_by_shard))
            hooks.run_hooks(loop_hooks, info)
            if preempted.stop_requested:
                break
        for hook in loop_hooks:
            hook.finish()
    finally:
        for hook in loop_hooks:
            hook.close()
        checkpointer.close()  # waits for the last save to be complete on disk, also after an error
        write.writer.close()
    return write.last
