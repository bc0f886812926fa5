"""Train (fine-tune) an OpenPCDet detector with pcdet_ext's optimizer builder (per-module LR that
survives OneCycle), OpenPCDet's flags, output layout and checkpoint format; evaluates at the end.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/train.py``;
``python tools/train.py --help`` lists the flags.
"""
import sys
from pathlib import Path

from pcdet_ext.cli.train import main

if __name__ == "__main__":
    sys.exit(main(repo=Path(__file__).resolve().parents[1]))
