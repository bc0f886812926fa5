"""Shared test helpers. Tier 1 (this folder) needs only torch/spconv/numba; tier 2
(tests/openpcdet/) needs OpenPCDet and skips without it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PCDET_EXT_SHARED_DATA", REPO.parent / "shared" / "data"))


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


@pytest.fixture(scope="session")
def kitti_mini() -> Path:
    path = SHARED_DATA / "kitti_mini"
    if not (path / "training" / "velodyne").is_dir():
        pytest.skip(f"real KITTI frames not present at {path} (shared/data is not part of the package)")
    return path


@pytest.fixture(scope="session")
def kitti_raw() -> Path:
    path = SHARED_DATA / "kitti_raw_2011_09_26"
    if not (path / "velodyne").is_dir():
        pytest.skip(f"real unlabelled KITTI scans not present at {path}")
    return path
