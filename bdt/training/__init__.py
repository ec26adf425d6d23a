"""Training infrastructure shared by both trainers (system §2): distributed init, DeepSpeed config,
LR schedules, checkpoints (integrity, weights-only loads, conversion to another world size), the
run lock, preemption signals, metrics and EMA, and the config sections both use (config.py).

The two training loops sit beside it and import it, never each other: `ar/` trains the AR model
(`bdt/train.py`), `tokenizer/` the binary image tokenizer (`tokenizers/train.py`). Nothing here
knows a particular model, dataset or Ray.
"""
