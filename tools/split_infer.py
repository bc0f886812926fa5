"""Split inference over a dataset split or a folder of frames: real bytes, edge and server times.

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/split_infer.py``;
``python tools/split_infer.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.split_infer import main

if __name__ == "__main__":
    sys.exit(main())
