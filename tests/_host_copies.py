"""Counting the device-to-host copies a training step makes from pcdet_ext's code (a CPU proxy for
the host synchronisations of a CUDA step)."""
import sys
from contextlib import contextmanager

import torch

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextmanager
def count_host_copies():
    """Counts calls of the tensor methods that copy device data to the host, made from pcdet_ext's code."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/pcdet_ext/" in caller and self.numel() > 0:
                calls.append(f"{name} {caller.split('/pcdet_ext/')[1]}:{sys._getframe(1).f_lineno}")
            return fn(self, *args, **kwargs)
        return counted
    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
