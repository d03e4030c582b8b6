"""Training and evaluation: loops, checkpoints, distributed plumbing, loggers."""
