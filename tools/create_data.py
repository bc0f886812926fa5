"""Build OpenPCDet infos + gt database for a KITTI-layout or custom-layout dataset.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/create_data.py``;
``python tools/create_data.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.create_data import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
