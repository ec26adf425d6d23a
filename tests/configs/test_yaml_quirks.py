"""YAML 1.1 reads some unquoted values as another type than the key's: a string key keeps the
text as written, any other key refuses the numbers nobody means (octal, base 60) by name; the
same from a YAML file and from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from bdt import config as C


@dataclass
class Stage:
    name: str = "s"
    steps: int = 1


@dataclass
class Job:
    family: str = ""
    prompts: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    seed: int = 0
    lr: float = 0.1
    resume: bool = True
    # values of any type, as the YAML gave them (as deepspeed.extra, config_overrides)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Flag:
    keep: bool = False


@dataclass
class Flagged:
    stages: list[Flag] = field(default_factory=list)


def _load(tmp_path, via: str, key: str, value: str):
    if via == "command line":
        return C.load(Job, [], [f"{key}={value}"])
    path = tmp_path / "job.yaml"
    path.write_text(f"{key}: {value}\n")
    return C.load(Job, [str(path)])


# (as written, what YAML 1.1 made of it for a string key before)
TEXTS = [("no", "False"), ("off", "False"), ("on", "True"), ("yes", "True"), ("NO", "False"),
         ("true", "True"), ("1e-3", "0.001"), ("0755", "493"), ("1_000", "1000"), (".5", "0.5"),
         ("1.10", "1.1"), ("1:30", "90"), ("0x1f", "31"), ("+1", "1"), (".nan", "nan")]


@pytest.mark.parametrize("via", ["yaml", "command line"])
@pytest.mark.parametrize("text, was", TEXTS)
def test_a_string_key_keeps_the_text_as_written(tmp_path, via, text, was):
    cfg = _load(tmp_path, via, "family", text)
    assert cfg.family == text != was
    # in a list of strings, and in a list of sections
    assert _load(tmp_path, via, "prompts", f"[{text}, a]").prompts == [text, "a"]
    assert _load(tmp_path, via, "stages", f"[{{name: {text}}}]").stages[0].name == text
    # and it reads back the same from the resolved config bdt writes
    saved = C.save_resolved(cfg, str(tmp_path / "run"))
    assert C.load(Job, [saved]).family == text


def test_a_string_key_in_a_section_of_a_yaml_list_keeps_its_text(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("stages:\n  - name: no\n    steps: 3\n  - {name: 2.50}\n")
    cfg = C.load(Job, [str(path)], ["stages.1.name=off"])
    assert [s.name for s in cfg.stages] == ["no", "off"] and cfg.stages[0].steps == 3


@pytest.mark.parametrize("via", ["yaml", "command line"])
@pytest.mark.parametrize("key, text, says", [
    ("seed", "0042", "YAML reads 0042 as an octal number (34); write it without the leading 0"),
    ("seed", "-0755", "YAML reads -0755 as an octal number (-493)"),
    ("lr", "0755", "YAML reads 0755 as an octal number (493)"),
    ("resume", "010", "YAML reads 010 as an octal number (8)"),
    ("seed", "1:30", "YAML reads 1:30 as a base-60 number (90); write the number itself"),
    ("lr", "1:30.5", "YAML reads 1:30.5 as a base-60 number (90.5)"),
    ("extra", "{a: 0755}", "YAML reads 0755 as an octal number (493)"),
])
def test_an_octal_or_base_60_number_for_another_key_is_refused_by_name(tmp_path, via, key, text,
                                                                       says):
    """They were taken silently: `seed: 0042` ran with seed 34, `1:30` was 90."""
    with pytest.raises(C.ConfigError) as err:
        _load(tmp_path, via, key, text)
    where = "command line" if via == "command line" else str(tmp_path / "job.yaml")
    named = "extra.a" if key == "extra" else key
    assert str(err.value).startswith(f"{where}: key '{named}': {says}"), str(err.value)


@pytest.mark.parametrize("via", ["yaml", "command line"])
@pytest.mark.parametrize("key, text, value", [
    ("seed", "08", 8), ("seed", "1_000", 1000), ("seed", "0x1f", 31), ("seed", "'0755'", 755),
    ("lr", "1e-3", 0.001), ("lr", ".5", 0.5), ("lr", "1_0.5", 10.5),
    ("resume", "no", False), ("resume", "on", True), ("family", "'no'", "no"),
])
def test_numbers_and_booleans_as_meant_are_taken(tmp_path, via, key, text, value):
    assert getattr(_load(tmp_path, via, key, text), key) == value


@pytest.mark.parametrize("via", ["yaml", "command line"])
@pytest.mark.parametrize("text, shown", [("2", "2"), ("0", "0"), ("'yes'", "'yes'"),
                                         ("'true'", "'true'"), ("'1'", "'1'")])
def test_a_bool_key_refuses_what_is_not_a_boolean_by_name(tmp_path, via, text, shown):
    """omegaconf took any non-zero number and the texts 'yes', 'true', '1' as true:
    `checkpoint.at_end: 2` ran as true, `0` as false, in silence."""
    with pytest.raises(C.ConfigError) as err:
        _load(tmp_path, via, "resume", text)
    where = "command line" if via == "command line" else str(tmp_path / "job.yaml")
    assert str(err.value) == f"{where}: key 'resume': {shown} is not a boolean; write true or false"
    # inside a list of sections too (a YAML list replaces the whole list)
    with pytest.raises(C.ConfigError, match=r"key 'stages\[1\].keep': 1 is not a boolean"):
        C.load(Flagged, [], ["stages=[{keep: true}, {keep: 1}]"])


@pytest.mark.parametrize("via", ["yaml", "command line"])
def test_a_key_of_any_type_keeps_yaml_booleans_and_quoted_text(tmp_path, via):
    """`extra` is typed "any" (as model.backbone.config_overrides and deepspeed.extra): its
    values are YAML's own, for configs that want real booleans (DeepSpeed's JSON, a Hugging Face
    config's `use_cache: no`); quoted, they are text. Its numbers are what they look like."""
    cfg = _load(tmp_path, via, "extra", "{a: yes, b: off, c: 'on', d: [no, 1], e: 2}")
    assert cfg.extra == {"a": True, "b": False, "c": "on", "d": [False, 1], "e": 2}


@pytest.mark.parametrize("via", ["yaml", "command line"])
@pytest.mark.parametrize("value, named, says", [
    ("{on: 1}", "extra.on", "on as a boolean, not text: quote it ('on': ...)"),
    ("{a: {b: 1, Off: 2}}", "extra.a.Off", "Off as a boolean, not text: quote it ('Off': ...)"),
    ("{a: [{yes: 1}]}", "extra.a[0].yes", "yes as a boolean"),
    ("{1: 2}", "extra.1", "1 as a number, and the names here are text: quote it ('1': ...)"),
])
def test_a_name_yaml_reads_as_a_boolean_or_number_says_to_quote_it(tmp_path, via, value, named,
                                                                      says):
    """`on: 1` in a section typed any was the key True: omegaconf refused it as "Key True (bool)
    is incompatible with (str)", and one level down took it in silence."""
    with pytest.raises(C.ConfigError) as err:
        _load(tmp_path, via, "extra", value)
    where = "command line" if via == "command line" else str(tmp_path / "job.yaml")
    assert str(err.value).startswith(f"{where}: key '{named}': YAML reads the unquoted name "
                                     f"{says}"), str(err.value)
    # quoted they are names; numbers one level down stay numbers (a config's id2label)
    cfg = _load(tmp_path, via, "extra", "{'on': 1, a: {'Off': 2, 0: cat}}")
    assert cfg.extra == {"on": 1, "a": {"Off": 2, 0: "cat"}}
