"""Phase 1 pretraining checkpoint -> fine-tuning weights: keep the student (or the EMA teacher)
encoder as ``backbone_3d.*`` (plus the VFE), drop decoder / teacher / projection / masking state,
and report coverage against a fine-tune config.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/convert_pretrain_ckpt.py``;
``python tools/convert_pretrain_ckpt.py --help`` lists the flags.
"""
import sys
from pathlib import Path

from pcdet_ext.cli.convert_pretrain_ckpt import main

if __name__ == "__main__":
    sys.exit(main(repo=Path(__file__).resolve().parents[1]))
