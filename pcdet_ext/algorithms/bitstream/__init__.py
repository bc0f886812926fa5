"""Split-inference bitstream: coded occupancy + code indices of one frame (no OpenPCDet import)."""
from pcdet_ext.algorithms.bitstream.codec import Frame, decode_frame, encode_frame, max_frame_bytes, read_header
from pcdet_ext.algorithms.bitstream.models import BitstreamError, ProbabilityModels
from pcdet_ext.algorithms.bitstream.occupancy import GridGeometry

__all__ = ["BitstreamError", "Frame", "GridGeometry", "ProbabilityModels", "decode_frame", "encode_frame", "max_frame_bytes",
           "read_header"]
