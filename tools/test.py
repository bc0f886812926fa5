"""Evaluate checkpoints of an OpenPCDet-layout run (rank 0, one process).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/test.py``;
``python tools/test.py --help`` lists the flags.
"""
import sys
from pathlib import Path

from pcdet_ext.cli.test import main

if __name__ == "__main__":
    sys.exit(main(repo=Path(__file__).resolve().parents[1]))
