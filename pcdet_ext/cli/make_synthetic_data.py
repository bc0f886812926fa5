"""Generate a deterministic synthetic LiDAR dataset in OpenPCDet's KITTI or custom layout.

    python tools/make_synthetic_data.py kitti  --out data/synthetic_kitti --num_frames 16
    python tools/make_synthetic_data.py custom --out data/synthetic_isarc --num_frames 16 \\
        --class_names dumptruck excavator grader roller
"""
import argparse
import sys
from pathlib import Path

from pcdet_ext.openpcdet.datasets import synthetic_writer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layout", choices=["kitti", "custom"])
    parser.add_argument("--out", type=Path, required=True, help="new (or empty) output folder")
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val_fraction", type=float, default=0.25)
    parser.add_argument("--class_names", nargs="+", default=list(synthetic_writer.CONSTRUCTION_CLASSES),
                        help="custom layout only")
    parser.add_argument("--with_intensity", action="store_true", help="custom layout: save x, y, z, intensity")
    args = parser.parse_args(argv)
    if args.layout == "kitti":
        out = synthetic_writer.write_kitti(args.out, args.num_frames, args.seed, args.val_fraction)
    else:
        out = synthetic_writer.write_custom(args.out, args.num_frames, args.seed, args.val_fraction,
                                            args.class_names, args.with_intensity)
    print(f"wrote {args.num_frames} {args.layout} frames to {out}")
    return 0



if __name__ == "__main__":  # python -m pcdet_ext.cli.make_synthetic_data
    sys.exit(main())
