"""What the extraction's input listing and shard plan say when the inputs are not what they
seem: a list item matching nothing, a folder with a tar's name, a plan changed under an output."""

from __future__ import annotations

import json
import re

import pytest
from extract_rawdata import good_samples, image_bytes, write_tar

from bdt.extract import input_units
from bdt.extract import manifest as mf

EXTS = ["jpg", "jpeg", "png", "webp"]


def test_one_mistyped_item_of_the_inputs_stops_the_listing(tmp_path):
    """`in/*.tar,typo/*.tar` made units of in/ alone, the typo's share of the data gone unnoticed."""
    (tmp_path / "in").mkdir()
    write_tar(str(tmp_path / "in" / "a.tar"), good_samples("a", 1, 0))
    with pytest.raises(ValueError, match=rf"^inputs: '{tmp_path}/typo/\*.tar' matches nothing"):
        input_units.list_units(f"{tmp_path}/in/*.tar,{tmp_path}/typo/*.tar", "auto", 10, EXTS)
    with pytest.raises(ValueError, match=r"^inputs: ' , ' names no input$"):
        input_units.list_units(" , ", "auto", 10, EXTS)


def test_a_folder_a_glob_matched_by_a_tar_name_is_not_called_missing(tmp_path):
    """`in/*.tar` matched a folder `in/dir.tar`: the job said the shard it had just listed was
    "not found"."""
    (tmp_path / "in" / "dir.tar").mkdir(parents=True)
    write_tar(str(tmp_path / "in" / "a.tar"), good_samples("a", 1, 0))
    with pytest.raises(ValueError, match=r"1 tar shard\(s\) not found or not a file, e.g. .*/in/dir.tar$"):
        input_units.list_units(f"{tmp_path}/in/*.tar", "auto", 10, EXTS)


def test_a_changed_plan_names_what_its_units_are(tmp_path):
    """A tar unit was described as "(0 files)": the file count of a folder unit."""
    for name in ("a", "b"):
        write_tar(str(tmp_path / f"{name}.tar"), good_samples(name, 1, 0))
    folder = tmp_path / "f"
    folder.mkdir()
    for stem in ("p1", "p2", "p3"):
        (folder / f"{stem}.png").write_bytes(image_bytes(20, 20))
    out = str(tmp_path / "out")

    def plan(spec: str, size: int = 2) -> None:
        mf.check_plan(out, [u.plan_entry() for u in input_units.list_units(spec, "auto", size, EXTS)])

    plan(f"{tmp_path}/a.tar,{folder}")
    with pytest.raises(ValueError, match=rf"input unit 0 was the tar shard {tmp_path}/a.tar and is now "
                                         rf"the tar shard {tmp_path}/b.tar: the inputs changed"):
        plan(f"{tmp_path}/b.tar,{folder}")
    (folder / "p0.png").write_bytes(image_bytes(20, 20))  # sorts first: every chunk shifts
    with pytest.raises(ValueError, match=re.escape(
            f"input unit 1 was 2 image file(s) of the folder {folder} from p1.png and is now 2 image "
            f"file(s) of the folder {folder} from p0.png")):
        plan(f"{tmp_path}/a.tar,{folder}")


def _plan_folders(out: str, spec: str) -> None:
    mf.check_plan(out, [u.plan_entry() for u in input_units.list_units(spec, "auto", 10, EXTS)])


def test_the_plan_names_inputs_as_they_resolve_not_as_spelled(tmp_path, monkeypatch):
    """`inputs=im/` after `inputs=im` (or `./im`, its absolute path) was refused as "the inputs
    changed", while `im` from another folder, other files of the same names, passed."""
    for where in ("a", "b"):
        (tmp_path / where / "im").mkdir(parents=True)
        (tmp_path / where / "im" / "p1.png").write_bytes(image_bytes(20, 20))
    out = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path / "a")
    for spec in ("im", "im/", "./im", f"{tmp_path}/a/im", f"{tmp_path}/b/../a/im"):
        _plan_folders(out, spec)
    assert json.load(open(f"{out}/plan.json"))["units"][0]["source"] == f"{tmp_path}/a/im"
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError, match=re.escape(f"was 1 image file(s) of the folder {tmp_path}/a/im from "
                                                   f"p1.png and is now 1 image file(s) of the folder {tmp_path}/b/im")):
        _plan_folders(out, "im")


