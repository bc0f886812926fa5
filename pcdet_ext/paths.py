"""The one rule for relative paths, for every tool and file kind.

* A relative path written in a YAML file (a dataset config's ``DATA_PATH``, an experiment's
  ``dataset.dir``, ``model.pretrained_weight``, ``logging.saved_path``, ``evaluation.rq_ckpt``) is
  relative to ``<root>/tools``: OpenPCDet's convention, so ``../data/isarc`` is ``<root>/data/isarc``
  whatever the working directory.
* A path given on the command line (``--set``, ``--ckpt``, ``--data_path``, ...) is relative to the
  working directory, as in any shell command.
* Config files (``--cfg_file``, ``--config``, ``_BASE_CONFIG_``, ``model.cfg_file``) are searched for
  by :func:`pcdet_ext.config.find_config`.
* Outputs go to ``<root>/output`` (``$PCDET_EXT_OUTPUT_ROOT/output`` when that is set).

``<root>`` is ``$PCDET_EXT_ROOT`` when set (the scripts in a checkout's ``tools/`` set it to that
checkout), else this package's checkout (an editable install), else the working directory (a wheel
install used without a checkout). Pure python.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from pcdet_ext.openpcdet.locator import REPO_ROOT

ROOT_VAR = "PCDET_EXT_ROOT"


def is_checkout(folder: Path) -> bool:
    """``folder`` is a pcdet_ext source tree (package, configs and tools side by side)."""
    return all((folder / name).exists() for name in ("pcdet_ext", "cfgs", "tools", "setup.py"))


def project_root() -> Path:
    """``<root>`` of the module docstring."""
    value = os.environ.get(ROOT_VAR, "").strip()
    if value:
        return Path(value).expanduser().resolve()
    return REPO_ROOT if is_checkout(REPO_ROOT) else Path.cwd().resolve()


def use_checkout(script: Union[str, Path]) -> None:
    """Called by the scripts in a checkout's ``tools/``: that checkout is ``<root>`` unless
    ``$PCDET_EXT_ROOT`` says otherwise (child processes inherit it)."""
    os.environ.setdefault(ROOT_VAR, str(Path(script).resolve().parents[1]))


def yaml_base() -> Path:
    """The folder a relative path in a YAML file is relative to: ``<root>/tools``."""
    return project_root() / "tools"


def from_yaml(value: Union[str, Path]) -> Path:
    """A path written in a YAML file, made absolute by the rule above."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (yaml_base() / path).resolve()


def from_cli(value: Union[str, Path]) -> Path:
    """A path given on the command line, made absolute (relative to the working directory)."""
    return Path(str(value)).expanduser().resolve()


def output_root() -> Path:
    """Where ``output/`` is written: ``$PCDET_EXT_OUTPUT_ROOT`` or ``<root>``."""
    return Path(os.environ.get("PCDET_EXT_OUTPUT_ROOT") or project_root())
