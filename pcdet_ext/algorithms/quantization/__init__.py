"""Residual quantization for split inference (pure torch, no OpenPCDet import)."""
from pcdet_ext.algorithms.quantization.nn_search import kmeans_pp, nearest
from pcdet_ext.algorithms.quantization.residual_quantizer import MODES, ResidualQuantizer, RQOutput

__all__ = ["ResidualQuantizer", "RQOutput", "MODES", "nearest", "kmeans_pp"]
