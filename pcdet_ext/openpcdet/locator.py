"""Locate and import the user's OpenPCDet: an installed ``pcdet`` or a checkout named by
``PCDET_ROOT`` (put on ``sys.path``; nothing is written into it). When the variable is unset,
the ``.pcdet_env`` that ``tools/setup_env.sh`` writes (in this repository or the working
directory) supplies it, so a new shell finds the checkout the set-up used."""
from __future__ import annotations

import importlib
import os
import re
import sys
import types
from pathlib import Path
from typing import Optional

ENV_VAR = "PCDET_ROOT"
ENV_FILE = ".pcdet_env"
REPO_ROOT = Path(__file__).resolve().parents[2]
_HOW = ("Install OpenPCDet (python setup.py develop in its checkout) or set PCDET_ROOT to the "
        "root of an OpenPCDet checkout (the folder holding pcdet/ and tools/); "
        "tools/setup_env.sh does either.")


class OpenPCDetNotFoundError(ImportError):
    """OpenPCDet is needed for this part of pcdet_ext and could not be imported."""


def _from_env_file() -> str:
    """``PCDET_ROOT`` as recorded in ``.pcdet_env`` (``export PCDET_ROOT=...``), '' when there is none."""
    for folder in (REPO_ROOT, Path.cwd()):
        env_file = folder / ENV_FILE
        if env_file.is_file():
            for line in env_file.read_text().splitlines():
                if line.startswith(f"export {ENV_VAR}="):
                    return line.split("=", 1)[1].strip().strip("'\"")
    return ""


def pcdet_root() -> Optional[Path]:
    """The checkout named by ``PCDET_ROOT`` (or, when it is unset, ``.pcdet_env``), validated; None
    when neither names one.
    A value from ``.pcdet_env`` is exported to ``os.environ`` so child processes see it too."""
    if ENV_VAR in os.environ:  # set, even to '' (= "no checkout"): .pcdet_env is not consulted
        value = os.environ[ENV_VAR].strip()
        if not value:
            return None
    else:
        value = _from_env_file()
        if not value:
            return None
        os.environ[ENV_VAR] = value
    root = Path(value).expanduser().resolve()
    expected = ("pcdet/__init__.py", "pcdet/models/detectors/__init__.py", "pcdet/datasets/__init__.py")
    missing = [e for e in expected if not (root / e).is_file()]
    if missing:
        raise OpenPCDetNotFoundError(
            f"{ENV_VAR}={value} is not an OpenPCDet checkout: missing {', '.join(missing)} under {root}. "
            f"Point {ENV_VAR} at the folder that holds pcdet/ and tools/.")
    return root


def _checkout_version(root: Path) -> str:
    text = (root / "setup.py").read_text() if (root / "setup.py").is_file() else ""
    m = re.search(r"version\s*=\s*'([0-9][^'+]*)", text)
    return m.group(1) if m else "0.0.0"


def import_pcdet() -> types.ModuleType:
    """Import ``pcdet`` (from ``PCDET_ROOT`` when set) or raise :class:`OpenPCDetNotFoundError`."""
    root = pcdet_root()
    if root is not None:
        loaded = sys.modules.get("pcdet")
        if loaded is not None and root not in Path(loaded.__file__).resolve().parents:
            raise OpenPCDetNotFoundError(
                f"pcdet is already imported from {loaded.__file__}, not from {ENV_VAR}={root}")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        if not (root / "pcdet" / "version.py").is_file() and "pcdet.version" not in sys.modules:
            # An un-built checkout lacks the version.py that OpenPCDet's setup.py generates.
            version = types.ModuleType("pcdet.version")
            version.__version__ = _checkout_version(root)
            sys.modules["pcdet.version"] = version
    try:
        return importlib.import_module("pcdet")
    except ModuleNotFoundError as exc:
        if exc.name == "pcdet":
            raise OpenPCDetNotFoundError(f"OpenPCDet (module 'pcdet') is not importable. {_HOW}") from exc
        raise


def require_pcdet(feature: str) -> types.ModuleType:
    """Import ``pcdet`` for ``feature`` or raise an ImportError saying what is missing and how to fix it."""
    try:
        return import_pcdet()
    except OpenPCDetNotFoundError as exc:
        raise OpenPCDetNotFoundError(f"{feature} needs OpenPCDet: {exc}") from exc


def pcdet_available() -> bool:
    """True when ``pcdet`` can be imported (from PCDET_ROOT or an installed package)."""
    try:
        import_pcdet()
        return True
    except OpenPCDetNotFoundError:
        return False


def pcdet_tools_dir() -> Optional[Path]:
    """OpenPCDet's ``tools/`` folder (of ``PCDET_ROOT`` or of an installed checkout), without
    importing ``pcdet``; None when OpenPCDet cannot be located."""
    import importlib.util
    try:
        root = pcdet_root()
    except OpenPCDetNotFoundError:
        return None
    if root is None:
        spec = importlib.util.find_spec("pcdet") if "pcdet" not in sys.modules else sys.modules["pcdet"].__spec__
        if spec is None or not spec.origin:
            return None
        root = Path(spec.origin).resolve().parent.parent
    tools = root / "tools"
    return tools if tools.is_dir() else None


def pcdet_tools_module(relative: str) -> types.ModuleType:
    """A package or module file from OpenPCDet's ``tools/`` (not part of the ``pcdet`` package),
    e.g. ``train_utils/optimization`` or ``eval_utils/eval_utils.py``, loaded under a private name
    so that another ``train_utils`` on ``sys.path`` (this repo's ``tools/``) cannot shadow it."""
    import importlib.util
    pcdet = require_pcdet(f"OpenPCDet's tools/{relative}")
    target = Path(pcdet.__file__).resolve().parent.parent / "tools" / relative
    is_pkg = not relative.endswith(".py")
    source = target / "__init__.py" if is_pkg else target
    if not source.is_file():
        raise OpenPCDetNotFoundError(f"OpenPCDet checkout without tools/{relative} (expected {source})")
    name = "_pcdet_tools." + relative.removesuffix(".py").replace("/", ".")
    if name not in sys.modules:
        sys.modules.setdefault("_pcdet_tools", types.ModuleType("_pcdet_tools"))
        spec = importlib.util.spec_from_file_location(
            name, source, submodule_search_locations=[str(target)] if is_pkg else None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
