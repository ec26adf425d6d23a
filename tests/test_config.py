"""The typed config loader: precedence, strictness, error messages, launcher arguments."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import pytest
import yaml

from bdt import config as C
from bdt import entry


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100


@dataclass
class Job:
    name: str = "run"
    data_path: str = "???"  # required
    steps: int = 10
    bf16: bool = False
    optim: OptimSection = field(default_factory=OptimSection)


def _write(tmp_path, name, obj) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(obj) if not isinstance(obj, str) else obj)
    return str(path)


def test_precedence_defaults_then_yamls_then_command_line(tmp_path):
    a = _write(tmp_path, "a.yaml", {"data_path": "/d", "steps": 20, "optim": {"lr": 0.5}})
    b = _write(tmp_path, "b.yaml", {"steps": 30})
    cfg = C.load(Job, [a, b], ["optim.lr=0.25", "bf16=true"])
    assert cfg.steps == 30  # later YAML wins over earlier
    assert cfg.optim.lr == 0.25  # command line wins over YAML
    assert cfg.bf16 is True
    assert cfg.optim.warmup_steps == 100  # untouched default survives
    assert cfg.name == "run"
    assert cfg.data_path == "/d"


def test_unknown_key_names_key_and_file(tmp_path):
    bad = _write(tmp_path, "bad.yaml", {"data_path": "/d", "optim": {"learning_rate": 1.0}})
    with pytest.raises(C.ConfigError) as err:
        C.load(Job, [bad])
    msg = str(err.value)
    assert "optim.learning_rate" in msg and "bad.yaml" in msg
    assert "\n" not in msg


def test_unknown_key_on_command_line():
    with pytest.raises(C.ConfigError) as err:
        C.load(Job, [], ["data_path=/d", "stepz=3"])
    assert "stepz" in str(err.value) and "command line" in str(err.value)


def test_renamed_key_names_its_new_name(tmp_path):
    old = _write(tmp_path, "old.yaml", {"data_path": "/d", "optimizer": {"lr": 1.0}})
    renamed = {"optimizer": "optim"}
    with pytest.raises(C.ConfigError, match=r"old.yaml: key 'optimizer' was renamed to 'optim'"):
        C.load(Job, [old], renamed=renamed)
    with pytest.raises(C.ConfigError, match=r"command line: key 'optimizer' was renamed to"):
        C.load(Job, [], ["data_path=/d", "optimizer.lr=1.0"], renamed=renamed)
    assert C.load(Job, [], ["data_path=/d", "optim.lr=1.0"], renamed=renamed).optim.lr == 1.0


def test_wrong_type_names_key(tmp_path):
    bad = _write(tmp_path, "types.yaml", {"data_path": "/d", "steps": "many"})
    with pytest.raises(C.ConfigError) as err:
        C.load(Job, [bad])
    assert "'steps'" in str(err.value) and "types.yaml" in str(err.value)
    with pytest.raises(C.ConfigError, match="optim.lr"):
        C.load(Job, [], ["data_path=/d", "optim.lr=fast"])


def test_missing_required_value_names_key():
    with pytest.raises(C.ConfigError, match="'data_path'"):
        C.load(Job)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(Job, [str(tmp_path / "nope.yaml")])
    broken = _write(tmp_path, "broken.yaml", "steps: [1, 2\n")
    with pytest.raises(C.ConfigError, match="broken.yaml"):
        C.load(Job, [broken])
    listy = _write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load(Job, [listy])


def test_override_without_equals_is_rejected():
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load(Job, [], ["data_path"])


def test_loaded_config_is_read_only():
    cfg = C.load(Job, [], ["data_path=/d"])
    with pytest.raises(Exception):
        cfg.steps = 5


@pytest.mark.parametrize("argv,expected_rank", [
    (["--local_rank=3", "--config", "x.yaml", "steps=2"], 3),
    (["--config", "x.yaml", "--local_rank", "1", "steps=2"], 1),
    (["--config", "x.yaml", "--local-rank=0", "steps=2"], 0),
    (["--config", "x.yaml", "steps=2"], None),
])
def test_launcher_local_rank_is_stripped(argv, expected_rank, monkeypatch):
    # Set first, so that monkeypatch restores the variable: deleting an absent one records
    # nothing, and the rank set here stayed in the worker (LOCAL_RANK=3 reached later tests'
    # trainers, a world of one whose rank 0 was no longer its node's first).
    monkeypatch.setenv("LOCAL_RANK", "unset")
    monkeypatch.delenv("LOCAL_RANK")
    rest, rank = entry.split_launcher_args(argv)
    assert rest == ["--config", "x.yaml", "steps=2"]
    assert rank == expected_rank
    assert os.environ.get("LOCAL_RANK") == (None if expected_rank is None else str(expected_rank))


def test_a_launcher_rank_that_is_no_number_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        entry.split_launcher_args(["--local_rank=abc", "steps=2"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "error: command line: --local_rank must be a whole number, got 'abc'"


def test_save_resolved_round_trips(tmp_path):
    cfg = C.load(Job, [], ["data_path=/d", "steps=7"])
    url = C.save_resolved(cfg, str(tmp_path / "out"))
    again = C.load(Job, [url])
    assert C.to_dict(again) == C.to_dict(cfg)
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no temp left


@pytest.mark.slow
def test_save_resolved_to_s3(s3_bucket):
    cfg = C.load(Job, [], ["data_path=s3://x/y"])
    url = C.save_resolved(cfg, s3_bucket + "/run1")
    assert C.to_dict(C.load(Job, [url])) == C.to_dict(cfg)


@dataclass
class Stage:
    steps: int = 1


@dataclass
class Staged:
    stages: list[Stage] = field(default_factory=lambda: [Stage(), Stage()])


def test_override_indexes_into_lists():
    cfg = C.load(Staged, [], ["stages.1.steps=5"])
    assert [s.steps for s in cfg.stages] == [1, 5]
    with pytest.raises(C.ConfigError, match=r"stages\[0\].stepz"):
        C.load(Staged, [], ["stages.0.stepz=2"])


def test_an_int_beyond_64_bits_is_refused_naming_key_and_source(tmp_path):
    """Python took 10**22 steps as given; torch, numpy and the checkpoint's records cannot."""
    big = _write(tmp_path, "big.yaml", "stages:\n  - steps: 1\n  - steps: 10000000000000000000000\n")
    with pytest.raises(C.ConfigError, match=rf"^{re.escape(big)}: key 'stages.1.steps': 10{{22}} "):
        C.load(Staged, [big])
    with pytest.raises(C.ConfigError, match=r"^command line: key 'stages.0.steps': -9223372036854775809 "):
        C.load(Staged, [], ["stages.0.steps=-9223372036854775809"])
    assert C.load(Staged, [], ["stages.0.steps=9223372036854775807"]).stages[0].steps == 2**63 - 1


