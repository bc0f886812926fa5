"""OpenPCDet-style YAML configs (EasyDict, ``_BASE_CONFIG_``, ``--set`` overrides) and the one
config-section validator of this package (:func:`from_cfg`), pure python.

A config file or ``_BASE_CONFIG_`` entry is found by :func:`find_config`, in order: as given
(absolute, or relative to the including file's folder), the working directory, this
repository's root (so ``cfgs/...`` works from anywhere; a wheel carries the same ``cfgs/`` inside
the package) and OpenPCDet's ``tools/`` (so OpenPCDet's
own ``cfgs/dataset_configs/...`` paths work unchanged). Bases may themselves have bases.

Every module that reads a config section validates it with :func:`from_cfg` against a spec of
:class:`Opt` entries: an unknown key is a :class:`ConfigError` naming the key and the known
ones; values are typed and range-checked once, defaults filled in.
"""
from __future__ import annotations

import copy
import difflib
import math
from ast import literal_eval
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml
from easydict import EasyDict

from pcdet_ext.openpcdet.locator import REPO_ROOT, pcdet_tools_dir

NoneType = type(None)
PACKAGED = Path(__file__).resolve().parent / "_data"  # cfgs/ as shipped in a wheel (setup.py)


class ConfigError(ValueError):
    """A config key is unknown, missing or has a value this package cannot use; the message names
    the key (``SECTION.KEY``) and what was expected."""


def find_config(ref: str, including_dir: Optional[Path] = None, what: str = "_BASE_CONFIG_") -> Path:
    """The file a ``_BASE_CONFIG_`` entry or ``--cfg_file`` names; the error lists every place tried."""
    ref_path = Path(str(ref)).expanduser()
    if ref_path.is_absolute():
        candidates = [ref_path]
    else:
        roots = (including_dir, Path.cwd(), REPO_ROOT, PACKAGED, pcdet_tools_dir())
        candidates = list(dict.fromkeys(d.resolve() / ref_path for d in roots if d is not None))  # once each
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise FileNotFoundError(f"{what} {str(ref)!r} not found; tried: " + ", ".join(str(c) for c in candidates))


def _read_yaml(path: Path) -> dict:
    with open(path, "r") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at top level, got {type(data).__name__}")
    return data


def merge_config(config: EasyDict, new_config: dict, including_dir: Path, chain: Tuple[Path, ...] = ()) -> EasyDict:
    """OpenPCDet's merge: load ``_BASE_CONFIG_`` first, then override key by key (recursively).
    ``chain``: the files being merged (a file that is its own base, directly or not, is an error)."""
    if "_BASE_CONFIG_" in new_config:
        base_path = find_config(new_config["_BASE_CONFIG_"], including_dir)
        if base_path in chain:
            loop = " -> ".join(str(p) for p in chain[chain.index(base_path):] + (base_path,))
            raise ConfigError(f"_BASE_CONFIG_: the bases form a cycle ({loop})")
        merge_config(config, _read_yaml(base_path), base_path.parent, chain + (base_path,))
    for key, val in new_config.items():
        if key == "_BASE_CONFIG_":
            continue
        if not isinstance(val, dict):
            config[key] = val
            continue
        if key not in config or not isinstance(config[key], dict):
            config[key] = EasyDict()
        merge_config(config[key], val, including_dir, chain)
    return config


def cfg_from_yaml_file(cfg_file, config: Optional[EasyDict] = None) -> EasyDict:
    """Load ``cfg_file`` (with its bases) into ``config`` (a new EasyDict by default)."""
    cfg_file = Path(cfg_file)
    if not cfg_file.is_file():
        raise FileNotFoundError(f"config file not found: {cfg_file}")
    config = EasyDict() if config is None else config
    return merge_config(config, _read_yaml(cfg_file), cfg_file.resolve().parent, (cfg_file.resolve(),))


