"""Export the vehicle side of a trained PointPillarRQ as an edge bundle (ONNX + metadata).

The implementation (flags, checks, the call into pcdet_ext) is ``pcdet_ext/cli/export_edge.py``;
``python tools/export_edge.py --help`` lists the flags.
"""
import sys

from pcdet_ext.cli.export_edge import main
from pcdet_ext.paths import use_checkout

if __name__ == "__main__":
    use_checkout(__file__)  # this checkout is <root> of relative YAML paths and output/ (pcdet_ext.paths)
    sys.exit(main())
