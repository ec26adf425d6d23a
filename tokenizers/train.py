"""Train a binary image tokenizer: `deepspeed tokenizers/train.py --config
configs/tokenizer/<name>.yaml [key=value ...]` (also `torchrun ...` or plain `python ...`). All
logic is in bdt.tokenizer.train; this directory is not a package (it would shadow Hugging Face's
`tokenizers`)."""

import sys

from bdt.tokenizer.train import main

if __name__ == "__main__":
    sys.exit(main())
