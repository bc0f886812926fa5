"""Residual quantization for split inference (pure torch, no OpenPCDet import)."""
from .nn_search import kmeans_pp, nearest
from .residual_quantizer import MODES, ResidualQuantizer, RQOutput

__all__ = ["ResidualQuantizer", "RQOutput", "MODES", "nearest", "kmeans_pp"]
