"""Export of a trained model for sampling: the consolidated weights (HF safetensors for the LLM +
connector/head safetensors + model config, `BitDanceModel.save_pretrained`), the text tokenizer,
the image tokenizer's files and the resolved training config.

Under ZeRO-3 the parameters are partitioned: they are gathered on every rank for the duration of
the save (collective), and rank 0 writes. This needs the full model in one rank's memory once;
for models beyond that, consolidate a checkpoint offline with
`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil

from bdt import output_dirs, storage
from bdt.config import literal_config, save_resolved
from bdt.training.distributed import DistInfo, barrier
from bdt.training.run_dir import EXPORT_IMAGE_TOKENIZER_DIR, EXPORT_TRAIN_CONFIG_NAME


def export_model(engine, model, cfg, out_dir: str, dist: DistInfo) -> str:
    """Collective. Writes `out_dir` (local) on rank 0; returns it."""
    gather = contextlib.nullcontext()
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                                   modifier_rank=None)
    with gather:
        if dist.is_main:
            tmp = out_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            # A full disk: an OSError naming the export, not the Rust tokenizer's bare Exception;
            # the half-written copy goes, giving back its space (the old export stays).
            try:
                with storage.naming_url(out_dir, "exporting the model to"):
                    _write_export(engine, cfg, tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _replace_dir(tmp, out_dir)
    barrier()
    return out_dir


def _write_export(engine, cfg, tmp: str) -> None:
    if cfg.data.tokenizer:  # first: a link it refuses leaves nothing written
        _copy_tree(cfg.data.tokenizer, os.path.join(tmp, EXPORT_IMAGE_TOKENIZER_DIR), "data.tokenizer")
    engine.module.save_pretrained(tmp)
    save_resolved(_with_absolute_shards(cfg), tmp, name=EXPORT_TRAIN_CONFIG_NAME)
    # Not staged_dir's: safetensors writes the weights 0600, unreadable to the group.
    output_dirs.readable_as_open_makes(tmp)


def _replace_dir(new: str, path: str) -> None:
    """`new` becomes `path`, whose old folder is then deleted. Where the OS swaps two names in
    one step (Linux renameat2 on a local filesystem), `path` is a whole folder at every moment,
    a kill included; elsewhere it is missing between two renames (a kill there leaves the old
    one as `<path>.old`). Files a reader holds open stay readable after the delete. Deleted in
    place instead, a reader (or a kill) met the old one half gone, and `bdt sample --model
    <run_dir>` took that for the model."""
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(path) and _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # the old folder, now under the new one's name
        return
    if os.path.lexists(path):
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap the names of `a` and `b` in one step; False where the OS or filesystem cannot
    (not Linux, NFS), OSError for what else stops it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} with {b}: {os.strerror(err)}")


def _with_absolute_shards(cfg):
    """The config as the export records it: a stage's local shards as the absolute path the run
    read (`~` expanded), so that the sampler's trained-bucket check finds them from any working
    directory. One path, as list_shards reads it: split at commas, `/d/run,v2` was recorded as
    `/d/run,<cwd>/v2`, and the check found nothing there."""
    record = literal_config(cfg)
    for stage in record.stages:
        if not storage.is_remote(stage.shards):
            stage.shards = storage.local_path(stage.shards)
    return record


def _copy_tree(src: str, dst: str, what: str) -> None:
    """The files of folder `src` into `dst`, a link's target as a file; ValueError, before
    anything is written, for a link out of `src` (output_dirs.check_links; `what` names it)."""
    output_dirs.check_links(src, what)
    fs, root = storage.filesystem(src)
    root = root.rstrip("/")
    for path in fs.find(root):
        target = os.path.join(dst, *path[len(root) + 1:].split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(path, target)
