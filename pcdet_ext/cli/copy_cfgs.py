"""Copy this package's configs into your OpenPCDet fork's ``tools/cfgs/`` (same relative paths), so the
fork's own tools find them: ``cfgs/custom_models/...`` and the ``_BASE_CONFIG_: cfgs/dataset_configs/...``
they name resolve from its ``tools/`` as OpenPCDet's loader expects.

    python -m pcdet_ext.cli.copy_cfgs /path/to/OpenPCDet/tools        # or: pcdet-ext-copy-cfgs ...
    python -m pcdet_ext.cli.copy_cfgs /path/to/OpenPCDet/tools --overwrite

Files already in the fork are kept unless ``--overwrite`` (each named either way).
"""
import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Tuple

from pcdet_ext.config import PACKAGED
from pcdet_ext.openpcdet.locator import REPO_ROOT


def package_cfgs() -> Path:
    """This package's ``cfgs/``: the checkout's, or the copy a wheel carries."""
    for root in (REPO_ROOT / "cfgs", PACKAGED / "cfgs"):
        if (root / "custom_models").is_dir():
            return root
    raise FileNotFoundError(f"pcdet_ext's cfgs/ not found (looked in {REPO_ROOT / 'cfgs'} and {PACKAGED / 'cfgs'})")


def copy_cfgs(tools: Path, overwrite: bool = False) -> Tuple[List[Path], List[Path]]:
    """Copy every YAML of :func:`package_cfgs` to ``tools/cfgs/<same path>``; ``(copied, kept)``."""
    src = package_cfgs()
    copied, kept = [], []
    for path in sorted(src.rglob("*.yaml")):
        out = tools / "cfgs" / path.relative_to(src)
        if out.exists() and not overwrite:
            kept.append(out)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        copied.append(out)
    return copied, kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tools", type=Path, help="your OpenPCDet fork's tools/ folder (it holds train.py and cfgs/)")
    p.add_argument("--overwrite", action="store_true", help="replace configs the fork already has")
    args = p.parse_args(argv)
    if not (args.tools / "train.py").is_file():
        print(f"error: {args.tools} is not an OpenPCDet tools/ folder (no train.py in it)", file=sys.stderr)
        return 2
    copied, kept = copy_cfgs(args.tools, args.overwrite)
    for path in kept:
        print(f"kept (exists; --overwrite replaces it): {path}")
    print(f"copied {len(copied)} config(s) into {args.tools / 'cfgs'}")
    return 0


if __name__ == "__main__":  # python -m pcdet_ext.cli.copy_cfgs
    sys.exit(main())
