"""Guarded fixes for spconv 2.x on a torch build without CUDA.

* backward calls ``torch.cuda.current_stream()`` through ``get_current_stream``: on CPU the
  stream handle is 0, which is what spconv's own CPU forward passes.
* eval-mode convolutions pass their bias into the fused kernel, which the CPU kernel
  rejects (``cpu don't support act and bias``): run the convolution without bias and add
  it afterwards, exactly what spconv's training path does.
* with more than one thread, spconv's CPU kernels race: now and then one output voxel is wrong
  (measured: a handful of 1,200 submanifold convolutions against a dense conv3d reference, none
  with one thread). Its ops run with one thread; the rest of torch keeps its threads.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator

import torch

_PATCHED = False
_STOCK = {}


def _cpu_stream() -> int:
    return 0


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def patch_spconv() -> bool:
    """Apply both fixes once. Returns False when spconv is not installed."""
    global _PATCHED
    if _PATCHED:
        return True
    if torch.cuda.is_available():
        raise RuntimeError("the spconv CPU patch must not be applied when CUDA is available")
    try:
        import spconv.pytorch.conv as sp_conv
        import spconv.pytorch.cppcore as sp_cppcore
        import spconv.pytorch.ops as sp_ops
    except ImportError:
        return False
    import spconv.pytorch.hash as sp_hash
    for mod in (sp_cppcore, sp_ops, sp_hash):
        if hasattr(mod, "get_current_stream"):
            mod.get_current_stream = _cpu_stream
    for name, fn in list(vars(sp_ops).items()):  # every op the conv/functional modules call as ops.<name>
        if inspect.isfunction(fn) and fn.__module__ == sp_ops.__name__ and not name.startswith("_") \
                and name != "get_current_stream":
            setattr(sp_ops, name, _single_threaded(fn))

    original = sp_conv.SparseConvolution._conv_forward
    _STOCK["_conv_forward"] = original

    @functools.wraps(original)
    def _conv_forward(self, training, input, weight, bias, add_input=None, *args, **kwargs):
        if bias is None or training or input.features.is_cuda or add_input is not None \
                or kwargs.get("act_type", self.act_type) != sp_conv.tv.gemm.Activation.None_:
            return original(self, training, input, weight, bias, add_input, *args, **kwargs)
        out = original(self, training, input, weight, None, add_input, *args, **kwargs)
        return out.replace_feature(out.features + bias)

    sp_conv.SparseConvolution._conv_forward = _conv_forward
    _PATCHED = True
    return True


@contextlib.contextmanager
def stock_conv_forward() -> Iterator[None]:
    """spconv's own convolution forward for the duration, as on a CUDA machine (where this patch is
    never applied): for tests of whatever runs on the CPU there (model construction, masking)."""
    if "_conv_forward" not in _STOCK:
        yield
        return
    import spconv.pytorch.conv as sp_conv
    patched = sp_conv.SparseConvolution._conv_forward
    sp_conv.SparseConvolution._conv_forward = _STOCK["_conv_forward"]
    try:
        yield
    finally:
        sp_conv.SparseConvolution._conv_forward = patched
