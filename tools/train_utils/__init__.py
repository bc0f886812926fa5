"""OpenPCDet-layout import path for pcdet_ext's training utilities (see ``optimization/differential_lr.py``)."""
