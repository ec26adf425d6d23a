"""Binary image tokenizer (method §1): BitDance-compatible autoencoder, sign quantizer, bit packing.

    model = load_tokenizer("path/or/s3://url")       # config.json + model.safetensors
    bits = model.encode(images_BCHW)                  # bool B x h x w x C, images in [-1, 1]
    images = model.decode(bits)                       # B x 3 x H x W
    packed = pack_bits(bits)                          # uint8 B x h x w x C/8
"""

from bdt.tokenizer.autoencoder import BinaryAutoencoder
from bdt.tokenizer.bits import map_to_tokens, pack_bits, tokens_to_map, unpack_bits
from bdt.tokenizer.config import TokenizerConfig
from bdt.tokenizer.io import load_tokenizer, save_tokenizer
from bdt.tokenizer.quantizer import QuantizerOutput, SignQuantizer

__all__ = [
    "BinaryAutoencoder", "QuantizerOutput", "SignQuantizer", "TokenizerConfig",
    "load_tokenizer", "save_tokenizer", "pack_bits", "unpack_bits", "map_to_tokens", "tokens_to_map",
]
