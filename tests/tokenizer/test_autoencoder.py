"""The binary autoencoder against the released BitDance layouts and seeded tiny forward passes."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from skimage import data as skdata
from skimage.transform import resize

from bdt.config import load as load_config
from bdt.tokenizer import BinaryAutoencoder, TokenizerConfig
from bdt.tokenizer.autoencoder import depth_to_space

from reference import REF, fixture_params, load_fixture, seed_decoder_noise

TINY = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=16)
RELEASED_LAYOUTS = sorted(p.stem[len("tokenizer_keys_"):] for p in REF.glob("tokenizer_keys_*.json"))


def _fixture_model(meta: dict, tensors: dict[str, torch.Tensor]) -> BinaryAutoencoder:
    model = BinaryAutoencoder(TokenizerConfig.from_dict(meta["constructor_args"])).eval()
    model.load_state_dict(fixture_params(tensors), strict=True)
    return model


@pytest.mark.parametrize("name", RELEASED_LAYOUTS)
def test_released_state_dict_layout(name):
    ref = json.loads((REF / f"tokenizer_keys_{name}.json").read_text())
    with torch.device("meta"):
        model = BinaryAutoencoder(TokenizerConfig.from_dict(ref["config"]))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == ref["state_dict"]
    assert list(got) == list(ref["state_dict"])  # same order, so saved files list keys alike
    assert sum(p.numel() for p in model.encoder.parameters()) == ref["num_params_encoder"]
    assert sum(p.numel() for p in model.decoder.parameters()) == ref["num_params_decoder"]
    assert model.downsample_factor == ref["derived"]["downsample_factor"]
    assert model.bits_per_token == ref["derived"]["bits_per_token"]


@pytest.mark.parametrize("name", ["tokenizer_tiny", "tokenizer_tiny_gan"])
def test_tiny_fixture_forward(name):
    meta, t = load_fixture(name)
    model = _fixture_model(meta, t)
    x = t["io.input"]
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), t["io.pre_quant"], atol=1e-5, rtol=1e-5)
    bits = model.encode(x)
    assert bits.dtype == torch.bool and bits.shape == t["io.pre_quant"].permute(0, 2, 3, 1).shape
    assert torch.equal(bits, (t["io.bits"] > 0).permute(0, 2, 3, 1))
    seed_decoder_noise(meta)
    torch.testing.assert_close(model.decode(bits), t["io.recon"], atol=1e-5, rtol=1e-5)
    # ±1 float input decodes like bool input.
    seed_decoder_noise(meta)
    torch.testing.assert_close(model.decode(t["io.bits"].permute(0, 2, 3, 1)), t["io.recon"],
                               atol=1e-5, rtol=1e-5)


def test_generative_decoder_noise_is_explicit_or_seeded():
    meta, t = load_fixture("tokenizer_tiny_gan")
    model = _fixture_model(meta, t)
    bits = model.encode(t["io.input"])
    noise_BhwC = t["io.decoder_noise"].permute(0, 2, 3, 1)
    torch.testing.assert_close(model.decode(bits, noise_BhwC=noise_BhwC), t["io.recon"], atol=1e-5, rtol=1e-5)
    a = model.decode(bits, generator=torch.Generator().manual_seed(3))
    b = model.decode(bits, generator=torch.Generator().manual_seed(3))
    c = model.decode(bits, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_depth_to_space_dcr_order():
    c, h, w = 3, 2, 5
    x = torch.randn(1, 4 * c, h, w)
    y = depth_to_space(x, 2)
    for i in range(2):
        for j in range(2):
            assert torch.equal(y[0, :, i::2, j::2], x[0, (2 * i + j) * c:(2 * i + j + 1) * c])


@functools.lru_cache(maxsize=None)
def _photos_64() -> tuple[np.ndarray, ...]:
    return tuple(resize(img, (64, 64), anti_aliasing=True) for img in
                 (skdata.astronaut(), skdata.coffee(), skdata.chelsea()))


def _photos(h: int, w: int) -> torch.Tensor:
    """Real photos (astronaut, coffee, chelsea) resized to h x w, in [-1, 1], B x 3 x h x w."""
    imgs = [resize(img, (h, w), anti_aliasing=True) for img in _photos_64()]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() * 2 - 1


@pytest.mark.parametrize("gan", [False, True])
@pytest.mark.parametrize("size", [(32, 32), (32, 64), (48, 16)])
def test_real_photos_shapes_and_dtypes(size, gan):
    torch.manual_seed(0)
    model = BinaryAutoencoder(TokenizerConfig(**TINY, gan_decoder=gan)).eval()
    images = _photos(*size)
    bits = model.encode(images)
    h, w = size[0] // 4, size[1] // 4
    assert bits.shape == (3, h, w, 16) and bits.dtype == torch.bool
    rate = bits.float().mean().item()
    assert 0.0 < rate < 1.0  # real pixels give both signs
    recon = model.decode(bits)
    assert recon.shape == images.shape and recon.dtype == torch.float32
    assert torch.isfinite(recon).all()


def test_bf16_module_and_autocast():
    torch.manual_seed(0)
    model = BinaryAutoencoder(TokenizerConfig(**TINY)).eval()
    images = _photos(32, 48)
    ref_bits = model.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bits_ac = model.encode(images)
        recon_ac = model.decode(bits_ac)
    bf16 = BinaryAutoencoder(TokenizerConfig(**TINY)).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    bits_bf = bf16.encode(images)  # fp32 images are cast to the module dtype
    recon_bf = bf16.decode(bits_bf)
    assert recon_bf.dtype == torch.bfloat16 and recon_bf.shape == images.shape
    assert torch.isfinite(recon_ac).all() and torch.isfinite(recon_bf.float()).all()
    # bf16 rounding may flip bits whose pre-activation is near 0, but not many.
    assert (bits_ac != ref_bits).float().mean() < 0.05
    assert (bits_bf != ref_bits).float().mean() < 0.05
    torch.testing.assert_close(recon_bf.float(), model.decode(bits_bf), atol=0.1, rtol=0.05)


def test_channels_last_gives_the_same_outputs():
    """channels_last (about 1.5x faster convs on CPU) must not change the numbers."""
    torch.manual_seed(0)
    model = BinaryAutoencoder(TokenizerConfig(**TINY, gan_decoder=True)).eval()
    fast = BinaryAutoencoder(model.config).eval()
    fast.load_state_dict(model.state_dict())
    fast.to(memory_format=torch.channels_last)
    images = _photos(32, 48)
    bits = model.encode(images)
    assert torch.equal(fast.encode(images.contiguous(memory_format=torch.channels_last)), bits)
    noise = torch.randn(bits.shape)
    torch.testing.assert_close(fast.decode(bits, noise_BhwC=noise), model.decode(bits, noise_BhwC=noise),
                               atol=1e-4, rtol=1e-4)


def test_training_forward_gradients_pass_the_quantizer():
    torch.manual_seed(0)
    model = BinaryAutoencoder(TokenizerConfig(**TINY))
    images = _photos(32, 32)
    recon, q = model(images)
    assert recon.shape == images.shape
    assert torch.equal(q.quantized.detach(), torch.where(q.z > 0, 1.0, -1.0))
    assert torch.equal(q.quantized.permute(0, 2, 3, 1) > 0, model.encode(images))
    # Reconstruction loss alone must reach the encoder through the straight-through estimator.
    (recon - images).abs().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert q.bit_rates.shape == (16,) and q.group_code_entropy.shape == (2,)


def test_single_token_map_has_finite_output():
    model = BinaryAutoencoder(TokenizerConfig(**TINY)).eval()
    bits = model.encode(_photos(4, 4))  # one token per image: the unbiased variance is undefined
    assert bits.shape == (3, 1, 1, 16)
    assert torch.isfinite(model.decode(bits)).all()


def test_bad_sizes_and_shapes_are_named():
    model = BinaryAutoencoder(TokenizerConfig(**TINY)).eval()
    with pytest.raises(ValueError, match=r"image size 30x32 .* downsample factor 4"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"image size 32x18"):
        model(torch.zeros(1, 3, 32, 18))
    with pytest.raises(ValueError, match=r"B x 3 x H x W, got shape \[1, 1, 32, 32\]"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"B x h x w x 16 .* got shape \[1, 4, 4, 32\]"):
        model.decode(torch.zeros(1, 4, 4, 32, dtype=torch.bool))


def test_norm_groups_reach_every_norm_and_keep_the_layout():
    """norm_groups (for narrow models) changes every GroupNorm, no parameter shape or key."""
    default = BinaryAutoencoder(TokenizerConfig(**TINY))
    narrow = BinaryAutoencoder(TokenizerConfig(**TINY, norm_groups=8))
    groups = {m.num_groups for m in narrow.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}
    assert ({k: v.shape for k, v in narrow.state_dict().items()}
            == {k: v.shape for k, v in default.state_dict().items()})
    narrow.load_state_dict(default.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(narrow.encoder(x), default.encoder(x))
    assert TokenizerConfig.from_dict(narrow.config.to_dict()).norm_groups == 8


def test_config_forms_and_errors():
    released = {"ddconfig": {"double_z": False, "z_channels": 16, "in_channels": 3, "out_ch": 3,
                             "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1},
                "gan_decoder": True, "_class_name": "ignored metadata"}
    cfg = TokenizerConfig.from_dict(released)
    assert cfg == TokenizerConfig(**TINY, gan_decoder=True)
    assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key.*'chmult'"):
        TokenizerConfig.from_dict({"chmult": [1, 2]})
    with pytest.raises(ValueError, match="multiple of entropy_group_size"):
        TokenizerConfig(**{**TINY, "z_channels": 12}).validate()
    # A config that does not name the loss's groups (the release's) takes ones dividing z: a
    # released 12-bit VQModel builds and runs (once refused for the training loss's sake).
    twelve = {**released, "ddconfig": {**released["ddconfig"], "z_channels": 12}}
    assert TokenizerConfig.from_dict(twelve).entropy_group_size == 4
    assert BinaryAutoencoder(TokenizerConfig.from_dict(twelve)).encode(
        torch.zeros(1, 3, 8, 8)).shape == (1, 2, 2, 12)
    with pytest.raises(ValueError, match="multiple of entropy_group_size"):
        TokenizerConfig.from_dict({**TINY, "z_channels": 12, "entropy_group_size": 8})
    with pytest.raises(ValueError, match="multiple of norm_groups=32"):
        TokenizerConfig(ch=48, ch_mult=[1, 2]).validate()
    TokenizerConfig(ch=48, ch_mult=[1, 2], norm_groups=8).validate()
    with pytest.raises(ValueError, match="norm_groups must be >= 1, got 0"):
        TokenizerConfig(ch=48, ch_mult=[1, 2], norm_groups=0).validate()
    # The released Encoder's own default ch_mult, where a ddconfig leaves it out; its required ones.
    bare = {k: v for k, v in released["ddconfig"].items() if k != "ch_mult"}
    assert TokenizerConfig.from_dict({"ddconfig": {**bare, "ch": 64}}).ch_mult == [1, 2, 2, 4]
    with pytest.raises(ValueError, match=r"'ddconfig' lacks \['num_res_blocks'\]"):
        TokenizerConfig.from_dict({"ddconfig": {k: v for k, v in released["ddconfig"].items()
                                                if k != "num_res_blocks"}})
    # Arguments the released constructors take but no weight depends on: accepted, as there.
    ignored = {**released, "checkpoint": None,
               "ddconfig": {**released["ddconfig"], "double_z": True, "resolution": 256}}
    assert TokenizerConfig.from_dict(ignored) == TokenizerConfig(**TINY, gan_decoder=True, double_z=True)
    # JSON of the wrong type is named, never coerced ("false" is truthy, int(1.5) == 1).
    for key, value in (("gan_decoder", "false"), ("ch", 32.0), ("ch_mult", [1, 1.5, 2]),
                       ("ch_mult", "112"), ("z_channels", True)):
        with pytest.raises(ValueError, match=f"{key} must be "):
            TokenizerConfig.from_dict({**released, key: value} if key == "gan_decoder" else
                                      {**released, "ddconfig": {**released["ddconfig"], key: value}})
    for value in ([1, 2], None, {**released, "ddconfig": None}):
        with pytest.raises(ValueError, match="must be a mapping|expected a mapping"):
            TokenizerConfig.from_dict(value)


@dataclass
class _YamlSchema:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)


@pytest.mark.parametrize("name", ["ae_d16c32", "ae_d32c128", "ae_d32c256", "shapes_small",
                                  "shapes_d8"])
def test_tokenizers_yaml_configs(name):
    """configs/tokenizer/*.yaml hold only a `model:` block that the typed config loader accepts."""
    path = Path(__file__).resolve().parents[2] / "configs" / "tokenizer" / f"{name}.yaml"
    loaded = load_config(_YamlSchema, [str(path)])
    assert set(OmegaConf.to_container(loaded)) == {"model"}
    with torch.device("meta"):
        model = BinaryAutoencoder(loaded.model)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    if name.startswith("ae_"):
        assert shapes == json.loads((REF / f"tokenizer_keys_{name}.json").read_text())["state_dict"]
    else:  # the embedded defaults: 16x / 8x down, 32 bits, small enough to train on a 2-core CPU
        assert (model.downsample_factor, model.bits_per_token) == \
            ({"shapes_small": 16, "shapes_d8": 8}[name], 32)
        assert 2e5 < sum(p.numel() for p in model.parameters()) < 3e6
