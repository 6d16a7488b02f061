"""Training: train state, data-parallel step over a device mesh, loop, checkpoints, periodic evaluation."""
