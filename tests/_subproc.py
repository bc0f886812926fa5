"""Run code in a fresh interpreter: import-time behaviour needs a clean process."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, env_update=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (import-time behaviour needs a clean process)."""
    env = dict(os.environ)
    for key, val in (env_update or {}).items():
        if val is None:
            env.pop(key, None)
        else:
            env[key] = val
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(REPO))


def run_gloo_ranks(worker, world: int = 2) -> dict:
    """``worker(rank, world, port, results)`` in ``world`` spawned processes (which join a gloo group
    on a free local port); returns what they put in ``results`` (a shared dict, by rank)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, port, results), nprocs=world, join=True)
    return dict(results)
