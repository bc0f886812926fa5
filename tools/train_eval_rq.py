"""Progressive RQ training and evaluation of PointPillarRQ (split inference).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/train_eval_rq.py``;
``python tools/train_eval_rq.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.train_eval_rq import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
