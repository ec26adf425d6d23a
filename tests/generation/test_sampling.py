"""Generation loop: KV cache == full recomputation, memorization round trip, bad input."""

import json
import shutil

import pytest
import torch

from bdt.model.ar import BitDanceModel
from bdt.model.backbone import make_tiny_llm
from bdt.model.backbone_config import BackboneConfig
from bdt.model.config import ModelConfig
from bdt.model.head import HeadConfig
from bdt.model.sequence import ImageSample, SequencePacker
from bdt.model.text_tokenizer import encode
from bdt.generation.sampling import SamplingConfig, generate

CAPTIONS = ["a red circle", "a blue square on the left", "two green stars", "a yellow cat"]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_llm(str(tmp_path_factory.mktemp("tiny_llm")), CAPTIONS, hidden=64,
                         layers=2, heads=4, kv_heads=2, intermediate=128)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: one thread is faster than two fighting over a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(llm_dir: str, parallel_num: int, seed: int = 0,
               overrides: dict | None = None) -> BitDanceModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=BackboneConfig(path=llm_dir, config_overrides=overrides or {}),
                      head=HeadConfig(width=64, depth=2, num_adaln_sets=1, head_dim=32, bits=8),
                      parallel_num=parallel_num, flip_prob=0.0, caption_dropout=0.0,
                      attn_backend="sdpa")
    return BitDanceModel.from_config(cfg)


@pytest.mark.parametrize("parallel_num", [1, 4])
def test_kv_cache_equals_full_recomputation(llm_dir, parallel_num):
    model = tiny_model(llm_dir, parallel_num)
    with torch.no_grad():  # an untrained head ignores its condition (zero-init output layer)
        for p in [*model.head.parameters(), *model.connector.parameters()]:
            p.normal_(0.0, 0.3)
    # Prompts of different lengths (left padding) with CFG on a ramped scale (two streams).
    prompts = [CAPTIONS[1], CAPTIONS[0]]
    kw = dict(cfg_scale=3.0, cfg_schedule="linear", num_steps=3, seed=5)
    cached = generate(model, prompts, 4, 8, SamplingConfig(use_cache=True, **kw))
    full = generate(model, prompts, 4, 8, SamplingConfig(use_cache=False, **kw))
    assert cached.shape == (2, 4, 8, 8) and cached.dtype == torch.bool
    assert torch.equal(cached, full)
    # Not vacuous: the bits depend on the prompt and the seed.
    swapped = generate(model, prompts[::-1], 4, 8, SamplingConfig(**kw))
    assert not torch.equal(swapped[0], cached[1])
    reseeded = generate(model, prompts, 4, 8, SamplingConfig(**{**kw, "seed": 6}))
    assert not torch.equal(reseeded, cached)
    assert torch.equal(generate(model, prompts, 4, 8, SamplingConfig(**kw)), cached)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8}], ids=lambda r: r["rope_type"])
def test_kv_cache_equals_full_recomputation_under_a_static_rope_scaling(llm_dir, rope):
    """Static RoPE types (the ones bdt loads) past original_max_position_embeddings: a cached
    step rotates its block as full recomputation does."""
    model = tiny_model(llm_dir, 4, overrides={"rope_scaling": rope})
    assert model.llm.config.rope_parameters["rope_type"] == rope["rope_type"]
    with torch.no_grad():
        for p in [*model.head.parameters(), *model.connector.parameters()]:
            p.normal_(0.0, 0.3)
    kw = dict(cfg_scale=3.0, num_steps=2, seed=5)
    cached = generate(model, [CAPTIONS[1], CAPTIONS[0]], 4, 4, SamplingConfig(use_cache=True, **kw))
    full = generate(model, [CAPTIONS[1], CAPTIONS[0]], 4, 4, SamplingConfig(use_cache=False, **kw))
    assert torch.equal(cached, full)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return make_tiny_llm(str(tmp_path_factory.mktemp("tiny_qwen2")), CAPTIONS, arch="qwen2",
                         hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)


def local_model(qwen2_dir: str, tmp_path, kind: str, size: int) -> BitDanceModel:
    """The tiny Qwen2 with layer 0 sliding (window `size`) or chunked (chunks of `size`)."""
    if kind == "sliding":
        return tiny_model(qwen2_dir, 4, overrides={
            "use_sliding_window": True, "sliding_window": size,
            "layer_types": ["sliding_attention", "full_attention"]})
    # Qwen2Config has no attention_chunk_size field to override: a copy's config.json gets it.
    llm_dir = shutil.copytree(qwen2_dir, tmp_path / "chunked")
    config = json.loads((llm_dir / "config.json").read_text())
    config.update(layer_types=["chunked_attention", "full_attention"], attention_chunk_size=size)
    (llm_dir / "config.json").write_text(json.dumps(config))
    return tiny_model(str(llm_dir), 4)