def _coerce(value, current, key: str):
    if isinstance(current, bool) or isinstance(value, bool):
        if type(value) is not type(current):
            raise ConfigError(f"--set {key}: expected {type(current).__name__}, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, list) and isinstance(value, str):
        items = [v for v in value.split(",") if v != ""]
        kind = type(current[0]) if current else str
        return [kind(v) for v in items]
    if isinstance(current, list) and isinstance(value, tuple):
        return list(value)
    if current is not None and type(value) is not type(current):
        raise ConfigError(f"--set {key}: expected {type(current).__name__}, got {value!r}")
    return value


def _child(node, sub: str):
    """``node[sub]`` for a dict key or a list index; None when absent."""
    if isinstance(node, dict):
        return (node, sub) if sub in node else None
    if isinstance(node, list) and sub.lstrip("-").isdigit() and -len(node) <= int(sub) < len(node):
        return node, int(sub)
    return None


def cfg_from_list(cfg_list: Sequence[str], config: EasyDict) -> EasyDict:
    """Apply ``KEY VALUE`` pairs (``A.B.C 3``; list items by index, ``A.LIST.2.KEY``), values
    parsed as Python literals. A key absent from the config is an error."""
    if len(cfg_list) % 2:
        raise ConfigError(f"--set takes KEY VALUE pairs, got an odd number of items: {list(cfg_list)}")
    for key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
        node = config
        parts: List[str] = key.split(".")
        for i, sub in enumerate(parts):
            found = _child(node, sub)
            if found is None:
                raise ConfigError(f"--set {key}: no key {'.'.join(parts[:i + 1])} in the config")
            parent, index = found
            if i < len(parts) - 1:
                node = parent[index]
        try:
            value = literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        parent[index] = EasyDict(value) if isinstance(value, dict) else _coerce(value, parent[index], key)
    return config


# ---- section validation -------------------------------------------------------------------------
@dataclass(frozen=True)
class Opt:
    """One config key: default, accepted types (``float`` accepts ints, ``bool`` only where
    listed), allowed values (strings compared case-insensitively, returned lower-case), numeric
    bounds (inclusive unless ``*_open``); NaN and infinity are refused, also inside lists and mappings.
    ``note``: what an accepted-for-compatibility key means here."""
    default: Any = None
    types: Tuple[type, ...] = ()
    choices: Optional[Tuple[Any, ...]] = None
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    required: bool = False
    note: str = ""

    def check(self, name: str, value: Any) -> Any:
        """``value`` typed and checked, or a :class:`ConfigError` naming ``name``."""
        if value is None and (NoneType in self.types or (not self.types and not self.required)):
            return None
        if not _finite(value):
            raise ConfigError(f"{name}: expected finite numbers, got {value!r}")
        types = self.types
        if types:
            if isinstance(value, bool) and bool not in types:
                raise ConfigError(f"{name}: expected {type_names(types)}, got {value!r}")
            if float in types and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, types):
                raise ConfigError(f"{name}: expected {type_names(types)}, got {type(value).__name__} {value!r}")
        if self.choices is not None:
            key = value.lower() if isinstance(value, str) else value
            if key not in self.choices:
                raise ConfigError(f"{name}: expected one of {list(self.choices)}, got {value!r}")
            value = key
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            too_high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
            if too_low or too_high:
                raise ConfigError(f"{name}: expected a value in {self.range_text()}, got {value!r}")
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.lo is None else self.lo
        hi = "inf" if self.hi is None else self.hi
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


def _finite(value: Any) -> bool:
    """False when ``value`` is, or (in a list, tuple or mapping) holds, a NaN or infinite float."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    return True


def type_names(types: Iterable[type]) -> str:
    return " or ".join("null" if t is NoneType else t.__name__ for t in types)


def unknown_keys_error(where: str, unknown: Iterable[str], known: Iterable[str]) -> ConfigError:
    """The error for keys no reader knows: each named (with the closest known key), then every known key."""
    known = sorted(str(k) for k in known)
    parts = []
    for key in sorted(str(k) for k in unknown):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"{where}: unknown key(s) {', '.join(parts)}; known keys: {known}")


def from_cfg(section: Optional[Mapping], spec: Mapping[str, Opt], where: str,
             passthrough: Iterable[str] = ()) -> EasyDict:
    """Validate one config section against ``spec``: unknown keys (not in ``spec`` nor in
    ``passthrough``, the keys another reader owns and checks) are an error naming them and the
    known ones; each spec key typed and range-checked, defaults filled in. Returns a new EasyDict
    (spec keys, plus the passthrough keys present)."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(section).__name__} {section!r}")
    passthrough = set(passthrough)
    unknown = [k for k in section if k not in spec and k not in passthrough]
    if unknown:
        raise unknown_keys_error(where, unknown, set(spec) | passthrough)
    out = EasyDict()
    for key, opt in spec.items():
        if key in section:
            out[key] = opt.check(f"{where}.{key}", section[key])
        elif opt.required:
            raise ConfigError(f"{where}.{key}: required ({type_names(opt.types) or 'a value'})")
        else:
            out[key] = copy.deepcopy(opt.default)
    for key in passthrough & set(section):
        out[key] = section[key]
    return out


def agree(where_a: str, value_a: Any, where_b: str, value_b: Any) -> Any:
    """The one value two places give for the same setting (either may be None); both given and
    different is a :class:`ConfigError` naming both."""
    if value_a is not None and value_b is not None and value_a != value_b:
        raise ConfigError(f"{where_a}={value_a!r} conflicts with {where_b}={value_b!r}; give it in one place "
                          "or make them equal")
    return value_a if value_a is not None else value_b
