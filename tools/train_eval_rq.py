"""Progressive RQ training and evaluation of PointPillarRQ (split inference).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/train_eval_rq.py``;
``python tools/train_eval_rq.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.train_eval_rq import main

if __name__ == "__main__":
    sys.exit(main())
