"""Build OpenPCDet infos + gt database for a KITTI-layout or custom-layout dataset.

    python tools/create_data.py kitti  --data_path ../shared/data/kitti_mini --out_dir data/kitti_mini
    python tools/create_data.py custom --data_path data/synthetic_isarc \\
        --cfg_file cfgs/dataset_configs/custom_dataset_isarc.yaml \\
        --class_names dumptruck excavator grader roller

Calls OpenPCDet's own create_kitti_infos / create_custom_infos after validating the files.
``--out_dir`` (default: the data folder) may differ from a read-only ``--data_path``: the data
is then symlinked into it.
"""
import argparse
import sys
from pathlib import Path

from pcdet_ext.config import ConfigError
from pcdet_ext.openpcdet.datasets import create_infos
from pcdet_ext.openpcdet.datasets.validation import DatasetFormatError
from pcdet_ext.openpcdet.locator import OpenPCDetNotFoundError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layout", choices=["kitti", "custom", "unlabelled"],
                        help="unlabelled: --data_path is a folder of .bin/.npy scans, written to --out_dir")
    parser.add_argument("--data_path", type=Path, required=True)
    parser.add_argument("--out_dir", type=Path, default=None)
    parser.add_argument("--cfg_file", type=Path, default=None, help="dataset config (DATA_CONFIG) yaml")
    parser.add_argument("--class_names", nargs="+", default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        print(create(parser, args))
    except (OpenPCDetNotFoundError, ConfigError, DatasetFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def create(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Write the infos (and gt database) of ``args.layout``; returns what was written."""
    if args.layout == "unlabelled":
        if args.out_dir is None:
            parser.error("unlabelled: --out_dir is required")
        if not args.data_path.is_dir():
            why = "is not a folder" if args.data_path.exists() else "does not exist"
            raise FileNotFoundError(f"--data_path: {args.data_path} {why} (unlabelled: a folder of .bin / .npy scans)")
        scans = sorted(list(args.data_path.glob("*.bin")) + list(args.data_path.glob("*.npy")))
        if not scans:
            raise FileNotFoundError(f"--data_path: {args.data_path} holds no .bin / .npy scans")
        root = create_infos.create_unlabelled(scans, args.out_dir, args.cfg_file)
        return f"{len(scans)} unlabelled scans and infos written under {root}"
    if args.layout == "kitti":
        root = create_infos.create_kitti(args.data_path, args.out_dir, args.cfg_file,
                                         args.class_names or create_infos.KITTI_CLASSES, args.workers)
    else:
        if not args.class_names:
            parser.error("custom: --class_names is required (the classes of the labels)")
        root = create_infos.create_custom(args.data_path, args.class_names, args.out_dir, args.cfg_file,
                                          args.workers)
    return f"infos and gt database written under {root}"



if __name__ == "__main__":  # python -m pcdet_ext.cli.create_data
    sys.exit(main())
