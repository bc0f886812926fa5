"""Small end-to-end run on CPU or GPU: synthetic LiDAR set -> OpenPCDet infos -> PointPillars
training -> KITTI-metric evaluation -> an OpenPCDet checkpoint.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/demo_pointpillars.py``;
``python tools/demo_pointpillars.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.demo_pointpillars import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
