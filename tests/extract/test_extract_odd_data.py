"""Legitimate but odd raw data: folders of uncaptioned images, and the like."""

from __future__ import annotations

import fsspec.implementations.local as fs_local
from extract_rawdata import image_bytes

from bdt.extract import input_reading, input_units

EXTS = ["jpg", "jpeg", "png", "webp"]


def test_a_folder_of_uncaptioned_images_is_listed_once_per_unit(tmp_path, monkeypatch):
    """Each image without a .txt listed its whole folder to look for a.TXT: a unit of 1000
    images in a folder of 8000 took 110 s to read."""
    png = image_bytes(32, 32)
    for i in range(40):
        (tmp_path / f"img{i:03d}.png").write_bytes(png)
    (tmp_path / "img025.TXT").write_bytes(b"upper-case caption")
    (tmp_path / "img026.txt").write_bytes(b"plain caption")
    unit = input_units.list_units(str(tmp_path), "auto", 20, EXTS)[1]  # img020..img039
    calls = []
    real_ls = fs_local.LocalFileSystem.ls
    monkeypatch.setattr(fs_local.LocalFileSystem, "ls",
                        lambda self, path, *a, **kw: calls.append(path) or real_ls(self, path, *a, **kw))
    items = list(input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=1000))
    assert [i.key for i in items] == [f"img{i:03d}" for i in range(20, 40)]
    captions = {i.key: i.caption for i in items if i.caption is not None}
    assert captions == {"img025": b"upper-case caption", "img026": b"plain caption"}
    assert len(calls) == 1, calls
