"""Synthetic LiDAR scenes and the dataset layouts they are written in."""
import numpy as np
import pytest

from pcdet_ext.openpcdet.datasets import kitti_format

from pcdet_ext.openpcdet.datasets import synthetic

from pcdet_ext.openpcdet.datasets import synthetic_writer
from pcdet_ext.openpcdet.datasets.validation import parse_custom_labels, parse_kitti_labels, validate_custom, validate_kitti
from pcdet_ext.algorithms.rotated_boxes import points_in_boxes_mask

SMALL = synthetic.SceneSpec(sensor=synthetic.SensorSpec(num_azimuth=512), fov_deg=70.0)


def test_scene_is_deterministic_by_seed():
    a, b, c = synthetic.generate_scene(3, SMALL), synthetic.generate_scene(3, SMALL), synthetic.generate_scene(4, SMALL)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.boxes, c.boxes)


def test_scene_looks_like_lidar():
    s = synthetic.generate_scene(0, synthetic.KITTI_SCENE)
    ground = np.abs(s.points[:, 2] + synthetic.KITTI_SCENE.sensor.height) < 0.1
    assert ground.mean() > 0.3  # most returns are ground rings
    # ground returns of one beam lie on a ring: their range spread is small
    rng_xy = np.hypot(s.points[ground, 0], s.points[ground, 1])
    assert len(np.unique(np.round(rng_xy))) < len(rng_xy) / 20
    grown = s.boxes.astype(np.float64)
    grown[:, 3:6] += 0.1  # range noise may push a return a few cm out of a face ...
    grown[:, 2] += 0.05   # ... but keep the bottom at the ground so ground returns stay out
    inside = points_in_boxes_mask(s.points, grown)
    seen = s.num_points >= 10  # returns on objects fall inside their boxes (up to range noise)
    assert seen.sum() >= 3 and np.all(inside.sum(1)[seen] >= 0.9 * s.num_points[seen])
    # returns sit on the sensor-facing side: nearer to the sensor than the box centre
    for k in np.flatnonzero(s.num_points > 20):
        pts = s.points[inside[k] > 0]
        assert np.median(np.hypot(pts[:, 0], pts[:, 1])) < np.hypot(*s.boxes[k, :2])
    assert (s.visibility < 0.8).any() and (s.visibility > 0.95).any()  # occlusion happens, not always
    assert np.all((s.points[:, 3] >= 0) & (s.points[:, 3] <= 1))


def test_construction_classes_have_realistic_sizes():
    s = synthetic.generate_scene(1, synthetic.CONSTRUCTION_SCENE)
    assert set(s.names) <= set(synthetic_writer.CONSTRUCTION_CLASSES) and len(s.names) >= 4
    for box, name in zip(s.boxes, s.names):
        mean = np.array(synthetic.CLASSES[name].mean_size)
        assert np.all(np.abs(box[3:6] - mean) < 0.35 * mean)
    r = np.hypot(s.points[:, 0], s.points[:, 1])
    ang = np.arctan2(s.points[r > 5, 1], s.points[r > 5, 0])
    assert np.histogram(ang, bins=8)[0].min() > 0  # 360-degree sensor


def test_kitti_layout_round_trip(tmp_path):
    root = synthetic_writer.write_kitti(tmp_path / "k", num_frames=3, seed=1, spec=SMALL)
    assert validate_kitti(root) == 3
    assert (root / "ImageSets" / "test.txt").read_text() == ""
    types = parse_kitti_labels(root / "training/label_2/000000.txt")
    assert set(types) <= {"Car", "Pedestrian", "Cyclist"} and types
    scene = synthetic.generate_scene(1 * 100003 + 0, SMALL)
    calib = kitti_format.Calibration()
    line = (root / "training/label_2/000000.txt").read_text().splitlines()[0].split()
    h, w, l, x, y, z, ry = map(float, line[8:15])
    # camera label -> LiDAR box, the way OpenPCDet converts it
    hom = np.array([x, y, z, 1.0])
    tr = np.vstack([calib.Tr_velo_to_cam, [0, 0, 0, 1]])
    lidar = np.linalg.inv(tr) @ hom
    np.testing.assert_allclose([lidar[0], lidar[1], lidar[2] + h / 2, l, w, h, -(np.pi / 2 + ry)],
                               scene.boxes[0], atol=0.02)
    assert np.fromfile(root / "training/velodyne/000000.bin", dtype=np.float32).size % 4 == 0


def test_custom_layout_and_existing_target_refused(tmp_path):
    root = synthetic_writer.write_custom(tmp_path / "c", num_frames=3, seed=0)
    assert validate_custom(root, synthetic_writer.CONSTRUCTION_CLASSES, num_features=3) == 3
    boxes, names = parse_custom_labels(root / "labels" / "000000.txt", synthetic_writer.CONSTRUCTION_CLASSES)
    assert boxes.shape[1] == 7 and len(names) == len(boxes)
    assert np.load(root / "points" / "000000.npy").shape[1] == 3
    with pytest.raises(FileExistsError, match="not empty"):
        synthetic_writer.write_custom(root, num_frames=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyError, match="no synthetic shape"):
        synthetic_writer.write_custom(tmp_path / "x", num_frames=2, class_names=["bulldozer"])
    assert list(tmp_path.iterdir()) == []


def test_sector_culled_ray_casting_equals_every_ray_against_every_box():
    """The fast ray cast (each box against the rays of its azimuth sector) returns exactly the dense one's
    distances: boxes straddling the +-pi seam, around the sensor, near and far."""
    import numpy as np
    from pcdet_ext.openpcdet.datasets.synthetic import KITTI_SCENE, _ray_box_hits, _ray_box_hits_dense, ray_directions
    rng = np.random.default_rng(0)
    dirs = ray_directions(KITTI_SCENE.sensor)
    boxes = np.concatenate([
        np.stack([rng.uniform(-60, 60, 40), rng.uniform(-60, 60, 40), rng.uniform(-1.5, 0, 40),
                  rng.uniform(0.3, 12, 40), rng.uniform(0.3, 4, 40), rng.uniform(0.5, 4, 40),
                  rng.uniform(-np.pi, np.pi, 40)], 1),
        [[-20.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.3],      # across the seam behind the sensor
         [0.5, 0.2, -1.0, 6.0, 5.0, 3.0, 1.0],        # around the sensor
         [3.0, 0.0, -1.0, 4.0, 1.0, 2.0, 0.0]]])      # close, wide sector
    fast, dense = _ray_box_hits(dirs, boxes), _ray_box_hits_dense(dirs, boxes)
    assert np.array_equal(fast, dense) and np.isfinite(dense).sum() > 1000
