"""Generate a deterministic synthetic LiDAR dataset in OpenPCDet's KITTI or custom layout.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/make_synthetic_data.py``;
``python tools/make_synthetic_data.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.make_synthetic_data import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
