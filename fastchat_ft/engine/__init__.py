"""The train loop, evaluation, checkpoints, metrics and distributed set-up."""
