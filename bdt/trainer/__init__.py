"""Generic training infrastructure: distributed init, DeepSpeed config, LR schedule, checkpoints,
preemption signals and metrics. Knows nothing of a particular model, dataset or of Ray."""
