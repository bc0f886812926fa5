"""R-MAE + CMAE Phase 2 pretraining of a sparse-voxel backbone (OpenPCDet flags and output layout).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/train_rmae_cmae_phase2.py``;
``python tools/train_rmae_cmae_phase2.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.train_rmae_cmae_phase2 import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
