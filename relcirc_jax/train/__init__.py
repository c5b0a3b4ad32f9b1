"""relcirc_jax.train: the trainer and its parts.

loop.train(config, workdir) runs a training job top to bottom; state (TrainState, optimizer, shardings, RunSetup),
step (the AOT-compiled train step), sampling (prompts -> images in one jitted call, grids), evaluate (accuracy tables),
checkpoint (Orbax), metrics (TensorBoard + metrics.jsonl), progress, ema, preemption. Submodules are imported on use.
"""
