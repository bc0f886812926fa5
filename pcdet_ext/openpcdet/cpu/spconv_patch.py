"""Guarded fixes for spconv 2.x on a torch build without CUDA.

* backward calls ``torch.cuda.current_stream()`` through ``get_current_stream``: on CPU the
  stream handle is 0, which is what spconv's own CPU forward passes.
* eval-mode convolutions pass their bias into the fused kernel, which the CPU kernel
  rejects (``cpu don't support act and bias``): run the convolution without bias and add
  it afterwards, exactly what spconv's training path does.
* spconv's CPU kernels have no bfloat16: under CPU autocast (AMP's plumbing on a CPU) its
  convolutions run in fp32.
* with more than one thread, spconv's CPU kernels race: now and then one output voxel is wrong
  (measured: a handful of 1,200 submanifold convolutions against a dense conv3d reference, none
  with one thread). Its ops run with one thread (the calling thread's setting only); the rest of
  torch, and other threads, keep their threads.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Iterator

import torch

from pcdet_ext.openpcdet.cpu.ledger import Ledger

_STOCK = {}


def _cpu_autocast_on() -> bool:
    """Whether CPU autocast is on (``is_autocast_enabled(device)`` from torch 2.4, before it
    ``is_autocast_cpu_enabled``)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()


def _cpu_stream() -> int:
    return 0


def _single_threaded(fn):
    """``fn`` with one intra-op thread. With torch's OpenMP backend (all official wheels) the thread
    count is a per-OS-thread setting, so this touches only the calling thread: concurrent callers (the
    split server's connection threads) keep theirs."""
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


def thread_count_is_per_thread() -> bool:
    """True when ``torch.set_num_threads`` affects only the calling thread (OpenMP backend)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def patch_spconv(ledger: Ledger) -> bool:
    """Apply the fixes through ``ledger``. Returns False when spconv is not installed."""
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
            ledger.setattr(mod, "get_current_stream", _cpu_stream)
    if thread_count_is_per_thread():
        for name, fn in list(vars(sp_ops).items()):  # every op the conv/functional modules call as ops.<name>
            if inspect.isfunction(fn) and fn.__module__ == sp_ops.__name__ and not name.startswith("_") \
                    and name != "get_current_stream":
                ledger.setattr(sp_ops, name, _single_threaded(fn))
    else:
        warnings.warn("pcdet_ext CPU runtime: this torch's thread count is process-wide (not OpenMP), so spconv's "
                      "ops cannot run single-threaded per call; its CPU kernels race with more than one thread: "
                      "call torch.set_num_threads(1) for sparse-conv models.", RuntimeWarning, stacklevel=3)

    original = sp_conv.SparseConvolution._conv_forward
    _STOCK["_conv_forward"] = original

    @functools.wraps(original)
    def _conv_forward(self, training, input, weight, bias, add_input=None, *args, **kwargs):
        if not input.features.is_cuda and _cpu_autocast_on():  # no bf16 kernels on the CPU: fp32
            with torch.autocast("cpu", enabled=False):
                input = input.replace_feature(input.features.float())
                return _conv_forward(self, training, input, weight.float(), None if bias is None else bias.float(),
                                     add_input, *args, **kwargs)
        if bias is None or training or input.features.is_cuda or add_input is not None \
                or kwargs.get("act_type", self.act_type) != sp_conv.tv.gemm.Activation.None_:
            return original(self, training, input, weight, bias, add_input, *args, **kwargs)
        out = original(self, training, input, weight, None, add_input, *args, **kwargs)
        return out.replace_feature(out.features + bias)

    ledger.setattr(sp_conv.SparseConvolution, "_conv_forward", _conv_forward)
    ledger.on_undo("spconv stock _conv_forward record", lambda: _STOCK.pop("_conv_forward", None))
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
