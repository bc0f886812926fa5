"""R-MAE + CMAE pretraining pieces (pure torch parts importable without OpenPCDet)."""
from .masking import MaskingConfig, MaskResult, mask_voxels

__all__ = ["MaskingConfig", "MaskResult", "mask_voxels"]
