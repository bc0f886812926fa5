"""Shared test helpers. Tier 1 (this folder) needs only torch/spconv/numba; tier 2
(tests/openpcdet/) needs OpenPCDet and skips without it."""
import os
from pathlib import Path

import pytest

from pcdet_ext.openpcdet.locator import pcdet_root

REPO = Path(__file__).resolve().parent.parent
# the tests run against this checkout, as its tools/ scripts do (pcdet_ext.paths: <root>), also where
# the package is installed from a wheel
os.environ.setdefault("PCDET_EXT_ROOT", str(REPO))

# tools/setup_env.sh records the OpenPCDet checkout in .pcdet_env; the locator exports it when
# PCDET_ROOT is unset (as every tool does), so the tests' child processes see it too.
try:
    pcdet_root()
except ImportError:
    pass  # a bad PCDET_ROOT: tier 2 skips with that reason
SHARED_DATA = Path(os.environ.get("PCDET_EXT_SHARED_DATA", REPO.parent / "shared" / "data"))


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


# The longest test files first (measured on a 2-core box): with --dist loadfile, pytest-xdist hands files to its
# processes in collection order (pytest.ini's --no-loadscope-reorder: by default it orders them by their number of
# tests, which put the few long tool tests last), so long files started last would leave one process running alone.
SLOWEST_FIRST = ("tests/openpcdet/test_rmae_cmae_tools.py", "tests/openpcdet/test_train_eval_rq.py",
                 "tests/openpcdet/test_split_tools.py", "tests/openpcdet/test_edge_export.py",
                 "tests/openpcdet/test_demo.py", "tests/openpcdet/test_gpu_check.py",
                 "tests/openpcdet/test_pointpillar_rq.py", "tests/openpcdet/test_users_configs.py",
                 "tests/openpcdet/test_rmae_cmae_phase2_tools.py", "tests/openpcdet/test_split_runtime.py",
                 "tests/openpcdet/test_rate_distortion.py", "tests/openpcdet/test_pretraining_study_cpu.py",
                 "tests/test_occupancy_ap.py", "tests/openpcdet/test_user_entry.py", "tests/openpcdet/test_pipelines.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
