"""Training system: config validation, sharded steps, checkpoints, evaluation, reports."""
