"""The image tokenizer a run trains for, recorded in each of its checkpoints: the sha256 of every
file of the tokenizer (tokenizer_identity) that `data.tokenizer` or the token shards' manifests
name. The start checks compare the shards with `data.tokenizer` and each other only, so a resume
with both swapped alike (or `data.tokenizer` alone over shards without manifests) passed, taught
weights trained on one tokenizer's bits another's, and the export shipped the new tokenizer with
them. A resume for another tokenizer is refused naming both."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bdt import storage
from bdt.data.shard_source import tokenizer_sha

log = logging.getLogger(__name__)
META_KEY = "image_tokenizer"  # of the per-rank checkpoint state (checkpoint_state.py)


@dataclass(frozen=True)
class RunTokenizer:
    sha256: dict[str, str]  # file -> sha256, as tokenizer_identity gives them
    path: str  # data.tokenizer (absolute when local); "" when only the manifests name it
    named_by: str  # where it came from, as messages say it

    def record(self) -> dict:
        return {"sha256": self.sha256, "path": self.path, "named_by": self.named_by}


def configured_tokenizer(path: str) -> RunTokenizer | None:
    """`data.tokenizer` (`path`, "" for none), its files hashed."""
    from bdt.tokenizer.io import tokenizer_identity

    if not path:
        return None
    sha256 = tokenizer_identity(path)["sha256"]
    if not storage.is_remote(path):
        path = storage.local_path(path)  # relative, it names another folder at a later start
    return RunTokenizer(sha256, path, f"data.tokenizer = {path}")


def agreeing_tokenizer(tokenizer: RunTokenizer | None, manifest: dict | None, where: str,
                       shards: str) -> RunTokenizer | None:
    """The run's tokenizer once the `manifest` of stage `where` (its `shards`) is read: the one
    it names when none was known; ValueError when it names another."""
    sha256 = tokenizer_sha(manifest)
    if sha256 is None:
        return tokenizer
    if tokenizer is None:
        return RunTokenizer(sha256, "", f"the manifest of {shards}")
    if sha256 != tokenizer.sha256:
        want = tokenizer.sha256
        diff = sorted(k for k in set(sha256) | set(want) if sha256.get(k) != want.get(k))
        raise ValueError(f"{where}: the shards in {shards} were written by a different image "
                         f"tokenizer than {tokenizer.named_by} (files differing: {diff[:3]}); "
                         f"re-extract them or point data.tokenizer at the right tokenizer")
    return tokenizer


def check_resumed(now: RunTokenizer | None, meta: dict, checkpoint: str, quiet: bool = False
                  ) -> None:
    """ValueError when checkpoint state `meta` was trained for another image tokenizer than
    `now` (None: neither data.tokenizer nor a manifest names one, nothing to compare), or named
    `data.tokenizer` and this start names none. A checkpoint without a record (from before it,
    or of a run that named none) passes, with a warning unless `quiet` (every rank but one):
    what its weights learnt is unknown, and the checkpoints this start saves record `now`, so
    a later start for another tokenizer is refused. Not recorded before such a save: until one
    holds weights trained for `now`, a restart for another from the old checkpoint is as
    sound as this one."""
    saved = meta.get(META_KEY)
    if not saved:
        if now is not None and not quiet:
            log.warning("checkpoint %s records no image tokenizer (written before the record, or "
                        "its run named none): resuming for %s, which the run's next checkpoint "
                        "records; a later resume for another is refused", checkpoint,
                        now.named_by)
        return
    if saved.get("path") and not (now and now.path):
        # The shards may still say which tokenizer, but the export copies data.tokenizer only.
        raise ValueError(f"data.tokenizer is empty, but checkpoint {checkpoint} trained for the "
                         f"image tokenizer {saved['path']}: without it the run's export ships "
                         f"no image tokenizer to decode with; resume with "
                         f"data.tokenizer={saved['path']}")
    if now is None or now.sha256 == saved["sha256"]:
        return  # the same files, wherever they are now
    was = saved["sha256"]
    diff = sorted(k for k in set(was) | set(now.sha256) if was.get(k) != now.sha256.get(k))[:2]
    raise ValueError(f"the image tokenizer is {now.named_by} ({_files(now.sha256, diff)}), but "
                     f"checkpoint {checkpoint} trained for {saved['named_by']} "
                     f"({_files(was, diff)}): resume with the original tokenizer and its token "
                     f"shards, or start a new run directory (init_from= keeps the weights)")


def _files(sha256: dict[str, str], names: list[str]) -> str:
    return ", ".join(f"{n} sha256 {sha256[n][:12]}" if n in sha256 else f"no {n}" for n in names)
