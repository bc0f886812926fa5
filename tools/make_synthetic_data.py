"""Generate a deterministic synthetic LiDAR dataset in OpenPCDet's KITTI or custom layout.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/make_synthetic_data.py``;
``python tools/make_synthetic_data.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.make_synthetic_data import main

if __name__ == "__main__":
    sys.exit(main())