def test_a_link_repointed_to_another_tar_is_another_input(tmp_path):
    """The plan named the link: one pointed at another shard kept the old shard's plan."""
    for name in ("a", "b"):
        write_tar(str(tmp_path / f"{name}.tar"), good_samples(name, 1, 0))
    link = tmp_path / "latest.tar"
    link.symlink_to(tmp_path / "a.tar")
    out = str(tmp_path / "out")
    _plan_folders(out, str(link))
    _plan_folders(out, str(tmp_path / "a.tar"))  # what the link named: the same input
    link.unlink()
    link.symlink_to(tmp_path / "b.tar")
    with pytest.raises(ValueError, match=f"was the tar shard {tmp_path}/a.tar and is now the tar shard "
                                         f"{tmp_path}/b.tar: the inputs changed"):
        _plan_folders(out, str(link))


def test_remote_inputs_are_planned_as_the_listing_spells_them(tmp_path):
    """`s3://b/x/./a.tar` or a folder's trailing '/' is the object the listing names without them."""
    out = str(tmp_path / "out")
    mf.check_plan(out, [input_units.InputUnit(0, "tar", "s3://b/x/./a.tar").plan_entry(),
                        input_units.InputUnit(1, "folder", "s3://b/im/", ["p.png"]).plan_entry()])
    mf.check_plan(out, [input_units.InputUnit(0, "tar", "s3://b/x/a.tar").plan_entry(),
                        input_units.InputUnit(1, "folder", "s3://b/im", ["p.png"]).plan_entry()])
    with pytest.raises(ValueError, match="was the tar shard s3://b/x/a.tar and is now the tar shard s3://b/a.tar"):
        mf.check_plan(out, [input_units.InputUnit(0, "tar", "s3://b/a.tar").plan_entry()])


def test_a_plan_an_earlier_bdt_wrote_resumes_and_is_rewritten_resolved(tmp_path, monkeypatch):
    """Plans without a schema name inputs as spelled then: resolved from this folder, the same
    inputs resume (the plan then names them resolved), other ones are refused."""
    (tmp_path / "im").mkdir()
    for stem in ("p1", "p2"):
        (tmp_path / "im" / f"{stem}.png").write_bytes(image_bytes(20, 20))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    old = {"units": [dict(u.plan_entry(), source="im") for u in input_units.list_units("im", "auto", 10, EXTS)]}
    (out / "plan.json").write_bytes(mf.json_bytes(old))
    _plan_folders(str(out), "./im/")
    assert json.load(open(out / "plan.json")) == {"schema": mf.PLAN_SCHEMA, "units": [
        {"index": 0, "kind": "folder", "source": f"{tmp_path}/im", "files": ["p1.png", "p2.png"],
         "report_strays": True}]}
    (out / "plan.json").write_bytes(mf.json_bytes(old))
    (tmp_path / "other").mkdir()
    (tmp_path / "im").rename(tmp_path / "other" / "im")
    with pytest.raises(ValueError, match=f"folder {tmp_path}/im from p1.png and is now .* folder {tmp_path}/other/im"):
        _plan_folders(str(out), "other/im")
    (out / "plan.json").write_bytes(mf.json_bytes(dict(old, schema=3)))
    with pytest.raises(ValueError, match=r"plan.json is damaged \(schema 3, this bdt reads 2 and plans without one\)"):
        _plan_folders(str(out), "other/im")


def test_a_folder_listing_leaves_hidden_names_out(tmp_path):
    """macOS's `._p.png` was read as an image and rejected as corrupt, a notebook's checkpoint copy
    read as a second sample, `.DS_Store` rejected as an unknown file: a wildcard matches none of them."""
    from bdt.extract import input_reading

    folder = tmp_path / "im"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "p.png").write_bytes(image_bytes(40, 40))
    (folder / "p.txt").write_text("a caption")
    (folder / "._p.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / ".ipynb_checkpoints" / "p-checkpoint.png").write_bytes(image_bytes(40, 40))
    (folder / ".ipynb_checkpoints" / "p-checkpoint.txt").write_text("a caption")
    unit, = input_units.list_units(str(folder), "auto", 10, EXTS)
    assert unit.files == ["p.png"]
    items = list(input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=100))
    assert [(type(i).__name__, i.key) for i in items] == [("RawSample", "p")]
    out = tmp_path / "out"  # an earlier bdt's plan of the folder, its hidden image first
    mf.check_plan(str(out), [dict(unit.plan_entry(), files=["._p.png", "p.png"])])
    with pytest.raises(ValueError, match=re.escape("from ._p.png and is now 1 image file(s) of the folder "
                                                   f"{folder} from p.png: the inputs changed (hidden files")):
        mf.check_plan(str(out), [unit.plan_entry()])
    (folder / ".hidden").mkdir()
    (folder / "p.png").unlink()
    (folder / ".hidden" / "q.png").write_bytes(image_bytes(40, 40))
    with pytest.raises(ValueError, match=f"folder {folder} holds no images"):
        input_units.list_units(str(folder), "auto", 10, EXTS)