@pytest.mark.parametrize("kind,size", [("sliding", 1), ("sliding", 3), ("chunked", 1),
                                       ("chunked", 3), ("chunked", 4), ("chunked", 8)])
def test_kv_cache_of_a_local_layer_keeps_only_what_it_sees(qwen2_dir, tmp_path, kind, size,
                                                           monkeypatch):
    """A sliding or chunked layer's cache kept every key (memory growing with the image
    although its attention looks back `size` tokens at most). A sliding layer keeps size - 1;
    a chunked one, for rows whose next blocks start at positions n, max(n mod size), less than
    size, and masks the other rows' keys before their chunk by absolute position. Both sample
    the same bits as a cache keeping every key and as full recomputation, from the same hidden
    states up to float rounding (the bits alone miss a mask that is off by a few keys). Sizes
    < P + 1: keys leave every step; chunks of 1 and 3 split every block of P = 4, 4 and 8 some
    blocks not; prompts of two lengths: left padding, rows at different places in their chunks;
    CFG: two streams."""
    import bdt.model.ar as ar
    import bdt.model.kv_cache as kv

    model = local_model(qwen2_dir, tmp_path, kind, size)
    assert getattr(model.layer_rules[f"{kind}_attention"], "window" if kind == "sliding"
                   else "chunk") == size
    with torch.no_grad():
        for p in [*model.head.parameters(), *model.connector.parameters()]:
            p.normal_(0.0, 0.3)
    hidden = []  # each decoder call's last P hidden states
    model.decoder.register_forward_hook(
        lambda m, a, out: hidden.append(out.last_hidden_state[:, -4:]))
    held = []  # before each cached step: keys each layer holds, rows' next positions
    make_cache = model.kv_cache

    def watched_cache():
        cache = make_cache()

        def before_step(module, args, kwargs):
            if cache.layers[0].is_initialized:
                held.append(([layer.keys.shape[-2] for layer in cache.layers],
                             kwargs["position_ids"][:, 0].tolist()))
        hooks.append(model.decoder.register_forward_pre_hook(before_step, with_kwargs=True))
        return cache
    hooks = []
    monkeypatch.setattr(model, "kv_cache", watched_cache)
    prompts = [CAPTIONS[1], CAPTIONS[0]]
    kw = dict(cfg_scale=3.0, num_steps=2, seed=5)
    bounded = generate(model, prompts, 4, 8, SamplingConfig(use_cache=True, **kw))
    hooks.pop().remove()
    steps = 4 * 8 // 4
    assert len(held) == steps - 1
    for (local, _), next_pos in held:
        kept = size - 1 if kind == "sliding" else max(n % size for n in next_pos)
        assert local == kept < size, (local, next_pos)
    assert held[-1][0][1] == held[0][0][1] + (steps - 2) * 4  # the full layer keeps every key
    if kind == "chunked" and size > 1:  # rows needing different numbers of keys
        assert any(len({n % size for n in next_pos}) > 1 for _, next_pos in held)
    full = generate(model, prompts, 4, 8, SamplingConfig(use_cache=False, **kw))
    monkeypatch.setattr(model, "kv_cache", make_cache)
    for module in (ar, kv):  # the cache as it was: every key kept, masks over all of them
        monkeypatch.setattr(module, "keys_kept", lambda rule, key_valid_BK: key_valid_BK.shape[1])
    unbounded = generate(model, prompts, 4, 8, SamplingConfig(use_cache=True, **kw))
    assert torch.equal(bounded, unbounded) and torch.equal(bounded, full)
    assert len(hidden) == 3 * steps
    for other in (hidden[steps:2 * steps], hidden[2 * steps:]):  # full, unbounded
        torch.testing.assert_close(hidden[:steps], other, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parallel_num", [1, 4])
def test_memorization_round_trip(llm_dir, parallel_num):
    """Train on 4 caption/bit-grid pairs, then sample from the captions: the grids come back.

    Agreement needs the training loss, masks, token order, position embeddings and the
    sampler's cache/conditioning to be consistent with one another.
    """
    model = tiny_model(llm_dir, parallel_num)
    g = torch.Generator().manual_seed(1)
    grids = [torch.where(torch.rand(4, 4, 8, generator=g) > 0.5, 1.0, -1.0) for _ in CAPTIONS]
    packer = SequencePacker(model.special, model.prompt, parallel_num, max_len=4096,
                            encode_text=lambda s: encode(model.tokenizer, s))
    packed = packer.pack([ImageSample(c, b) for c, b in zip(CAPTIONS, grids)])
    steps = 150
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0,
                            foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    model.train()
    noise = torch.Generator().manual_seed(2)
    for _ in range(steps):
        loss = model(packed, generator=noise)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    bits = generate(model, CAPTIONS, 4, 4, SamplingConfig(cfg_scale=1.0, num_steps=10, seed=0))
    accuracy = (bits == (torch.stack(grids) > 0)).float().mean().item()
    assert accuracy >= 0.99, f"memorized {accuracy:.4f} of the bits (P = {parallel_num})"


def test_bad_generation_inputs(llm_dir):
    model = tiny_model(llm_dir, 4)
    context = model.llm.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"> the model's context of {context} positions"):
        generate(model, [[5] * context], 4, 4, SamplingConfig(num_steps=1))
    with pytest.raises(ValueError, match="3x4 is not divisible by the patch side 2"):
        generate(model, ["a red circle"], 3, 4, SamplingConfig(num_steps=1))
    with pytest.raises(ValueError, match="exceeds the 2D position table"):
        generate(model, ["a red circle"], 130, 4, SamplingConfig(num_steps=1))
    with pytest.raises(ValueError, match="unknown CFG schedule 'cosine'"):
        generate(model, ["a red circle"], 4, 4, SamplingConfig(cfg_schedule="cosine"))


