"""benchmarks/gpu_check.py --device cpu: the prepared GPU check runs end to end on the CPU (so it
cannot rot between GPU runs) and fails the run when a check fails."""
import subprocess
import sys

from tier2 import REPO, has_voxelnext


def test_gpu_check_runs_on_the_cpu_with_every_row_ok():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = res.stdout[res.stdout.index("gpu_check on CPU"):].splitlines()[3:]
    absent = "skipped: OpenPCDet has no VoxelResBackBone8xVoxelNeXt"  # v0.6.0
    assert len(table) == 16 and all(line.rstrip().endswith("| ok") or (line.rstrip().endswith(absent)
                                                                        and not has_voxelnext()
                                                                        and line.startswith("VoxelNeXt"))
                                    for line in table), "\n".join(table)
    checks = {line.split("|")[0].strip() for line in table}
    assert {"PointPillarRQ train (sparse)", "PointPillarRQ eval (dense)", "VoxelNeXt pretraining step",
            "SECOND pretraining step"} <= checks


def test_a_failing_check_is_a_fail_row_and_a_failed_run():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import Table
    table = Table()
    table.add("fine", "x", lambda: {"step ms": "1"})
    assert not table.failed
    table.add("broken", "x", lambda: 1 / 0)
    assert table.failed and table.rows[-1]["status"].startswith("FAIL: ZeroDivisionError")
