"""What the extraction's input listing says when the inputs are not what they seem: a list item
matching nothing, a folder with a tar's name."""

from __future__ import annotations

import pytest
from extract_rawdata import good_samples, write_tar

from bdt.extract import input_units

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

