"""Server side of split inference: receives coded frames over TCP, answers with detections (JSON).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/split_server.py``;
``python tools/split_server.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.split_server import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
