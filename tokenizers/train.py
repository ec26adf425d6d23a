"""Train a binary image tokenizer: `deepspeed tokenizers/train.py --config
configs/tokenizer/<name>.yaml [key=value ...]` (also `torchrun ...` or plain `python ...`). All
logic is in bdt.training.tokenizer; this directory is not a package (it would shadow Hugging Face's
`tokenizers`)."""

import sys

from bdt.training.tokenizer.loop import main

if __name__ == "__main__":
    sys.exit(main())
