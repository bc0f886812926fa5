"""The demo's synthetic set appears only when complete (tier 1)."""
import pytest

from pcdet_ext.cli import demo_pointpillars


def test_a_failed_info_build_leaves_no_set_a_rerun_would_reuse(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("info creation failed")
    monkeypatch.setattr(demo_pointpillars.create_infos, "create_kitti", fail)
    data = tmp_path / "synthetic_kitti_2f_s0"
    with pytest.raises(RuntimeError, match="info creation failed"):
        demo_pointpillars.write_dataset(data, "kitti", 2, 0)
    assert not data.exists()
    monkeypatch.setattr(demo_pointpillars.create_infos, "create_kitti", lambda path, workers: (path / "infos").touch())
    demo_pointpillars.write_dataset(data, "kitti", 2, 0)  # the stale partial folder is replaced
    assert (data / "infos").is_file() and (data / "ImageSets").is_dir()
    assert not (tmp_path / "synthetic_kitti_2f_s0.partial").exists()