def test_an_in_loop_preview_whose_prompt_cannot_fit_is_refused_before_training(llm_dir):
    """A sample prompt beyond the context once failed at the first preview, after steps that
    no checkpoint held (and every resume failed the same way)."""
    from bdt.generation.preview import Preview
    from bdt.training.ar.config import ARLoggingConfig

    model = tiny_model(llm_dir, 4)
    long = " ".join(["a red circle"] * model.llm.config.max_position_embeddings)
    cfg = ARLoggingConfig(sample_every=5, sample_prompts=["a red circle", long], sample_hw=[4, 4])
    off = ARLoggingConfig(sample_every=0, sample_prompts=cfg.sample_prompts, sample_hw=[4, 4])
    Preview(off, None, "unused", 0, takes_part=True, writes=False,
            together=False).check(model)  # never runs
    with pytest.raises(ValueError, match=r"logging.sample_prompts: prompt 2: .* context"):
        Preview(cfg, None, "unused", 0, takes_part=True, writes=False, together=False).check(model)


def test_sampling_settings_and_prompts_no_sampling_can_use_are_refused(llm_dir):
    """A bare string was sampled as one prompt per character; NaN guidance gave an all -1 grid
    that looked like an image; a head of NaN weights did too."""
    model = tiny_model(llm_dir, 4)
    with pytest.raises(TypeError, match="not one string"):
        generate(model, "a red circle", 4, 4, SamplingConfig(num_steps=1))
    for bad in (SamplingConfig(cfg_scale=float("nan")), SamplingConfig(cfg_scale=float("inf")),
                SamplingConfig(time_shift=0.0), SamplingConfig(num_steps=0)):
        with pytest.raises(ValueError, match="sampling settings"):
            generate(model, ["a red circle"], 4, 4, bad)
    with torch.no_grad():
        model.head.input_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        generate(model, ["a red circle"], 4, 4, SamplingConfig(num_steps=1, cfg_scale=1.0))


def test_a_prompt_that_is_no_utf8_text_is_named(llm_dir):
    """Bytes of another encoding in argv (`--prompt $'\\xff'` reads as a lone surrogate) or a
    \\udcff escape in a suite file ended `bdt sample` / `bdt eval` with the tokenizer's
    TypeError."""
    model = tiny_model(llm_dir, 4)
    with pytest.raises(ValueError, match="prompt 2: not UTF-8 text .* at character 2"):
        generate(model, ["a red circle", "a \udcff circle"], 4, 4, SamplingConfig(num_steps=1))


def test_batch_seeds_of_two_runs_never_coincide():
    """Batch k once sampled with seed + k: run seed 1's batches were run seed 0's from k = 1."""
    from bdt.generation.trained import batch_seed

    seeds = {(s, k): batch_seed(s, k) for s in range(4) for k in range(64)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds.values())
    assert batch_seed(3, 5) == batch_seed(3, 5)
