"""What the extraction's input listing and shard plan say when the inputs are not what they
seem: a list item matching nothing, a folder with a tar's name, a plan changed under an output."""

from __future__ import annotations

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
