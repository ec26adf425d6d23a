"""Small builders shared by tests in several folders (tests/ is on sys.path via tests/conftest.py)."""

import torch


def save_tiny_image_tokenizer(out_dir: str, bits: int = 16):
    """A seeded, randomly initialised 2x-downsampling binary autoencoder saved as a tokenizer
    directory; returns the model. The global RNG is left as it was."""
    from bdt.tokenizer.autoencoder import BinaryAutoencoder
    from bdt.tokenizer.config import TokenizerConfig
    from bdt.tokenizer.io import save_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BinaryAutoencoder(TokenizerConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1,
                                                  z_channels=bits))
    save_tokenizer(model, out_dir)
    return model
