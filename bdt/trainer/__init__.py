"""Training: generic infrastructure (distributed init, DeepSpeed config, LR schedule, checkpoints,
preemption signals, metrics, EMA), shared with the image-tokenizer trainer, and the AR-model
trainer built on it (train_config, stages, setup, loop, export, preview, flops).

The generic modules know nothing of a particular model or dataset; none of this package knows Ray.
"""
