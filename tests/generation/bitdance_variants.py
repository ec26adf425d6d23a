"""Released BitDance model folders of other configurations than the fixtures' (P, head depth and
adaLN sets, the 32x generative-decoder tokenizer, Qwen3 shapes, tied embeddings, stored dtypes,
shards, the diffusers port), built here at tiny widths from bdt's own modules and written in the
release's file layout and key names. `write_variant` returns the modules it saved, holding the
values as stored (rounded to the stored dtype), so a loader's modules can be compared with them.

Provenance: the layout and key names are those of tests/fixtures/bitdance (README there), the
architectures those of the released family (ae_d16c32 / ae_d32c128 constructor arguments in
tokenizer_keys_*.json, DiffHead arguments, Qwen3 configs); the weights are seeded random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bdt.model.embed import BitsConnector
from bdt.model.head import DiffusionHead, head_config_from_bitdance, head_key_from_bitdance
from bdt.model.keymap import (AE_CONFIG, AE_WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS, PROJECTOR_WEIGHTS,
                              bitdance_head_keys)
from bdt.tokenizer.autoencoder import BinaryAutoencoder
from bdt.tokenizer.config import TokenizerConfig

from mllm_tiny import release_word_tokenizer, save_weights, write_diffusers_port

# The released tokenizers' shapes at a tiny width (ch 32; the release has 256 / 128) and one
# res block per level (the release has 4): the level count (downsampling), bits and decoder kind
# are the released ones.
AE_D16C32 = dict(ch=32, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1, z_channels=32, gan=False)
AE_D32C128 = dict(ch=32, ch_mult=[1, 1, 2, 2, 4, 8], num_res_blocks=1, z_channels=128, gan=True)
MAX_SIDE_PX = 4096  # the release adds <|res_1|> .. <|res_{4096 // downsample}|>
WORDS = 30


@dataclass(frozen=True)
class Variant:
    name: str
    P: int = 4
    head_width: int = 128  # the release splits it into width // 128 attention heads
    head_depth: int = 2
    adaln_sets: int = 1
    swiglu: bool = True
    tokenizer: dict = field(default_factory=lambda: AE_D16C32)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    tied: bool = False
    rope_theta: float = 1_000_000.0
    dtype: torch.dtype = torch.float32  # how every weights file stores its tensors
    sharded: bool = False  # every weights file as an index + 3 or 4 shards
    diffusers: bool = False  # the diffusers port's folders instead of the release's root

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.tokenizer["ch_mult"]) - 1)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def head_args(self) -> dict:
        """vision_head_config.json: DiffHead's constructor arguments, as released."""
        return dict(ch_target=self.tokenizer["z_channels"], ch_cond=self.hidden,
                    ch_latent=self.head_width, depth_latent=self.head_depth,
                    depth_adanln=self.adaln_sets, time_shift=1.0, time_schedule="logit_normal",
                    P_mean=-0.8, P_std=0.8, parallel_num=self.P, diff_batch_mul=1,
                    use_swiglu=self.swiglu)

    def ae_args(self) -> dict:
        """ae_config.json: VQModel's constructor arguments, as released."""
        t = self.tokenizer
        return {"ddconfig": {"double_z": False, "z_channels": t["z_channels"], "resolution": 256,
                             "in_channels": 3, "out_ch": 3, "ch": t["ch"],
                             "ch_mult": list(t["ch_mult"]),
                             "num_res_blocks": t["num_res_blocks"]},
                "gan_decoder": t["gan"]}


VARIANTS = {v.name: v for v in (
    # P = 16, a 3-block head on 3 adaLN sets, bf16 weights everywhere.
    Variant("p16_bf16", P=16, head_depth=3, adaln_sets=3, dtype=torch.bfloat16),
    # P = 1, a 4-block head sharing 2 adaLN sets with a plain MLP, fp16, sharded files.
    Variant("p1_fp16_sharded", P=1, head_depth=4, adaln_sets=2, swiglu=False,
            dtype=torch.float16, sharded=True),
    # The 32x generative-decoder tokenizer (128 bits), a wider head, tied embeddings,
    # GQA 6:1 with a head_dim other than hidden / heads, another rope theta.
    Variant("d32c128_tied", P=4, head_width=256, tokenizer=AE_D32C128, hidden=96, heads=6,
            kv_heads=1, head_dim=32, tied=True, rope_theta=10_000.0),
    # P = 64, the diffusers port's folders, bf16.
    Variant("p64_diffusers", P=64, dtype=torch.bfloat16, diffusers=True),
)}


