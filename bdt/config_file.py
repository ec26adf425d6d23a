"""A config YAML file read into one omegaconf tree, or a ConfigError: one line naming the file
(and the key, where one is to blame). bdt.config merges these trees into a job's typed config."""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
from typing import Any, Iterable, Iterator

import yaml
from fsspec.exceptions import FSTimeoutError
from omegaconf import BooleanNode, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import KeyValidationError, OmegaConfBaseException

# Configs are a few KB; the YAML parsers hold a file many times over in memory.
MAX_CONFIG_BYTES = 1 << 20
# An object store's config read: botocore retried a dead endpoint for 10 s (refused) to minutes
# (no answer) in silence; a live store answers a few KB in well under this, its retries included.
STORE_READ_TIMEOUT_S = 60

# (path from the top, text) of a plain (unquoted) YAML scalar: what the user wrote.
Written = tuple[tuple[Any, ...], str]
# YAML 1.1 numbers nobody writes on purpose in a config: a leading 0 (octal) and base 60.
_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_BASE_60 = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")
_BOOL_TAG = "tag:yaml.org,2002:bool"


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key and its source."""


def describe(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    name = getattr(exc, "key", None)
    if isinstance(exc, KeyValidationError) and isinstance(name, (int, float)) and key:
        # omegaconf said "Key 1 (int) is incompatible with (str)" of `1: x` in a text-keyed section
        return (f"{source}: key '{key}': YAML reads the unquoted name {name} as a number, and "
                f"the names here are text: quote it ('{name}': ...)")
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
    return read_yaml_as_written(path)[0]


def read_yaml_as_written(path: str) -> tuple[DictConfig, list[Written]]:
    """The file's tree, and its plain scalars as written (for keep_as_written)."""
    with nesting_checked(path):
        loaded, top = _read_yaml(path)
        return loaded, list(_plain_scalars(top))  # walked once omegaconf bounded its aliases


def written_scalars(text: str, prefix: tuple[str, ...]) -> list[Written]:
    """The plain scalars of a command line's value `text` for key `prefix`, as written."""
    return list(_plain_scalars(yaml.compose(text, Loader=yaml.SafeLoader), prefix))


def refuse_bool_names(node: yaml.Node | None, source: str, path: tuple[Any, ...] = ()) -> None:
    """ConfigError naming a mapping key written as an unquoted YAML 1.1 boolean (`on: 1` is the
    key True): no config means one; omegaconf refused it as "Key True (bool) is incompatible
    with (str)" in a section typed any, and inside one of its mappings took it in silence."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            if isinstance(key, yaml.ScalarNode) and key.style is None and key.tag == _BOOL_TAG:
                raise ConfigError(f"{source}: key '{_dotted(path + (name,))}': YAML reads the "
                                  f"unquoted name {name} as a boolean, not text: quote it "
                                  f"('{name}': ...)")
            refuse_bool_names(value, source, path + (name,))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            refuse_bool_names(value, source, path + (i,))


def _plain_scalars(node: yaml.Node | None, path: tuple[Any, ...] = ()) -> Iterator[Written]:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                yield from _plain_scalars(value, path + (key.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            yield from _plain_scalars(value, path + (i,))
    elif isinstance(node, yaml.ScalarNode) and node.style is None and "${" not in node.value:
        yield path, node.value


def keep_as_written(cfg: DictConfig, written: Iterable[Written], source: str) -> None:
    """Undo YAML 1.1's reading of plain scalars where the schema shows it was not meant, after
    they were merged into `cfg`: a string key keeps the text (`family: no` was 'False', `name:
    1e-3` '0.001', `0755` '493'); any other key refuses an octal or base-60 number by name
    (`seed: 0042` was 34, `1:30` 90)."""
    for path, text in written:
        parent, value = _at(cfg, path)
        if isinstance(value, str) and value != text:  # the schema made text of a number or bool
            parent[path[-1] if isinstance(parent, DictConfig) else int(path[-1])] = text
        elif isinstance(value, (bool, int, float)) and (why := _unmeant_number(text, value)):
            raise ConfigError(f"{source}: key '{_dotted(path)}': {why}")


def refuse_non_bool(cfg: DictConfig, given: Any, source: str, path: tuple[Any, ...] = ()) -> None:
    """ConfigError naming the key where the values `given` (a source's plain tree, at `path` of
    `cfg`, once merged) set a bool-typed key to anything but a boolean: omegaconf took any
    non-zero number and the texts 'yes', '1', ... as true (`checkpoint.at_end: 2` ran as true).
    Unquoted, YAML's true/false/yes/no/on/off are booleans already."""
    if isinstance(given, dict):
        for key, value in given.items():
            refuse_non_bool(cfg, value, source, path + (key,))
    elif isinstance(given, list):
        for i, value in enumerate(given):
            refuse_non_bool(cfg, value, source, path + (i,))
    elif not (given is None or isinstance(given, bool)
              or isinstance(given, str) and "${" in given):  # an interpolation resolves later
        parent, _ = _at(cfg, path)
        key = int(path[-1]) if isinstance(parent, ListConfig) else path[-1] if path else None
        if parent is not None and isinstance(parent._get_node(key), BooleanNode):
            raise ConfigError(f"{source}: key '{_dotted(path)}': {given!r} is not a boolean; "
                              f"write true or false")


