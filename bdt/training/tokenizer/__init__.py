"""The binary image tokenizer's training loop (`deepspeed tokenizers/train.py`): its config tree
(config.py) and the loop with its discriminator and export (loop.py), on bdt.training's
infrastructure."""
