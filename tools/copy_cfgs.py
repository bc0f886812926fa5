"""Copy this package's configs into an OpenPCDet fork's tools/cfgs/.

The implementation is ``pcdet_ext/cli/copy_cfgs.py``; ``python tools/copy_cfgs.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.copy_cfgs import main

if __name__ == "__main__":
    sys.exit(main())
