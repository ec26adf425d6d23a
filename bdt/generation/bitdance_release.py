"""A released BitDance text-to-image model folder -> a bdt export (`bdt model import-bitdance`).

The release is one Hugging Face causal-LM directory (config.json, the LLM's weights, and the text
tokenizer with BitDance's tokens already added) that also holds BitDance's own components:

    ae_config.json + ae.safetensors                    the binary image tokenizer (VQModel kwargs)
    vision_head_config.json + vision_head.safetensors  the diffusion head (DiffHead kwargs; net.*)
    projector.safetensors                              the bits connector (fc1, fc2)

A diffusers port of it (`model_index.json`; text_encoder/ + tokenizer/ make the LLM's folder,
autoencoder/, diffusion_head/, projector/ each a config.json and diffusion_pytorch_model.safetensors
with the same keys) imports the same way (bdt.model.keymap.ReleaseLayout). Any of these weights
files may be sharded as Hugging Face tools write large ones (`<name>.safetensors.index.json` and
its shards, bdt.weights).

The export has the layout the trainer writes at the end of a run (bdt/training/run_dir.py):
`llm/` (the LLM's files, hard-linked where the file system allows, else copied), the connector and
head under our names, the model config, and `image_tokenizer/`. `bdt sample`, `bdt eval` and a
fine-tuning run (`init_from=`) then take it like any model bdt trained. Every weight of BitDance's
components, and of the LLM's safetensors weights, is checked against the configs (keys,
shapes, finite values) before anything is written, each error naming the file and the keys as
the file names them; the export appears whole or not at all. The LLM's files are then placed as
they are.
"""

from __future__ import annotations

import json
import os
import posixpath
import re

import torch
from safetensors.torch import save_file

from bdt import output_dirs, storage
from bdt.config import to_yaml
from bdt.model.ar import CONFIG_NAME, LLM_DIR, WEIGHTS_NAME, BitDanceModel
from bdt.model.backbone_config import check_llm_config
from bdt.model.config import ModelConfig
from bdt.model.head import head_config_from_bitdance, head_key_from_bitdance
from bdt.model.keymap import (BD_CONNECTOR, BD_HEAD, OURS_CONNECTOR, OURS_HEAD, OURS_LLM,
                              RELEASE, ReleaseLayout, bitdance_head_keys, release_layout,
                              state_dict_from_bitdance)
from bdt.model.text_tokenizer import release_num_res
from bdt.training.run_dir import EXPORT_IMAGE_TOKENIZER_DIR
from bdt.weights import (INDEX_SUFFIX, file_present, read_safetensors, safetensors_files,
                         state_dict_problems)

BD_HEAD_COMPONENT = BD_HEAD.removesuffix("net.")  # vision_head.safetensors keys are net.*
HEAD_FILE_PREFIX = BD_HEAD.removeprefix(BD_HEAD_COMPONENT)  # "net."
LLM_WEIGHTS = "model.safetensors"  # the LLM's weights as transformers saves them
# Pickle formats (pytorch_model.bin, training_args.bin, ...): bdt never unpickles, so an export
# does not carry them either (transformers would offer to load one unsafely).
_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# The dtypes a release stores its LLM in and an export loads it in; others read as float32.
_STORED_DTYPES = ("float32", "bfloat16", "float16")


def _read_json(url: str) -> dict:
    try:
        data = json.loads(storage.read_bytes(url))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past the parser
        raise ValueError(f"{url}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{url}: expected a JSON object, got {type(data).__name__}")
    return data