@dataclass
class Saved:
    """The modules a variant folder holds, with the stored values (fp32 except the LLM, which
    keeps the stored dtype, as the release's config.json makes the loader build it)."""
    llm: torch.nn.Module
    head: DiffusionHead
    connector: BitsConnector
    autoencoder: BinaryAutoencoder


def _randomise(module: torch.nn.Module, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Non-zero values everywhere (the head's adaLN and output start at 0), rounded to `dtype`
    so that the fp32 module holds exactly what the file stores."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
            p.copy_(p.to(dtype).float())


def _text_tokenizer(v: Variant, out: Path) -> int:
    """The release's layout with <|res_1..N|>, N = 4096 // downsample, and P - 1 query tokens;
    returns its size (the LLM's rows)."""
    tok = release_word_tokenizer(WORDS, MAX_SIDE_PX // v.downsample, v.P)
    tok.save_pretrained(out)
    return len(tok)


def _llm(v: Variant, vocab: int, generator: torch.Generator):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=v.hidden, intermediate_size=2 * v.hidden,
                         num_hidden_layers=v.layers, num_attention_heads=v.heads,
                         num_key_value_heads=v.kv_heads, head_dim=v.head_dim,
                         tie_word_embeddings=v.tied, rope_theta=v.rope_theta,
                         max_position_embeddings=1024, eos_token_id=WORDS + 2)
    llm = Qwen3ForCausalLM(config)
    _randomise(llm, v.dtype, generator)
    return llm.to(v.dtype).eval()


def _shard_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """A shard size that splits these tensors into a few files."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) // 3 + 1


def _head_file(head: DiffusionHead) -> dict[str, torch.Tensor]:
    """Our head's tensors under vision_head.safetensors' names (net.<DiffHead key>)."""
    ours = head.state_dict()
    return {"net." + k: ours[head_key_from_bitdance(k)] for k in bitdance_head_keys(head.cfg)}


def write_variant(v: Variant, out: Path, seed: int = 0) -> Saved:
    """The variant's release folder in `out` (created); returns the modules it holds."""
    out = Path(out)
    root = out / "release" if v.diffusers else out
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the modules' own initialisation
    vocab = _text_tokenizer(v, root)
    llm = _llm(v, vocab, g)
    llm.save_pretrained(root, max_shard_size=_shard_bytes(llm.state_dict()) if v.sharded
                        else "5GB")
    head = DiffusionHead(head_config_from_bitdance(v.head_args()))
    connector = BitsConnector(v.tokenizer["z_channels"], v.hidden)
    autoencoder = BinaryAutoencoder(TokenizerConfig.from_dict(v.ae_args()))
    for module in (head, connector, autoencoder):
        _randomise(module, v.dtype, g)
        module.eval()

    def store(tensors: dict, name: str) -> None:
        tensors = {k: t.detach().to(v.dtype).contiguous() for k, t in tensors.items()}
        save_weights(tensors, root / name,
                     _shard_bytes(tensors) if v.sharded and not v.diffusers else 0)

    store(connector.state_dict(), PROJECTOR_WEIGHTS)
    store(_head_file(head), HEAD_WEIGHTS)
    store(autoencoder.state_dict(), AE_WEIGHTS)
    (root / AE_CONFIG).write_text(json.dumps(v.ae_args()))
    (root / HEAD_CONFIG).write_text(json.dumps(v.head_args()))
    if v.diffusers:
        write_diffusers_port(root, out / "port")
    return Saved(llm, head, connector, autoencoder)


def folder(v: Variant, out: Path) -> Path:
    """Where write_variant(v, out) put the folder to import."""
    return Path(out) / "port" if v.diffusers else Path(out)
