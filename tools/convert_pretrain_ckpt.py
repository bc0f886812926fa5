"""Phase 1 pretraining checkpoint -> fine-tuning weights: keep the student (or the EMA teacher)
encoder as ``backbone_3d.*`` (plus the VFE), drop decoder / teacher / projection / masking state,
and report coverage against a fine-tune config.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/convert_pretrain_ckpt.py``;
``python tools/convert_pretrain_ckpt.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.convert_pretrain_ckpt import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
