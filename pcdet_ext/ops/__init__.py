"""Pure-numpy/numba geometry ops (rotated boxes), free of OpenPCDet imports."""
