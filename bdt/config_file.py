"""A config YAML file read into one omegaconf tree, or a ConfigError: one line naming the file
(and the key, where one is to blame). bdt.config merges these trees into a job's typed config."""

from __future__ import annotations

import contextlib
import io
from typing import Iterator

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key and its source."""


def describe(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    # omegaconf messages carry a multi-line "full_key: ... object_type=..." trailer; keep line 1.
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if key:
        return f"{source}: key '{key}': {msg}"
    return f"{source}: {msg}"


@contextlib.contextmanager
def nesting_checked(source: str) -> Iterator[None]:
    """ConfigError naming `source` for a tree nested beyond Python's recursion limit: PyYAML
    and omegaconf walk it recursively (about 100 levels is the most they take)."""
    try:
        yield
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply for a config (more than about 100 "
                          f"levels of mappings or lists)") from None


def read_yaml(path: str) -> DictConfig:
    with nesting_checked(path):
        return _read_yaml(path)


def _read_yaml(path: str) -> DictConfig:
    from bdt import storage  # local import, as in bdt.config.save_resolved

    try:
        fs, local = storage.filesystem(path)
    except ValueError as exc:  # a URL bdt refuses
        raise ConfigError(str(exc)) from None
    try:
        with fs.open(local, "rb") as f:
            text = f.read().decode("utf-8")
        # The top node's kind first: omegaconf would read a lone string as a key with no value.
        top = yaml.compose(text, Loader=yaml.SafeLoader)
        if top is not None and not isinstance(top, yaml.MappingNode):
            got = "a list" if isinstance(top, yaml.SequenceNode) else "a single value"
            raise ConfigError(f"{path}: top level must be a mapping of keys, got {got}")
        loaded = OmegaConf.load(io.StringIO(text))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})"
                          ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: cannot parse YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:  # a control character (ReaderError): one line, its position
        where = f" at character {exc.position}" if isinstance(exc, yaml.reader.ReaderError) else ""
        raise ConfigError(f"{path}: cannot parse YAML{where}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except OmegaConfBaseException as exc:  # valid YAML omegaconf cannot hold (a null key)
        raise ConfigError(describe(exc, path)) from None
    return loaded
