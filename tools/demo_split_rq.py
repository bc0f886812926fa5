"""The main job on a small default, CPU or GPU, in a few minutes:

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/demo_split_rq.py``;
``python tools/demo_split_rq.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.demo_split_rq import main

if __name__ == "__main__":
    sys.exit(main())
