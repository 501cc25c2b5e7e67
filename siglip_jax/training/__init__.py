"""Training a model: the optimizer and schedules (optim), the jitted sharded step with gradient
accumulation, EMA and the non-finite guard (train_step), the loop with its checkpoints, evals and
metrics (trainer, hooks, metrics), safeguards against divergence and bad configs (safeguards), SIGTERM
handling (preemption) and the workdir lock (workdir). The top layer: nothing else in the package imports it.
"""
