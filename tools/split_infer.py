"""Split inference over a dataset split or a folder of frames: real bytes, edge and server times.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/split_infer.py``;
``python tools/split_infer.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.split_infer import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