def _dotted(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _at(cfg: DictConfig, path: tuple[Any, ...]) -> tuple[Any, Any]:
    """(container, value) at `path` in `cfg`; (None, None) where it holds no such key."""
    parent, node = None, cfg
    try:
        for part in path:
            if isinstance(node, ListConfig) and str(part).isdigit() and int(part) < len(node):
                parent, node = node, node[int(part)]
            elif isinstance(node, DictConfig) and part in node:
                parent, node = node, node[part]
            else:
                return None, None
    except OmegaConfBaseException:  # a `???` or an interpolation on the way: not a scalar here
        return None, None
    return parent, node


def _unmeant_number(text: str, value: Any) -> str | None:
    if _OCTAL.fullmatch(text):
        return (f"YAML reads {text} as an octal number ({int(text.replace('_', ''), 8)}); "
                f"write it without the leading 0, or in quotes for text")
    if _BASE_60.fullmatch(text):
        number = f" ({value})" if not isinstance(value, bool) else ""
        return (f"YAML reads {text} as a base-60 number{number}; write the number itself, or "
                f"in quotes for text")
    return None


def _read_yaml(path: str) -> tuple[DictConfig, yaml.Node | None]:
    from bdt import storage  # local import, as in bdt.config.save_resolved

    if not path.strip():  # the OS would open the working directory
        raise ConfigError("config file: the path is empty")
    if path == "-":
        raise ConfigError("config file '-': a config is not read from stdin (every rank of a "
                          "launch reads the config, a pipe only once): write it to a file (a "
                          "launcher that fills in a template writes it beside the run), or give "
                          "values as key=value")
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
        refuse_bool_names(top, path)
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
    return loaded, top


def _read_capped(fs, local: str, path: str) -> bytes:
    """The bytes of a config file, refusing what cannot be one before reading it: a FIFO (its
    open waits for a writer, forever) or a device (/dev/zero fills memory); and past
    MAX_CONFIG_BYTES (parsing 50 MB of YAML took 4 minutes and 5 GB before failing)."""
    from bdt import storage

    mode = stat.S_IFREG if storage.is_remote(path) else os.stat(local).st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # a directory: open says so
        raise ConfigError(f"{path}: not a regular file (a pipe, socket or device); every rank "
                          f"reads the config, so give a file")
    if getattr(fs, "async_impl", False):  # an object store: one GET, bounded in time
        data = _read_store(fs, local, path)
    else:
        with fs.open(local, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, which no config "
                          f"is (a few KB of YAML): is it the right file?")
    return data


def _read_store(fs, local: str, path: str) -> bytes:
    """The first MAX_CONFIG_BYTES + 1 bytes of an object, or ConfigError naming the endpoint
    when the store has not answered within STORE_READ_TIMEOUT_S."""
    try:
        split = getattr(fs, "split_path", None)  # s3fs, gcsfs: (bucket, key, version)
        if split is not None and not split(local)[1]:  # botocore's refusal takes 2 lines
            raise ValueError("the URL names a bucket, not an object in it")
        return fs.cat_file(local, start=0, end=MAX_CONFIG_BYTES + 1,
                           timeout=STORE_READ_TIMEOUT_S)  # fsspec's bound on one sync call
    except ValueError as exc:  # the check above (s3://bucket/, s3:///x.yaml), or s3fs's own
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except FSTimeoutError:
        client = getattr(fs, "s3", None)  # s3fs's botocore client knows where it connects
        endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None)
        at = f" at {endpoint}" if endpoint else ""
        raise ConfigError(f"{path}: the store{at} did not answer within {STORE_READ_TIMEOUT_S} s "
                          f"(cannot read config file): is its endpoint right and up?") from None
