"""Modules that plug into OpenPCDet (mirrors pcdet.models' layout)."""
