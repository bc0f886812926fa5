"""The main job on a small default, CPU or GPU, in a few minutes:

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/demo_split_rq.py``;
``python tools/demo_split_rq.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.demo_split_rq import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
