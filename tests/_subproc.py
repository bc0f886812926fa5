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
