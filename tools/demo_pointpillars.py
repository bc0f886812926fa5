"""Small end-to-end run on CPU or GPU: synthetic LiDAR set -> OpenPCDet infos -> PointPillars
training -> KITTI-metric evaluation -> an OpenPCDet checkpoint.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/demo_pointpillars.py``;
``python tools/demo_pointpillars.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.demo_pointpillars import main

if __name__ == "__main__":
    sys.exit(main())
