"""The lean edge's voxelisation gives spconv's (OpenPCDet's) pillars exactly: same voxels, order, caps."""
import numpy as np
import pytest

from pcdet_ext.edge.bundle import VoxelConfig
from pcdet_ext.edge.voxelize import voxelize

KITTI = dict(point_cloud_range=[0, -39.68, -3, 69.12, 39.68, 1], voxel_size=[0.16, 0.16, 4], point_columns=[0, 1, 2, 3])


def spconv_pillars(points, cfg):
    """OpenPCDet's test-time path: mask_points_by_range (x/y, bounds kept), then Point2VoxelCPU3d."""
    from cumm import tensorview as tv
    from spconv.utils import Point2VoxelCPU3d
    r = cfg.point_cloud_range
    keep = (points[:, 0] >= r[0]) & (points[:, 0] <= r[3]) & (points[:, 1] >= r[1]) & (points[:, 1] <= r[4])
    gen = Point2VoxelCPU3d(vsize_xyz=cfg.voxel_size.tolist(), coors_range_xyz=r.tolist(), num_point_features=4,
                           max_num_voxels=cfg.max_voxels, max_num_points_per_voxel=cfg.max_points_per_voxel)
    kept = np.ascontiguousarray(points[keep])
    voxels, coords, num = gen.point_to_voxel(tv.from_numpy(kept))
    return voxels.numpy().copy(), coords.numpy().copy(), num.numpy().copy()  # views into gen's buffers


def assert_same(points, cfg):
    ours = voxelize(points, cfg)
    voxels, coords, num = spconv_pillars(points, cfg)
    assert len(num) > 0
    assert np.array_equal(ours.voxels, voxels) and np.array_equal(ours.num_points, num)
    assert np.array_equal(ours.coords[:, 1:], coords) and (ours.coords[:, 0] == 0).all()
    return ours


@pytest.mark.parametrize("max_voxels,max_points", [(40000, 32), (1500, 4)])
def test_real_scans_give_spconv_pillars(kitti_raw, max_voxels, max_points):
    cfg = VoxelConfig(**KITTI, max_points_per_voxel=max_points, max_voxels=max_voxels)
    for path in sorted((kitti_raw / "velodyne").glob("*.bin"))[:6]:
        ours = assert_same(np.fromfile(path, dtype=np.float32).reshape(-1, 4), cfg)
        assert ours.dropped_points > 0  # near the sensor pillars hold more points than either cap
        assert (ours.dropped_voxels > 0) == (max_voxels == 1500)


def test_points_on_bounds_outside_z_and_caps_as_spconv():
    rng = np.random.default_rng(0)
    cfg = VoxelConfig(point_cloud_range=[0, -8, -3, 12.8, 8, 1], voxel_size=[0.4, 0.4, 4], point_columns=[0, 1, 2, 3],
                      max_points_per_voxel=3, max_voxels=300)
    pts = np.column_stack([rng.uniform(-1, 14, 20000), rng.uniform(-9, 9, 20000), rng.uniform(-4, 2, 20000),
                           rng.random(20000)]).astype(np.float32)
    pts[:50, 0] = 12.8   # on the upper x bound: kept by the range mask, outside the grid
    pts[50:100, 1] = -8  # on the lower y bound: row 0
    pts[100:150] = pts[100]  # many points in one pillar: the first 3 kept, in order
    ours = assert_same(pts, cfg)
    assert ours.dropped_voxels > 0 and ours.dropped_points > 0


def test_nonfinite_points_are_dropped_and_counted_and_shapes_checked():
    cfg = VoxelConfig(**KITTI, max_points_per_voxel=32, max_voxels=100)
    pts = np.array([[1, 0, 0, 0.5], [np.nan, 0, 0, 0.5], [1, 0, np.inf, 0.5], [1, 0, 0, np.nan], [2, 1, 0, 0.1]],
                   dtype=np.float32)
    ours = voxelize(pts, cfg)
    assert ours.nonfinite == 3 and ours.num_points.tolist() == [1, 1]
    assert np.isfinite(ours.voxels).all()
    with pytest.raises(ValueError, match=r"points must be \[N, >= 4\]"):
        voxelize(pts[:, :3], cfg)
