"""Shard paths as users write them: folder names holding glob characters, and which names a
wildcard matches (one rule locally and on S3), for the raw shards (expand_shards), the AR
stages' shards (list_shards) and url_listing's globs beneath both."""

import json

import pytest

from bdt import storage, url_listing
from bdt.data.raw import expand_shards
from bdt.data.shard_source import list_shards

# Hidden names beside visible ones, at the top and below a hidden and a visible folder.
TREE = ("y.tar", ".x.tar", "._y.tar", ".d/z.tar", "e/w.tar", "e/.v.tar")


def _write(root: str, names) -> None:
    for name in names:
        storage.write_bytes_atomic(storage.join(root, name), b"x")


def _globs(root: str) -> dict[str, list[str]]:
    return {p: [u[len(root) + 1:] for u in url_listing.glob_urls(f"{root}/{p}")]
            for p in ("*.tar", "**/*.tar", ".*.tar", ".d/*.tar", "*/*.tar", "e/.*")}


# What Python's glob (the shell's rule) matches in TREE: a wildcard takes no leading dot.
SHOWN = {"*.tar": ["y.tar"], "**/*.tar": ["e/w.tar", "y.tar"], ".*.tar": ["._y.tar", ".x.tar"],
         ".d/*.tar": [".d/z.tar"], "*/*.tar": ["e/w.tar"], "e/.*": ["e/.v.tar"]}


def test_a_local_wildcard_matches_no_hidden_name_in_any_reader(tmp_path):
    """An AR stage's folder or glob read `.x.tar` (fsspec's glob) where the raw shards' did not
    (Python's): macOS's `._y.tar` resource-fork copies were read as damaged shards."""
    root = str(tmp_path)
    _write(root, TREE)
    assert _globs(root) == SHOWN
    assert list_shards(root).urls == list_shards(f"{root}/*.tar").urls == [f"{root}/y.tar"]
    assert expand_shards(root) == expand_shards(f"{root}/*.tar") == [f"{root}/y.tar"]


@pytest.mark.slow
def test_an_s3_wildcard_matches_the_names_a_local_one_does(s3_bucket):
    """fsspec's S3 glob matched hidden names: one pattern read other shards there than locally."""
    root = f"{s3_bucket}/t"
    _write(root, TREE)
    assert _globs(root) == SHOWN
    assert list_shards(root).urls == list_shards(f"{root}/*.tar").urls == [f"{root}/y.tar"]
    assert expand_shards(root) == [f"{root}/y.tar"]


def _folders_with_glob_characters(root: str) -> None:
    _write(root, ("raw[1]/a.tar", "tok[1]/b.tar", "out[1]/f/c.tar", "what?/d.tar"))
    storage.write_bytes_atomic(storage.join(root, "out[1]/index.json"), json.dumps({"stages": {
        "f": {"shards": [{"shard": "f/c.tar"}]}}}).encode())


def _check_folders_with_glob_characters(root: str) -> None:
    assert expand_shards(f"{root}/raw[1]") == [f"{root}/raw[1]/a.tar"]
    assert list_shards(f"{root}/tok[1]/").urls == [f"{root}/tok[1]/b.tar"]
    assert list_shards(f"{root}/out[1]", "f").urls == [f"{root}/out[1]/f/c.tar"]
    # A pattern matching only itself: the folder it names (it was "not a regular file").
    assert list_shards(f"{root}/what?").urls == expand_shards(f"{root}/what?") == [
        f"{root}/what?/d.tar"]
    with pytest.raises(ValueError, match=r"the pattern '.*/tok\[2\]' matches no file"):
        list_shards(f"{root}/tok[2]")


def test_a_folder_whose_name_holds_glob_characters_is_read_as_named(tmp_path):
    """`data.shards=/d/raw[1]` was refused "holds no .tar file" (its `*.tar` a glob under the
    pattern `raw[1]`), an AR stage's `tok[1]` or extraction output `out[1]` "matches no file"."""
    _folders_with_glob_characters(str(tmp_path))
    _check_folders_with_glob_characters(str(tmp_path))


@pytest.mark.slow
def test_an_s3_folder_whose_name_holds_glob_characters_is_read_as_named(s3_bucket):
    _folders_with_glob_characters(s3_bucket)
    _check_folders_with_glob_characters(s3_bucket)


def test_a_comma_in_a_name_of_a_comma_list_is_spelled_as_a_glob_class(tmp_path):
    """`data.shards` and extraction `inputs` are comma lists: a folder `run,v2` had no spelling
    (cut at its comma: `run` and `v2` each "matches nothing")."""
    root = str(tmp_path)
    _write(root, ("run,v2/a.tar", "b.tar"))
    assert expand_shards(f"{root}/run[,]v2/*.tar,{root}/b.tar") == [
        f"{root}/run,v2/a.tar", f"{root}/b.tar"]
    assert url_listing.brace_patterns("a[,]b,c[1,2],{d,e[,]f}") == ["a[,]b", "c[1", "2]", "{d,e[,]f}"]