def release_model_config(src: str, llm_config: dict, downsample: int,
                         layout: ReleaseLayout = RELEASE) -> ModelConfig:
    """Our model config for the release in `src` with this LLM config (its config.json) and an
    image tokenizer that downsamples `downsample`x."""
    url = storage.join(src, layout.head_config)
    # Ports of the release add metadata keys ("_class_name", ...): not DiffHead arguments.
    head_kwargs = {k: v for k, v in _read_json(url).items() if not k.startswith("_")}
    try:
        head = head_config_from_bitdance(head_kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{url}: {e}") from None
    hidden = llm_config.get("hidden_size")
    if head.cond_dim != hidden:
        raise ValueError(f"{url}: ch_cond {head.cond_dim} differs from the LLM's hidden_size "
                         f"{hidden!r} ({layout.llm_config})")
    # The exported model loads the LLM in the dtype the release stores it in (bf16 for 14B).
    dtype = str(llm_config.get("torch_dtype") or llm_config.get("dtype") or "float32")
    # The release's 2D position table covers 4096 px per side (t2i_pipeline: 4096 // downsample
    # rows), as its res tokens do.
    cfg = ModelConfig(head=head, parallel_num=head.tokens, pos_max_len=release_num_res(downsample))
    cfg.backbone.path = LLM_DIR
    cfg.backbone.dtype = dtype if dtype in _STORED_DTYPES else "float32"
    try:
        cfg.validate()
    except ValueError as e:  # e.g. a parallel_num that is no square: a patch has none
        raise ValueError(f"{url}: {e}") from None
    return cfg


def release_extra_weights(src: str, model: BitDanceModel, layout: ReleaseLayout = RELEASE
                          ) -> dict[str, torch.Tensor]:
    """The release's connector and head weights under our names, each file checked against
    `model` (a meta model of the release's shapes) in the file's own key names."""
    projector_url = storage.join(src, layout.projector_weights)
    head_url = storage.join(src, layout.head_weights)
    projector, head = read_safetensors(projector_url), read_safetensors(head_url)
    expected_projector, expected_head = release_component_shapes(model)
    for url, expected, found in ((projector_url, expected_projector, projector),
                                 (head_url, expected_head, head)):
        problems = state_dict_problems(expected, found)
        if problems:
            hc = model.head.cfg
            raise ValueError(f"{url} does not fit the model its configs describe (head width "
                             f"{hc.width}, depth {hc.depth}, {hc.num_adaln_sets} adaLN set(s), "
                             f"P = {model.cfg.parallel_num}, {hc.bits} bits, LLM hidden "
                             f"{hc.cond_dim}): " + "; ".join(problems))
    return extra_from_release(projector, head, model.cfg.head.mlp, _weights_source(src, layout))


def release_component_shapes(model: BitDanceModel) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, torch.Tensor]]:
    """What projector.safetensors and vision_head.safetensors must hold for `model`: its
    connector and head tensors under the files' keys."""
    ours = model.state_dict()
    projector = {k.removeprefix(OURS_CONNECTOR): v for k, v in ours.items()
                 if k.startswith(OURS_CONNECTOR)}
    head = {HEAD_FILE_PREFIX + k: ours[OURS_HEAD + head_key_from_bitdance(k)]
            for k in bitdance_head_keys(model.head.cfg)}
    return projector, head


def _weights_source(src: str, layout: ReleaseLayout) -> str:
    return f"{src} ({layout.projector_weights}, {layout.head_weights})"


def extra_from_release(projector: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                       head_mlp: str, source: str) -> dict[str, torch.Tensor]:
    """projector.safetensors + vision_head.safetensors tensors -> our connector.* + head.*
    (bdt.model.keymap: the files' keys are MLLModel's without the component prefix)."""
    bitdance = {BD_CONNECTOR + k: v for k, v in projector.items()}
    bitdance.update({BD_HEAD_COMPONENT + k: v for k, v in head.items()})
    try:
        return state_dict_from_bitdance(bitdance, head_mlp)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _llm_files(src: str, layout: ReleaseLayout) -> dict[str, str]:
    """name -> URL of the files that make the LLM's folder: those of layout.llm_dirs (at the root
    of the release, all but BitDance's components); a name in two of them is an error."""
    files: dict[str, str] = {}
    components = _root_components(src, layout)
    for folder in layout.llm_dirs:
        fs, root = storage.filesystem(storage.join(src, folder) if folder else src)
        for path in sorted(p for p in fs.ls(root, detail=False) if fs.isfile(p)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or (not folder and name in components):
                continue
            if name in files:
                raise ValueError(f"{src}: {name} is in more than one of the LLM's folders "
                                 f"{list(layout.llm_dirs)}")
            files[name] = storage.join(src, folder, name) if folder else storage.join(src, name)
    return files


def _root_components(src: str, layout: ReleaseLayout) -> set[str]:
    """The names at the release's root that are BitDance's components, not the LLM's files: a
    weights file and, beside it, any shard index of the same name with its shards (the file wins
    and the index goes unused, but it is still no file of the LLM's)."""
    names = set(layout.components)
    for weights in (layout.ae_weights, layout.head_weights, layout.projector_weights):
        if "/" in weights:
            continue
        url = storage.join(src, weights)
        names.update(posixpath.basename(u) for u in safetensors_files(url))
        if storage.exists(url + INDEX_SUFFIX):
            names.add(weights + INDEX_SUFFIX)
            names.update(n for n in _root_names(src) if _is_shard_of(n, weights))
            try:
                names.update(posixpath.basename(u) for u in safetensors_files(url + INDEX_SUFFIX))
            except ValueError:  # an unreadable unused index: its shards go by their names
                pass
    return names


def _root_names(src: str) -> list[str]:
    fs, root = storage.filesystem(src)
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]


def _is_shard_of(name: str, weights: str) -> bool:
    """`name` is a shard of `weights` as Hugging Face tools name them (ae-00001-of-00002...)."""
    stem = re.escape(weights.removesuffix(".safetensors"))
    return re.fullmatch(stem + r"-\d+-of-\d+\.safetensors", name) is not None


