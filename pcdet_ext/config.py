"""OpenPCDet-style YAML configs (EasyDict, ``_BASE_CONFIG_``, ``--set`` overrides), pure python.

``_BASE_CONFIG_`` may appear at any level and is resolved, in order, against: the
including file's folder, the working directory, this repository's root (so ``cfgs/...``
works from anywhere) and ``$PCDET_ROOT/tools`` (so OpenPCDet's own
``cfgs/dataset_configs/...`` paths work unchanged). Bases may themselves have bases.
"""
from __future__ import annotations

import os
from ast import literal_eval
from pathlib import Path
from typing import List, Optional, Sequence

import yaml
from easydict import EasyDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_base(ref: str, including_dir: Path) -> Path:
    """Find the file a ``_BASE_CONFIG_`` entry names; error lists every place tried."""
    ref_path = Path(ref).expanduser()
    if ref_path.is_absolute():
        candidates = [ref_path]
    else:
        candidates = [including_dir / ref_path, Path.cwd() / ref_path, REPO_ROOT / ref_path]
        if os.environ.get("PCDET_ROOT"):
            candidates.append(Path(os.environ["PCDET_ROOT"]).expanduser() / "tools" / ref_path)
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise FileNotFoundError(f"_BASE_CONFIG_ {ref!r} not found; tried: " + ", ".join(str(c) for c in candidates))


def _read_yaml(path: Path) -> dict:
    with open(path, "r") as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping at top level, got {type(data).__name__}")
    return data


def merge_config(config: EasyDict, new_config: dict, including_dir: Path) -> EasyDict:
    """OpenPCDet's merge: load ``_BASE_CONFIG_`` first, then override key by key (recursively)."""
    if "_BASE_CONFIG_" in new_config:
        base_path = resolve_base(new_config["_BASE_CONFIG_"], including_dir)
        merge_config(config, _read_yaml(base_path), base_path.parent)
    for key, val in new_config.items():
        if key == "_BASE_CONFIG_":
            continue
        if not isinstance(val, dict):
            config[key] = val
            continue
        if key not in config or not isinstance(config[key], dict):
            config[key] = EasyDict()
        merge_config(config[key], val, including_dir)
    return config


def cfg_from_yaml_file(cfg_file: os.PathLike, config: Optional[EasyDict] = None) -> EasyDict:
    """Load ``cfg_file`` (with its bases) into ``config`` (a new EasyDict by default)."""
    cfg_file = Path(cfg_file)
    if not cfg_file.is_file():
        raise FileNotFoundError(f"config file not found: {cfg_file}")
    config = EasyDict() if config is None else config
    return merge_config(config, _read_yaml(cfg_file), cfg_file.resolve().parent)


def _coerce(value, current, key: str):
    if isinstance(current, bool) or isinstance(value, bool):
        if type(value) is not type(current):
            raise TypeError(f"--set {key}: expected {type(current).__name__}, got {value!r}")
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
        raise TypeError(f"--set {key}: expected {type(current).__name__}, got {value!r}")
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
    parsed as Python literals."""
    if len(cfg_list) % 2:
        raise ValueError(f"--set takes KEY VALUE pairs, got an odd number of items: {list(cfg_list)}")
    for key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
        node = config
        parts: List[str] = key.split(".")
        for i, sub in enumerate(parts):
            found = _child(node, sub)
            if found is None:
                raise KeyError(f"--set {key}: no key {'.'.join(parts[:i + 1])} in the config")
            parent, index = found
            if i < len(parts) - 1:
                node = parent[index]
        try:
            value = literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        parent[index] = EasyDict(value) if isinstance(value, dict) else _coerce(value, parent[index], key)
    return config
