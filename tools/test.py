"""Evaluate checkpoints of an OpenPCDet-layout run (rank 0, one process).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/test.py``;
``python tools/test.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.test import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
