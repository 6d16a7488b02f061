"""Training: train state, pmapped step, loop, checkpoints, periodic evaluation."""