def _place(src_url: str, dst: str) -> None:
    """Hard-link a local file (a 14B LLM is ~30 GB), else copy it. A Hugging Face cache snapshot
    is symlinks into ../../blobs, and link(2) links a symlink itself: resolve it first (each link
    of the release leads inside it or its blobs/: import_release checked)."""
    if not storage.is_remote(src_url):
        try:
            os.link(os.path.realpath(src_url), dst)
            return
        except OSError:
            pass
    fs, path = storage.filesystem(src_url)
    fs.get_file(path, dst)


def import_release(src: str, out: str) -> ModelConfig:
    """Write the bdt export of the release in `src` (local dir or fsspec URL) to `out` (local,
    absent or empty); returns the model config it holds."""
    from bdt.tokenizer.io import load_tokenizer, save_tokenizer

    if not storage.exists(src):
        raise FileNotFoundError(f"BitDance release folder not found: {src}")
    output_dirs.check_links(src, "--src")  # its LLM's files are placed in the export as they are
    layout = release_layout(src) or RELEASE
    missing = [n for n in (*layout.components, layout.llm_config)
               if not file_present(storage.join(src, n))]
    if missing:
        raise FileNotFoundError(f"{src} is not {layout.name}: missing {', '.join(missing)}")
    output_dirs.refuse_nonempty_dir(out, "give a new or empty output directory")
    # Everything is read and checked before anything is written.
    decoder = load_tokenizer(storage.join(src, layout.ae_weights),
                             config=storage.join(src, layout.ae_config))
    llm_config_url = storage.join(src, layout.llm_config)
    llm_config = _read_json(llm_config_url)
    cfg = release_model_config(src, llm_config, decoder.downsample_factor, layout)
    model = _meta_model(cfg, llm_config, llm_config_url)
    if decoder.config.z_channels != cfg.head.bits:  # before the head's weights are blamed
        raise ValueError(f"{src}: the image tokenizer makes {decoder.config.z_channels}-bit "
                         f"tokens ({layout.ae_config}), the head ({layout.head_config}) predicts "
                         f"{cfg.head.bits}")
    extra = release_extra_weights(src, model, layout)
    llm_files = {n: u for n, u in _llm_files(src, layout).items()
                 if not n.endswith(_PICKLED_SUFFIXES)}  # never read, so never shipped

    with output_dirs.staged_dir(out) as tmp:  # a reader never sees half an export
        os.makedirs(os.path.join(tmp, LLM_DIR))
        for name, url in llm_files.items():
            _place(url, os.path.join(tmp, LLM_DIR, name))
        _check_llm_weights(llm_files, os.path.join(tmp, LLM_DIR), model, llm_config_url)
        _pin_dtype(os.path.join(tmp, LLM_DIR, posixpath.basename(layout.llm_config)),
                   cfg.backbone.dtype)
        tokenizer_url = llm_files.get("tokenizer_config.json") or llm_files.get("tokenizer.json")
        _check_text_tokenizer(os.path.join(tmp, LLM_DIR), cfg, llm_config.get("vocab_size"),
                              posixpath.dirname(tokenizer_url) if tokenizer_url else src,
                              release_num_res(decoder.downsample_factor), layout.head_config)
        save_file({k: v.contiguous() for k, v in extra.items()}, os.path.join(tmp, WEIGHTS_NAME))
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            f.write(to_yaml(cfg))
        save_tokenizer(decoder, os.path.join(tmp, EXPORT_IMAGE_TOKENIZER_DIR))
    return cfg


def _pin_dtype(config_path: str, dtype: str) -> None:
    """The placed LLM config.json with a dtype transformers can load: "auto" (legal on the hub)
    makes this transformers fail on load; the export loads it as the model config says."""
    with open(config_path) as f:
        config = json.load(f)
    unusable = [k for k in ("torch_dtype", "dtype") if config.get(k) == "auto"]
    if unusable:
        config.update({k: dtype for k in unusable})
        os.unlink(config_path)  # a new file: the placed one is a hard link to the release's
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)


