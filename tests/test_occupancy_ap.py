"""The masked-occupancy AP of validation (fixed-size histograms): exact enough on real scans, the
same summed over processes, memory flat in the number of frames."""
import numpy as np
import pytest
import torch

from _subproc import run_gloo_ranks, run_python
from pcdet_ext.algorithms.masking import MaskingConfig, mask_voxels
from pcdet_ext.algorithms.occupancy import (CellGeometry, OccupancyAP, OccupancyConfig, average_precision,
                                             grow_visible_scores, occupancy_targets)

VOXEL = (0.05, 0.05, 0.1)                     # KITTI's SECOND / VoxelNeXt grid
PC_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)
GRID = (1408, 1600, 40)                       # x, y, z voxels


def _frame(path, seed):
    """Voxels (b, z, y, x), radial mask, targets at stride 2 and the full scan's points of one real scan."""
    pts = torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(-1, 4))
    lo, size = torch.tensor(PC_RANGE[:3]), torch.tensor(VOXEL)
    ijk = ((pts[:, :3] - lo) / size).floor().long()
    inside = ((ijk >= 0) & (ijk < torch.tensor(GRID))).all(1)
    pts, ijk = pts[inside], ijk[inside]
    coords = torch.unique(torch.stack([torch.zeros(len(ijk), dtype=torch.long), ijk[:, 2], ijk[:, 1], ijk[:, 0]], 1),
                          dim=0)
    mask = mask_voxels(coords, 1, VOXEL, PC_RANGE, MaskingConfig(), seed=seed, grid_size=GRID)
    cfg = OccupancyConfig()
    geometry = CellGeometry.of(1, (GRID[2], GRID[1], GRID[0]), VOXEL, PC_RANGE, cfg)
    points = torch.cat([torch.zeros(len(pts), 1), pts], 1)
    return occupancy_targets(coords, mask.masked, points, geometry, cfg, torch.Generator().manual_seed(seed))


def test_histogram_ap_within_0005_of_the_exact_ap_on_real_held_out_scans(kitti_raw):
    """Real scans, KITTI's 0.05 m grid: a continuous scorer (grow-visible plus noise) and grow-visible
    itself; the histogram AP over all frames against the exact AP over every positive and free cell."""
    meters = {"noisy": OccupancyAP(), "grow": OccupancyAP()}
    parts = {"noisy": [], "grow": []}
    labels = []
    for i, name in enumerate(sorted((kitti_raw / "velodyne").glob("*.bin"))[-3:]):
        t = _frame(name, seed=i)
        grown = grow_visible_scores(t)
        noisy = grown + 1.5 * torch.randn(grown.shape, generator=torch.Generator().manual_seed(i))
        free = torch.nonzero(t.free).squeeze(1)
        assert len(free) > 100_000 and len(t.positives) > 1_000, (len(free), len(t.positives))
        ids = torch.cat([t.positives, free])
        labels.append(torch.cat([torch.ones(len(t.positives)), torch.zeros(len(free))]))
        for key, scores in (("noisy", noisy), ("grow", grown)):
            meters[key].add(scores, t, free)
            parts[key].append(scores.reshape(-1)[ids])
    y = torch.cat(labels)
    for key, meter in meters.items():
        exact = average_precision(torch.cat(parts[key]), y)
        got = meter.result()["occ_ap"]
        assert abs(got - exact) <= 0.005, (key, got, exact)
        assert exact > y.mean() + 0.02  # the scorers know something: not a comparison of two chance values


def _two_ranks(rank, world, port, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(4000, generator=g), (torch.rand(4000, generator=g) < 0.2).long()
    scores += labels
    bands = torch.randint(3, (4000,), generator=g)
    meter = OccupancyAP()
    if rank == 0:  # rank 1 has an empty shard and still takes part
        meter.add_samples(scores, labels, bands)
    meter.all_reduce()
    whole = OccupancyAP()
    whole.add_samples(scores, labels, bands)
    results[rank] = (meter.result(), whole.result())
    dist.destroy_process_group()


def test_counts_are_summed_over_processes_including_one_with_an_empty_shard():
    out = run_gloo_ranks(_two_ranks, 2)
    for rank in (0, 1):
        got, whole = out[rank]
        assert got == pytest.approx(whole) and got["occ_ap"] > 0.3


MEMORY = """
import resource, torch
from pcdet_ext.algorithms.occupancy import CellGeometry, OccupancyAP, OccupancyConfig, OccupancyTargets
cfg = OccupancyConfig()
geometry = CellGeometry.of(1, (20, 800, 704), (0.05, 0.05, 0.1), (0, -40, -3, 70.4, 40, 1), cfg)
cells = 10 * 400 * 352
def frames(n):  # KITTI-sized frames: ~522k free cells and ~12k positives each
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        free = torch.rand(cells, generator=g) < 0.37
        pos = torch.randperm(cells, generator=g)[:12000]
        free[pos] = False
        t = OccupancyTargets(free, free, free, pos, pos[:0], geometry)
        yield torch.randn(cells, generator=g), t
def validate(n):
    meter = OccupancyAP()
    for scores, t in frames(n):
        meter.add(scores, t)
    return meter.result()
validate(10)
peak10 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
validate(80)
peak80 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak10, peak80)
"""


def test_validation_memory_is_flat_from_10_to_80_frames():
    """Keeping each frame's scores (5.6 MB) would add ~390 MB over the 70 more frames."""
    out = run_python(MEMORY, timeout=600)
    assert out.returncode == 0, out.stderr
    peak10, peak80 = (int(v) for v in out.stdout.split()[-2:])
    assert peak80 <= 1.10 * peak10, (peak10, peak80)


def test_height_range_prior_fitted_on_some_scans_ranks_others_above_chance(kitti_raw):
    """The scene-blind baseline: counted on 2 real scans, it ranks another's masked cells well above the
    positive rate (the AP of a scorer that knows nothing), and a prior counted on no structure (every key
    alike) falls to chance."""
    from pcdet_ext.algorithms.occupancy import HeightRangePrior
    scans = sorted((kitti_raw / "velodyne").glob("*.bin"))
    prior, flat = HeightRangePrior(), HeightRangePrior()
    for i, path in enumerate(scans[:2]):
        prior.observe(_frame(path, seed=i))
    flat.counts = torch.ones_like(prior.counts)
    meters, flat_meter, positives, cells = OccupancyAP(), OccupancyAP(), 0, 0
    for i, path in enumerate(scans[-1:]):
        t = _frame(path, seed=10 + i)
        meters.add(prior.scores(t), t)
        flat_meter.add(flat.scores(t), t)
        positives += len(t.positives)
        cells += len(t.positives) + int(t.free.sum())
    chance = positives / cells
    assert meters.result()["occ_ap"] > chance + 0.05, (meters.result(), chance)
    assert abs(flat_meter.result()["occ_ap"] - chance) < 0.01
