"""One typed configuration tree per job: dataclass defaults -> YAML file(s) -> `key=value`.

Every entry point (training, tokenizer training, extraction, data generation) declares its
config as a dataclass tree and calls `load`. omegaconf does the merging and type checking; this
module turns its exceptions into one line that names the offending key and where it came from
(which YAML file, or the command line), and writes the resolved config beside outputs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import is_dataclass
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bdt.config_file import (ConfigError, describe, keep_as_written, nesting_checked, read_yaml,
                             read_yaml_as_written, refuse_bool_names, refuse_non_bool,
                             written_scalars)

T = TypeVar("T")
log = logging.getLogger(__name__)

RESOLVED_CONFIG_NAME = "config.yaml"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (OmegaConfBaseException, TypeError) as exc:
        # omegaconf names no key when a section gets a list or a value (a "Merge error"), and
        # raises a bare TypeError when a list gets a mapping: find the key in the two trees.
        if getattr(exc, "full_key", None) or getattr(exc, "key", None):
            tree = OmegaConf.to_container(other) if OmegaConf.is_config(other) else other
            if isinstance(tree, dict) and (key := _in_yaml_lists(exc, tree)):
                exc.full_key = key
            raise ConfigError(describe(exc, source)) from None
        found = _kind_mismatch(OmegaConf.to_container(base), OmegaConf.to_container(other))
        if found is None:
            raise ConfigError(describe(exc, source) if isinstance(exc, OmegaConfBaseException)
                              else f"{source}: {exc}") from None
        raise ConfigError(f"{source}: key '{found[0]}': {found[1]}") from None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    return "a list" if isinstance(value, list) else f"the value {value!r}"


def _kind_mismatch(base: dict, other: dict, prefix: str = "") -> tuple[str, str] | None:
    """(dotted key, problem) of the first section or list in `base` that `other` gives another
    kind of value for (a list for a section, a mapping for a list)."""
    for key, value in other.items():
        here, ours = f"{prefix}{key}", base.get(key)
        if isinstance(ours, list) and isinstance(value, dict):
            return here, "expected a list, got a mapping"
        if isinstance(ours, dict) and value is not None and not isinstance(value, dict):
            return here, f"expected a mapping of keys, got {_kind(value)}"
        if isinstance(value, dict) and isinstance(ours, dict):
            found = _kind_mismatch(ours, value, here + ".")
            if found:
                return found
    return None


def read_resolved_yaml(path: str) -> DictConfig:
    """read_yaml of a file bdt writes resolved (save_resolved: a model's or a run's config).
    ConfigError naming the file and key when it holds an interpolation (`${...}`): such a file
    came from elsewhere (a shared model folder), and resolving its `${oc.env:...}` would read
    this machine's environment into it."""
    cfg = read_yaml(path)
    with nesting_checked(path):
        keys = [key for key, _ in _interpolations(OmegaConf.to_container(cfg, resolve=False))]
    if keys:
        raise ConfigError(f"{path}: key '{keys[0]}' is an interpolation; bdt writes this file "
                          f"with plain values")
    return cfg


_LIVE = re.compile(r"(?<!\\)\$\{")  # `${` not escaped by a backslash: an interpolation


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every value in a plain container that is not a mapping or list."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), node