def test_unparseable_override_value_is_one_line():
    with pytest.raises(C.ConfigError) as err:
        C.load(Staged, [], ["stages=[1, 2"])
    assert "'stages'" in str(err.value) and "\n" not in str(err.value)



def test_interpolation_on_command_line_resolves_in_the_whole_tree():
    cfg = C.load(Job, [], ["data_path=/d", "name=${data_path}/run"])
    assert cfg.name == "/d/run"
    with pytest.raises(C.ConfigError, match=r"key 'name': Interpolation key 'nope' not found"):
        C.load(Job, [], ["data_path=/d", "name=${nope}"])


def test_unresolvable_interpolation_in_yaml_is_one_line(tmp_path):
    bad = _write(tmp_path, "bad.yaml", "data_path: /d\nname: ${nope.x}\n")
    with pytest.raises(C.ConfigError) as err:
        C.load(Job, [bad])
    assert "key 'name'" in str(err.value) and "'nope.x' not found" in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_config_files_name_the_file(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: f\xeate\n".encode("latin-1"))
    scalar = _write(tmp_path, "scalar.yaml", "5\n")
    for path, says in [(str(latin1), "not a UTF-8 text file"), (str(tmp_path), "Is a directory"),
                       (scalar, "top level must be a mapping of keys, got a single value")]:
        with pytest.raises(C.ConfigError, match=f"^{path}: .*{says}"):
            C.load(Job, [path])


@pytest.mark.parametrize("text, says", [
    ("just a string\n", "top level must be a mapping of keys, got a single value"),
    ("- data_path: /d\n", "top level must be a mapping of keys, got a list"),
    ("data_path: /d\noptim: [1, 2]\n", "key 'optim': expected a mapping of keys, got a list"),
    ("data_path: /d\noptim: 0.1\n", "key 'optim': expected a mapping of keys, got the value 0.1"),
    ("\x00name: a\n", "cannot parse YAML at character 0: unacceptable character #x0000"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a UTF-8 text file (byte 0"),
])
def test_a_yaml_of_the_wrong_shape_is_one_line_naming_file_and_key(tmp_path, text, says):
    """A lone string was read as a key with no value, and a section given a list or a value
    raised omegaconf's "Merge error" without the key."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(C.ConfigError) as err:
        C.load(Job, [str(path)], ["data_path=/d"])
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and says in msg and "\n" not in msg, msg


def test_a_key_given_twice_on_the_command_line_is_logged_and_the_last_wins(caplog):
    cfg = C.load(Job, [], ["data_path=/d", "steps=3", "optim.lr=0.5", "steps=7"])
    assert cfg.steps == 7
    twice = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert twice == ["command line: key 'steps' is given more than once; the last value (7) wins"]


def test_mapping_given_for_a_list_names_the_key_and_file(tmp_path):
    bad = _write(tmp_path, "bad.yaml", {"data_path": "/d", "optim": {"betas": {"b1": 0.9}}})
    with pytest.raises(C.ConfigError,
                       match=r"bad.yaml: key 'optim.betas': expected a list, got a mapping"):
        C.load(Job, [bad])


def test_override_index_past_a_lists_end_says_so(tmp_path):
    with pytest.raises(C.ConfigError, match=r"key 'stages.2.steps': index 2 is out of range "
                                            r"\('stages' holds 2 items\)"):
        C.load(Staged, [], ["stages.2.steps=5"])
    # these once named 'stages[0]' with omegaconf's type error about a dict
    with pytest.raises(C.ConfigError, match=r"key 'stages.-3.steps': index -3 is out of range"):
        C.load(Staged, [], ["stages.-3.steps=5"])
    unset = _write(tmp_path, "unset.yaml", "stages: ???\n")
    with pytest.raises(C.ConfigError, match=r"'stages' is unset \(\?\?\?\): give the whole list"):
        C.load(Staged, [unset], ["stages.0.steps=5"])


def test_an_unknown_key_inside_a_whole_list_or_section_is_named_from_the_top():
    """omegaconf named it relative to the value given: 'stepz', not 'stages[1].stepz'."""
    with pytest.raises(C.ConfigError, match=r"key 'stages\[1\].stepz': Key 'stepz' not in"):
        C.load(Staged, [], ["stages=[{steps: 2}, {stepz: 3}]"])
    with pytest.raises(C.ConfigError, match=r"key 'optim.lrr': Key 'lrr' not in"):
        C.load(Job, [], ["data_path=/d", "optim={lrr: 0.1}"])
    with pytest.raises(C.ConfigError, match=r"key 'stages\[0\].stepz': Key 'stepz' not in"):
        C.load(Staged, [], ["stages.0={stepz: 3}"])


def test_an_empty_value_and_a_null_key_are_named(tmp_path):
    with pytest.raises(C.ConfigError, match=r"key 'name': no value after '=' \(an empty string "
                                            r"is name=''\)"):
        C.load(Job, [], ["data_path=/d", "name="])
    assert C.load(Job, [], ["data_path=/d", "name=''"]).name == ""
    null_key = _write(tmp_path, "null.yaml", "data_path: /d\noptim:\n  ~: 1\n")
    with pytest.raises(C.ConfigError, match=r"null.yaml: key 'optim'"):
        C.load(Job, [null_key])


def test_a_yamls_missing_marker_requires_a_value_over_a_default(tmp_path):
    """`???` in a YAML asks a later YAML or the command line for the value, even where the schema
    has a default (merging would keep the default); interpolations elsewhere stay unresolved."""
    recipe = _write(tmp_path, "recipe.yaml", "data_path: /d\nname: ???\noptim:\n  lr: ???\n")
    with pytest.raises(C.ConfigError, match=r"missing required value for key 'name' \(and 1 "
                                            r"more: optim.lr\)"):
        C.load(Job, [recipe])
    site = _write(tmp_path, "site.yaml", "name: ${data_path}-run\n")
    cfg = C.load(Job, [recipe, site], ["optim.lr=0.5"])
    assert (cfg.name, cfg.optim.lr) == ("/d-run", 0.5)


def test_a_config_nested_too_deeply_is_one_line_naming_its_source(tmp_path):
    """PyYAML and omegaconf recurse per level: 200 levels raised a bare RecursionError."""
    block = _write(tmp_path, "block.yaml", "data_path: /d\noptim:\n" + "".join(
        "  " * (i + 1) + f"k{i}:\n" for i in range(200)))
    flow = _write(tmp_path, "flow.yaml", "data_path: " + "[" * 200 + "]" * 200 + "\n")
    for path in (block, flow):
        with pytest.raises(C.ConfigError, match=f"^{path}: nested too deeply"):
            C.load(Job, [path])
    with pytest.raises(C.ConfigError, match="^command line: nested too deeply"):
        C.load(Job, [], ["data_path=/d", "optim.betas=" + "[" * 200 + "]" * 200])


@dataclass
class Named:
    stages: list[Stage] = field(default_factory=list)


def test_a_bad_key_in_a_later_list_item_names_that_item(tmp_path):
    """omegaconf names it relative to the item: a YAML's said 'steps', a command line's named
    the first item holding the key (stages[0] for an error in stages[1])."""
    for text, says in [("stages: [{steps: 1}, {steps: 2.5}]", r"key 'stages\[1\].steps': Value '2.5'"),
                       ("stages: [{steps: x}, {steps: 2}]", r"key 'stages\[0\].steps': Value 'x'"),
                       ("stages: [{steps: 1}, {stepz: 2}]", r"key 'stages\[1\].stepz': Key 'stepz'"),
                       ("stages: [{steps: 1}, {steps: null}]", r"key 'stages\[1\].steps': "
                                                               r"Incompatible value 'None'")]:
        path = _write(tmp_path, "s.yaml", text + "\n")
        with pytest.raises(C.ConfigError, match=f"^{path}: {says}"):
            C.load(Named, [path])
        with pytest.raises(C.ConfigError, match=f"^command line: {says}"):
            C.load(Named, [], [text.replace(": ", "=", 1)])


def test_a_key_below_an_unknown_key_or_a_value_is_named_once():
    """The key omegaconf reports is a part of the override's path; it was appended to it
    ('optim.bogus.x.optim.bogus'), and empty names between dots named key ''."""
    with pytest.raises(C.ConfigError, match=r"^command line: key 'optim.bogus': Key 'bogus' not"):
        C.load(Job, [], ["data_path=/d", "optim.bogus.x=1"])
    with pytest.raises(C.ConfigError, match=r"^command line: key 'steps': Value '\{\}'"):
        C.load(Job, [], ["data_path=/d", "steps.x=1"])
    for key in ("optim..lr", ".steps", "steps."):
        with pytest.raises(C.ConfigError, match=f"^command line: key '{re.escape(key)}': a name "
                                                f"in it is empty"):
            C.load(Job, [], ["data_path=/d", f"{key}=1"])


def test_an_escaped_interpolation_stays_text_through_resolve_save_and_objects(tmp_path):
    """`\\${...}` is how omegaconf writes `${...}` as text: it must stay text after resolving,
    in the saved YAML read back (by `load` and by read_resolved_yaml), and in a config rebuilt
    from the dataclass a trainer works with, while a real interpolation beside it resolves."""
    from omegaconf import OmegaConf

    yml = _write(tmp_path, "job.yaml", "data_path: '/d/\\${shard}'\nname: ${data_path}/run\n")
    cfg = C.load(Job, [yml], ["optim.betas=[0.8, 0.9]"])
    assert (cfg.data_path, cfg.name) == ("/d/${shard}", "/d/${shard}/run")
    url = C.save_resolved(cfg, str(tmp_path / "out"))
    assert C.read_resolved_yaml(url).data_path == "/d/${shard}"
    again = C.load(Job, [url])
    assert C.to_dict(again) == C.to_dict(cfg)
    as_object = OmegaConf.to_object(cfg)
    assert C.literal_config(as_object).name == "/d/${shard}/run"
    assert C.to_dict(C.load(Job, [_write(tmp_path, "obj.yaml", C.to_yaml(as_object))])) == C.to_dict(cfg)
    with pytest.raises(C.ConfigError, match="key 'name' is an interpolation"):
        C.read_resolved_yaml(_write(tmp_path, "live.yaml", "name: ${data_path}\n"))
