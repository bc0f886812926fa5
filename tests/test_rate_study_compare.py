"""benchmarks/rate_accuracy_study.py's comparison at equal mAP: the post-hoc rate-aware curve's Pareto front,
interpolated, a lower bound above its best point, nothing below its lowest (no OpenPCDet needed)."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bytes_saved():
    spec = importlib.util.spec_from_file_location("rate_accuracy_study", REPO / "benchmarks/rate_accuracy_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bytes_saved


def test_saving_at_equal_map_on_the_reference_front(bytes_saved):
    rows = [("RQ context-coded", "(3, 64)", 3.0, 88.0),
            ("RQ context-coded", "(2, 64)", 2.0, 86.0),       # another cell: not on the reference curve
            ("RQ rate-aware", "(3, 64) lambda 0.01", 2.5, 87.5),
            ("RQ rate-aware", "(3, 64) lambda 0.003", 2.8, 87.0),  # dominated by lambda 0.01: off the front
            ("RQ rate-aware", "(3, 64) lambda 0.1", 2.0, 80.0),
            ("new", "a", 1.5, 87.5), ("new", "b", 1.2, 83.75), ("new", "c", 2.4, 89.0), ("new", "d", 1.0, 70.0)]
    got = {p["setting"]: p for p in bytes_saved(rows, "new", "RQ rate-aware", "(3, 64)")}
    assert got["a"]["reference_kb_at_equal_mAP"] == pytest.approx(2.5) and got["a"]["bytes_saved"] == pytest.approx(0.4)
    assert got["b"]["reference_kb_at_equal_mAP"] == pytest.approx(2.25)  # halfway from (80, 2.0) to (87.5, 2.5)
    assert got["c"]["reference_kb_at_equal_mAP"] == 3.0 and not got["c"]["reference_reaches"]  # its best: a bound
    assert got["c"]["bytes_saved"] == pytest.approx(0.2)
    assert got["d"]["reference_kb_at_equal_mAP"] is None and got["d"]["bytes_saved"] is None
    assert all(got[s]["reference_reaches"] for s in "abd")
