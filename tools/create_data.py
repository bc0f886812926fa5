"""Build OpenPCDet infos + gt database for a KITTI-layout or custom-layout dataset.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/create_data.py``;
``python tools/create_data.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.create_data import main

if __name__ == "__main__":
    sys.exit(main())