def _check_llm_weights(llm_files: dict[str, str], placed: str, model: BitDanceModel,
                       config_url: str) -> None:
    """The LLM's safetensors weights (model.safetensors or its shards) against the model its
    config.json describes: every key, shape and value, so that a damaged file is named now and
    not when the export is first loaded (transformers only warns of an unexpected key, and reads
    NaN as it is). A remote release's are read from their copies in `placed` (memory-mapped, as
    local ones are: a 14B LLM is read once, not held). Other formats are left to transformers."""
    name = next((n for n in (LLM_WEIGHTS, LLM_WEIGHTS + INDEX_SUFFIX) if n in llm_files), None)
    if name is None:
        raise ValueError(f"{config_url}: the LLM beside it has no safetensors weights ({LLM_WEIGHTS} "
                         f"or {LLM_WEIGHTS + INDEX_SUFFIX}; pickled .bin/.pt files are not read: "
                         f"convert them to safetensors)")
    url = llm_files[name]
    expected = {k.removeprefix(OURS_LLM): v for k, v in model.state_dict().items()
                if k.startswith(OURS_LLM)}
    # The copies are checked, not the originals: what the export holds is what must load.
    try:
        found = read_safetensors(os.path.join(placed, name), mmap=True)
    except (FileNotFoundError, ValueError) as e:  # named by the release's paths, not the staging's
        # Only a missing shard can be one that was not placed as the LLM's.
        hint = (" (hidden files and names of BitDance's component shards are not the LLM's)"
                if isinstance(e, FileNotFoundError) else "")
        raise type(e)(str(e).replace(placed, posixpath.dirname(url)) + hint) from None
    problems = []
    # Tied weights (lm_head.weight = embed_tokens.weight) are saved once, under either name.
    names_of: dict[int, list[str]] = {}
    for key, param in model.llm.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(key)
    for names in names_of.values():
        saved = [k for k in names if k in found] or names[:1]  # none saved: name the first
        # NaN equal to NaN: a non-finite value is state_dict_problems' to name, not a tie's
        if any(not torch.equal(found[k].nan_to_num(), found[saved[0]].nan_to_num())
               for k in saved[1:]):
            problems.append(f"{' and '.join(saved)} differ, but the config ties them "
                            f"(tie_word_embeddings): the model would use only one")
        for key in names:
            if key not in saved:
                expected.pop(key, None)
    problems += state_dict_problems(expected, found)
    if problems:
        raise ValueError(f"{url} does not fit the LLM of {config_url}: "
                         + "; ".join(problems))


def _check_text_tokenizer(llm_dir: str, cfg: ModelConfig, rows: int | None, src: str,
                          num_res: int, head_config: str) -> None:
    """The release's text tokenizer (placed in `llm_dir`, from the release's folder `src`) must
    already hold BitDance's tokens (`num_res` res tokens), one per embedding row (`rows`): tokens
    added here would get mean-initialised rows, and the model would read garbage. Its query
    tokens also tell P, which the head's weights do not: one past P - 1 means the head's config
    (`head_config`) gives the wrong P."""
    from bdt.model.text_tokenizer import (bitdance_tokens, load_text_tokenizer, missing_tokens,
                                          query_token)

    try:
        tokenizer = load_text_tokenizer(llm_dir)
    except OSError as e:  # named by the release's folder: the staging one is gone by then
        raise OSError(str(e).replace(llm_dir, src)) from None
    missing = missing_tokens(tokenizer, bitdance_tokens(cfg.parallel_num, num_res))
    if missing or len(tokenizer) != rows:
        raise ValueError(f"{src}: its text tokenizer is not the model's: "
                         + (f"it lacks {len(missing)} of BitDance's tokens ({missing[:3]} ...)"
                            if missing else f"{len(tokenizer)} tokens for {rows} embedding rows"))
    if not missing_tokens(tokenizer, [query_token(cfg.parallel_num)]):
        raise ValueError(f"{src}: its text tokenizer holds {query_token(cfg.parallel_num)}, so the "
                         f"model takes more than P = {cfg.parallel_num} tokens per step: "
                         f"{head_config} must give its parallel_num (DiffHead's default is 4)")


def _brief(e: Exception) -> str:
    """transformers' reason on one line and short: its validation errors span lines, and an
    unknown model_type lists every known one (~12,000 characters)."""
    why = " ".join(str(e).split())
    return why if len(why) <= 300 else why[:300] + " ..."


def _meta_model(cfg: ModelConfig, llm_config: dict, url: str) -> BitDanceModel:
    """The model the release describes, on the meta device (shapes only, no weights read);
    `url` names where `llm_config` came from."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(llm_config)
    for key in ("torch_dtype", "dtype"):  # "auto" (legal on the hub) is no torch attribute;
        if kwargs.get(key) == "auto":  # release_model_config reads it as float32
            kwargs.pop(key)
    try:
        hf_config = AutoConfig.for_model(kwargs.pop("model_type", ""), **kwargs)
    except (ValueError, KeyError, TypeError, AttributeError, StrictDataclassError) as e:
        raise ValueError(f"{url}: not a Hugging Face causal-LM config ({_brief(e)})") from None
    check_llm_config(hf_config, url)  # what loading the export refuses, refused before writing
    try:
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # no causal LM of that type
        raise ValueError(f"{url}: not a Hugging Face causal-LM config ({_brief(e)})") from None
    with torch.device("meta"):
        return BitDanceModel(cfg, llm)
