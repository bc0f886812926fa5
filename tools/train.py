"""Train (fine-tune) an OpenPCDet detector with pcdet_ext's optimizer builder (per-module LR that
survives OneCycle), OpenPCDet's flags, output layout and checkpoint format; evaluates at the end.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/train.py``;
``python tools/train.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.train import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
