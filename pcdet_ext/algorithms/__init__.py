"""Pure torch / numpy algorithms: residual quantization, the bitstream codec, rate accounting, radial
masking, occupancy targets and decoder, teacher-student maths, rotated-box geometry.

Nothing here imports OpenPCDet or the rest of pcdet_ext except :mod:`pcdet_ext.config` and
:mod:`pcdet_ext.utils` (``tests/test_layout.py`` checks it), so each piece can be tested and reused alone.
"""
