"""Server side of split inference: receives coded frames over TCP, answers with detections (JSON).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/split_server.py``;
``python tools/split_server.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.split_server import main

if __name__ == "__main__":
    sys.exit(main())
