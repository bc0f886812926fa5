"""Runs tools/train_eval_rq.py with one fault at a save (``RQ_FAULT``): the process SIGKILLs itself just
before the first resume pointer is written (``kill_before_resume``) or halfway through writing it
(``kill_writing_resume``), or that write fails as on a full disk (``enospc_resume``); ``RQ_FAULT_AT``:
at the how-manieth pointer write of the run (default 1)."""
import errno
import io
import os
import runpy
import signal
import sys

import torch

from pcdet_ext.engine.recipes.progressive_rq import checkpoints

FAULT = os.environ["RQ_FAULT"]
AT = int(os.environ.get("RQ_FAULT_AT", "1"))
_save = torch.save
_writes = []


def _target(f) -> str:
    """The path a file object writes to (atomic_save hands torch.save an fdopen'ed temporary)."""
    return os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)


def _faulty_save(obj, f, *args, **kwargs):
    if checkpoints.RESUME in _target(f):
        _writes.append(1)
    if checkpoints.RESUME in _target(f) and len(_writes) == AT:
        if FAULT == "kill_writing_resume":
            buf = io.BytesIO()
            _save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if FAULT == "enospc_resume":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _save(obj, f, *args, **kwargs)


def _killed_before(self, state):
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = _faulty_save
if FAULT == "kill_before_resume":
    checkpoints.RunDir.save_resume = _killed_before
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