def _interpolations(node: Any) -> Iterator[tuple[str, str]]:
    """(dotted key, text) of every string in a plain container that holds an interpolation."""
    return ((key, v) for key, v in _leaves(node) if isinstance(v, str) and _LIVE.search(v))


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply `key=value` items one by one; dotted keys may index lists (`stages.0.steps=5`).

    Values are parsed the way omegaconf parses YAML scalars and flow collections (YAML 1.1's
    surprises undone or refused as in a YAML file: keep_as_written). A key given
    twice takes its later value, as wrappers that append overrides to a command expect (the demo
    script's DEMO_TRAIN_ARGS); it is logged, since by hand it is usually a slip.
    """
    seen: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: '{item}' is not a key=value override")
        if "" in key.split("."):  # omegaconf would name a key '' or only a part of this one
            raise ConfigError(f"command line: key '{key}': a name in it is empty (two dots in a "
                              f"row, or a dot at either end)")
        if key in seen:
            log.warning("command line: key '%s' is given more than once; the last value (%s) "
                        "wins", key, raw)
        seen.add(key)
        try:
            # Unresolved: an interpolation (`run_dir=${data.root}/run`) resolves in the whole tree.
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
        except (yaml.YAMLError, OmegaConfBaseException) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"command line: key '{key}': cannot parse value '{raw}': {first}") from None
        refuse_bool_names(yaml.compose(raw, Loader=yaml.SafeLoader), "command line",
                          tuple(key.split(".")))
        _check_list_indices(cfg, key)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            if value is None and raw.strip() == "":
                raise ConfigError(f"command line: key '{key}': no value after '=' (an empty "
                                  f"string is {key}='')") from None
            raise ConfigError(describe(_under(exc, key, value), "command line")) from None
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"command line: key '{key}': {exc}") from None
        keep_as_written(cfg, written_scalars(raw, tuple(key.split("."))), "command line")
        refuse_non_bool(cfg, value, "command line", tuple(key.split(".")))
    return cfg


def _under(exc: OmegaConfBaseException, key: str, value: Any) -> OmegaConfBaseException:
    """`exc` with its key named from the top: omegaconf names a key inside a whole section or
    list given on the command line (`stages=[{bogus: 1}]`) relative to that value."""
    inner = getattr(exc, "full_key", None)
    key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)  # omegaconf's form: stages[0].steps
    # Already from the top: the key itself, a key inside the value, or a part of the key's path
    # (`model.bogus` for `model.bogus.x=1`, `seed` for `seed.x=1`).
    if not inner or inner == key or inner.startswith((key + ".", key + "[")) or \
            key.startswith((inner + ".", inner + "[")):
        return exc
    if isinstance(value, list):
        found = _item_holding(value, inner, exc)
        exc.full_key = f"{key}[{'?' if found is None else found[0]}].{inner}"
    else:
        exc.full_key = f"{key}.{inner}"
    return exc


def _item_holding(items: list, inner: str, exc: OmegaConfBaseException) -> tuple[int, bool] | None:
    """(index, exact) of the mapping in `items` that omegaconf's item-relative key `inner` is
    about: the first holding the offending value (exc.value) there, else the first with the key."""
    head = re.split(r"[.\[]", inner, maxsplit=1)[0]
    having = [i for i, item in enumerate(items) if isinstance(item, dict) and head in item]
    exact = [i for i in having if inner == head and items[i][head] == getattr(exc, "value", None)]
    return (exact[0], True) if exact else (having[0], False) if having else None


def _in_yaml_lists(exc: OmegaConfBaseException, tree: dict) -> str | None:
    """The key from the top of an error omegaconf names relative to an item of a YAML's list
    (`steps` for `stages[1].steps`); None when it is from the top already."""
    inner = getattr(exc, "full_key", None)
    if not inner or re.split(r"[.\[]", inner, maxsplit=1)[0] in tree:
        return None
    found: list[tuple[bool, str]] = []

    def visit(node: Any, where: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        if isinstance(node, list) and (hit := _item_holding(node, inner, exc)):
            found.append((hit[1], f"{where}[{hit[0]}].{inner}"))
        for k, v in items:
            visit(v, f"{where}[{k}]" if isinstance(node, list) else f"{where}.{k}".lstrip("."))

    visit(tree, "")
    return max(found, key=lambda f: f[0])[1] if found else None


def _check_list_indices(cfg: DictConfig, key: str) -> None:
    """Refuse an index into a list that is unset (`???`), negative or past its end (omegaconf
    would report a confusing type error about the first item)."""
    parts = key.split(".")
    for i, part in enumerate(parts[1:], 1):
        where = ".".join(parts[:i])
        parent = cfg if i == 1 else OmegaConf.select(cfg, ".".join(parts[:i - 1]), default=None,
                                                     throw_on_resolution_failure=False)
        try:
            unset = isinstance(parent, DictConfig) and OmegaConf.is_missing(parent, parts[i - 1])
        except OmegaConfBaseException:  # no such key: the update names it
            unset = False
        if unset:
            raise ConfigError(f"command line: key '{key}': '{where}' is unset (???): give the "
                              f"whole list, e.g. {where}=[...]")
        node = OmegaConf.select(cfg, where, default=None, throw_on_resolution_failure=False)
        index = part.lstrip("-")
        if isinstance(node, ListConfig) and index.isdigit() and \
                not 0 <= int(part) < len(node):
            raise ConfigError(f"command line: key '{key}': index {part} is out of range "
                              f"('{where}' holds {len(node)} items)")


def _keep_required(cfg: DictConfig, loaded: DictConfig) -> None:
    """A YAML's `???` asks a later YAML or the command line for the value; merging it over a
    default would keep the default, so it is set in the merged tree. (List items need nothing:
    a YAML's list replaces the whole list, its `???` with it.)"""
    for key in _required_keys(OmegaConf.to_container(loaded, resolve=False)):
        OmegaConf.update(cfg, key, "???", merge=False)


def _required_keys(node: dict, prefix: str = "") -> Iterator[str]:
    """Dotted keys whose value is `???` in a plain mapping (not resolving: its interpolations
    may point into other files)."""
    for key, value in node.items():
        if value == "???":
            yield f"{prefix}{key}"
        elif isinstance(value, dict):
            yield from _required_keys(value, f"{prefix}{key}.")


def _refuse_renamed(keys: Sequence[str], renamed: Mapping[str, str], source: str) -> None:
    for key in keys:
        if key in renamed:
            raise ConfigError(f"{source}: key '{key}' was renamed to '{renamed[key]}'")


def load(schema: type[T], yaml_paths: Sequence[str] = (), overrides: Sequence[str] = (),
         renamed: Mapping[str, str] | None = None, unused: Sequence[str] = ()) -> T:
    """Build `schema` (a dataclass type) from its defaults, then each YAML, then overrides.

    Returns a typed, read-only omegaconf object that behaves like the dataclass. Unknown keys,
    wrong types and values left missing (`???`) raise ConfigError naming the key and source,
    except the keys in `unused` (ones the command never reads: reading one still raises);
    a top-level key in `renamed` (old -> new) names its new name.
    """
    if not is_dataclass(schema):
        raise TypeError(f"config schema must be a dataclass, got {schema!r}")
    renamed = renamed or {}
    cfg = OmegaConf.structured(schema)
    trees: list[tuple[str, dict]] = []  # each YAML as written, to name where an interpolation is
    for path in yaml_paths:
        loaded, written = read_yaml_as_written(path)
        _refuse_renamed(list(loaded.keys()), renamed, path)
        with nesting_checked(path):
            cfg = _merge(cfg, loaded, path)
            _keep_required(cfg, loaded)
            keep_as_written(cfg, written, path)
            trees.append((path, OmegaConf.to_container(loaded, resolve=False)))
            refuse_non_bool(cfg, trees[-1][1], path)
    _refuse_renamed([o.partition("=")[0].split(".")[0] for o in overrides], renamed, "command line")
    with nesting_checked("command line"):
        cfg = _apply_overrides(cfg, overrides)
    sources = ", ".join(list(yaml_paths) + (["command line"] if overrides else [])) or "defaults"
    with nesting_checked(sources):
        try:
            cfg = _resolved(cfg, sources, unused)
        except OmegaConfBaseException as exc:  # an interpolation that does not resolve
            key = getattr(exc, "full_key", None) or ""
            raise ConfigError(describe(exc, _setter(key, trees, overrides))) from None
        # Python's ints have no bound, the steps, counters and seeds they become do (torch,
        # numpy, the checkpoint's records): 64 bits. Ignoring the unused keys, as above.
        for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
            if isinstance(value, int) and not -2**63 <= value < 2**63 and key not in unused:
                raise ConfigError(f"{_setter(key, trees, overrides)}: key '{key}': {value} does "
                                  f"not fit in 64 bits")
    return cfg  # type: ignore[return-value]


def _setter(key: str, trees: Sequence[tuple[str, dict]], overrides: Sequence[str]) -> str:
    """Which source gave omegaconf's `key` (`stages[0].shards`) its value: the command line, or
    the last YAML that holds it or a list above it (a YAML's list replaces the whole list);
    "interpolation" for a default or an error naming no key."""
    parts = re.findall(r"[^.\[\]]+", key)
    if not parts:
        return "interpolation"
    for item in reversed(overrides):
        if parts[:len(given := re.findall(r"[^.\[\]]+", item.partition("=")[0]))] == given:
            return "command line"
    for path, node in reversed(trees):
        for part in parts:
            if isinstance(node, list):
                return path
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return path
    return "interpolation"


def _resolved(cfg: DictConfig, sources: str, unused: Sequence[str] = ()) -> DictConfig:
    """`cfg` checked for missing values (but `unused` keys), its interpolations resolved, made
    read-only; an interpolation that does not resolve raises omegaconf's error."""
    # missing_keys reads every value, so it resolves interpolations too
    missing = sorted(OmegaConf.missing_keys(cfg) - set(unused))
    if missing:
        raise ConfigError(f"missing required value for key '{missing[0]}'"
                          + (f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else "")
                          + f"; set it in the YAML or as {missing[0]}=... (read: {sources})")
    OmegaConf.resolve(cfg)
    _keep_literal(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _keep_literal(cfg: DictConfig) -> None:
    """OmegaConf.resolve stores an escaped `\\${...}` as the bare text `${...}`, which reads as
    an interpolation again: escape it once more, so the value stays the text the user wrote."""
    for key, text in _interpolations(OmegaConf.to_container(cfg, resolve=False)):
        OmegaConf.update(cfg, key, _LIVE.sub(r"\\${", text), merge=False)


def literal_config(value: Any) -> DictConfig:
    """OmegaConf.structured of an already resolved value (a dataclass instance, a plain dict):
    text that looks like an interpolation stays text, as `load` gave it."""
    cfg = OmegaConf.structured(value)
    _keep_literal(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    """`cfg` resolved, as YAML that reads back to the same values: text that looks like an
    interpolation (an escaped one the user wrote) is written escaped."""
    plain = OmegaConf.to_container(cfg if OmegaConf.is_config(cfg) else literal_config(cfg),
                                   resolve=True)
    return OmegaConf.to_yaml(literal_config(plain))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_resolved(cfg: Any, out_dir: str, name: str = RESOLVED_CONFIG_NAME) -> str:
    """Write the resolved config as YAML into `out_dir` (local path or fsspec URL).

    Local writes go to a temporary name first and are renamed, so a reader never sees half a
    file; object stores only show an object once its upload completes.
    """
    from bdt.storage import write_bytes_atomic  # local import: storage depends on nothing here

    url = out_dir.rstrip("/") + "/" + name
    write_bytes_atomic(url, to_yaml(cfg).encode())
    return url
