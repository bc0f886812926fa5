"""Copy this package's configs into an OpenPCDet fork's tools/cfgs/.

The implementation is ``pcdet_ext/cli/copy_cfgs.py``; ``python tools/copy_cfgs.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.copy_cfgs import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
