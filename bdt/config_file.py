"""A config YAML file read into one omegaconf tree, or a ConfigError: one line naming the file
(and the key, where one is to blame). bdt.config merges these trees into a job's typed config."""

from __future__ import annotations

import contextlib
import io
import os
import stat
from typing import Iterator

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Configs are a few KB; the YAML parsers hold a file many times over in memory.
MAX_CONFIG_BYTES = 1 << 20


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

    if not path.strip():  # the OS would open the working directory
        raise ConfigError("config file: the path is empty")
    try:
        fs, local = storage.filesystem(path)
    except ValueError as exc:  # a URL bdt refuses
        raise ConfigError(str(exc)) from None
    try:
        text = _read_capped(fs, local, path).decode("utf-8")
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
    except storage.STORE_ERRORS as exc:  # a directory, no permission, a store's error
        raise ConfigError(f"{path}: cannot read config file: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    except OmegaConfBaseException as exc:  # valid YAML omegaconf cannot hold (a null key)
        raise ConfigError(describe(exc, path)) from None
    return loaded


def _read_capped(fs, local: str, path: str) -> bytes:
    """The bytes of a config file, refusing what cannot be one before reading it: a FIFO (its
    open waits for a writer, forever) or a device (/dev/zero fills memory); and past
    MAX_CONFIG_BYTES (parsing 50 MB of YAML took 4 minutes and 5 GB before failing)."""
    from bdt import storage

    mode = stat.S_IFREG if storage.is_remote(path) else os.stat(local).st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # a directory: open says so
        raise ConfigError(f"{path}: not a regular file (a pipe, socket or device); every rank "
                          f"reads the config, so give a file")
    try:
        with fs.open(local, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except ValueError as exc:  # s3fs: a URL with no key (s3://bucket/, s3:///x.yaml)
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, which no config "
                          f"is (a few KB of YAML): is it the right file?")
    return data
