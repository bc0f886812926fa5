"""R-MAE + CMAE Phase 2 pretraining of a sparse-voxel backbone (OpenPCDet flags and output layout).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/train_rmae_cmae_phase2.py``;
``python tools/train_rmae_cmae_phase2.py --help`` lists the flags.
"""
import sys
from pathlib import Path

from pcdet_ext.cli.train_rmae_cmae_phase2 import main

if __name__ == "__main__":
    sys.exit(main(repo=Path(__file__).resolve().parents[1]))
