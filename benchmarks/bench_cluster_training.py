"""Figures behind the cluster-scale training changes (needs OpenPCDet for ``step``; CPU or GPU).

    python benchmarks/bench_cluster_training.py step        # Phase 1 step: teacher skipped vs run
    python benchmarks/bench_cluster_training.py validation  # occupancy-AP memory vs frames, histogram error

step: a Phase 1 pretraining step (shipped 4-class VoxelNeXt config, TEACHER_STUDENT_WEIGHT 0, its
voxel size and range) on one synthetic batch; reference = the same step with the teacher forced to
encode the complete voxels every step (what every step did before). Prints the ratio.
validation: peak RSS of accumulating the masked-occupancy AP over 10 and 200 KITTI-sized frames
(~522k free cells, 12k positives each), reference = keeping every frame's samples as before (400k
negatives + positives per frame); and the histogram AP against the exact AP over every free cell on
the real scans of ../shared/data/kitti_raw_2011_09_26 (last 3 scans, KITTI's 0.05 m grid).
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pcdet_ext  # noqa: F401
import torch

REPO = Path(__file__).resolve().parents[1]
PRE = REPO / "cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase1.yaml"
RAW = REPO.parent / "shared/data/kitti_raw_2011_09_26/velodyne"


def cmd_step(args):
    from pcdet_ext.config import cfg_from_yaml_file
    from pcdet_ext.engine.loop.hooks import CallbackHook
    from pcdet_ext.engine.loop.runner import Runner
    from pcdet_ext.engine.optimization import build_optimizer
    from pcdet_ext.engine.startup import builders
    from pcdet_ext.openpcdet.datasets import create_infos, synthetic_writer
    from pcdet_ext.openpcdet.datasets.unlabelled import allow_unlabelled
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_writer.write_custom(Path(tmp) / "isarc", num_frames=4, seed=1, val_fraction=0.25)
        root = create_infos.create_custom(root, synthetic_writer.CONSTRUCTION_CLASSES, workers=1,
                                          dataset_cfg=REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml")
        cfg = cfg_from_yaml_file(PRE)
        cfg.DATA_CONFIG.DATA_PATH = str(root)
        (ds, loader, _), _ = builders.build_loaders(cfg, root, batch_size=args.batch_size, workers=1)
        allow_unlabelled(ds)
        batch = next(iter(loader))
        times = {}
        for label, forced in (("teacher run every step (before)", True), ("teacher skipped (now)", False)):
            torch.manual_seed(0)
            model = builders.build_model(cfg, ds)
            if forced:
                model.backbone_3d.runs_teacher = lambda bb=model.backbone_3d: bb.use_teacher and bb.training
            runner = Runner(model, build_optimizer(model, cfg.OPTIMIZATION), is_main=False,
                            hooks=[CallbackHook(model.update_teacher)])
            model.backbone_3d.compute_metrics = False
            runner.step(dict(batch))
            samples = []
            for _ in range(args.reps):
                start = time.perf_counter()
                runner.step(dict(batch))
                samples.append(time.perf_counter() - start)
            times[label] = statistics.median(samples)
            print(f"{label:<34} {times[label]:.2f} s per step (median of {args.reps})")
        before, now = times.values()
        print(f"ratio now / before: {now / before:.2f} (before / now: {before / now:.2f}x)")


ACCUMULATE = """
import resource, sys, torch
from pcdet_ext.algorithms.occupancy import CellGeometry, OccupancyAP, OccupancyConfig, OccupancyTargets
geometry = CellGeometry.of(1, (20, 800, 704), (0.05, 0.05, 0.1), (0, -40, -3, 70.4, 40, 1), OccupancyConfig())
cells, kind = 10 * 400 * 352, sys.argv[1]
def run(n):
    meter, kept = OccupancyAP(), []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        free = torch.rand(cells, generator=g) < 0.37
        pos = torch.randperm(cells, generator=g)[:12000]
        free[pos] = False
        scores = torch.randn(cells, generator=g)
        if kind == "histogram":
            meter.add(scores, OccupancyTargets(free, free, free, pos, pos[:0], geometry))
        else:  # before: up to 400k sampled negatives + the positives kept per frame (score, label, weight, band)
            ids = torch.cat([pos, torch.nonzero(free).squeeze(1)[torch.randint(int(free.sum()), (400000,), generator=g)]])
            kept.append((scores[ids].clone(), torch.ones(len(ids)), torch.ones(len(ids)), torch.zeros(len(ids), dtype=torch.long)))
run(10)
a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(200)
print(a, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def cmd_validation(args):
    for kind in ("samples kept per frame (before)", "histogram"):
        out = subprocess.run([sys.executable, "-c", ACCUMULATE, kind.split()[0]], capture_output=True, text=True,
                             check=True)
        a, b = (int(v) / 1024 for v in out.stdout.split())
        print(f"{kind:<32} peak RSS after 10 frames {a:7.0f} MiB, after 200 frames {b:7.0f} MiB ({b / a:.2f}x)")
    scans = sorted(RAW.glob("*.bin"))[-3:]
    if not scans:
        print(f"no real scans at {RAW}: histogram error not measured")
        return
    sys.path.insert(0, str(REPO / "tests"))
    from test_occupancy_ap import _frame

    from pcdet_ext.algorithms.occupancy import OccupancyAP, average_precision, grow_visible_scores
    meters, parts, labels = {"grow-visible + noise": OccupancyAP(), "grow-visible": OccupancyAP()}, {}, []
    for i, scan in enumerate(scans):
        t = _frame(scan, seed=i)
        grown = grow_visible_scores(t)
        scores = {"grow-visible + noise": grown + 1.5 * torch.randn(grown.shape,
                                                                   generator=torch.Generator().manual_seed(i)),
                  "grow-visible": grown}
        free = torch.nonzero(t.free).squeeze(1)
        ids = torch.cat([t.positives, free])
        labels.append(torch.cat([torch.ones(len(t.positives)), torch.zeros(len(free))]))
        for key, s in scores.items():
            meters[key].add(s, t, free)
            parts.setdefault(key, []).append(s.reshape(-1)[ids])
    y = torch.cat(labels)
    for key, meter in meters.items():
        exact, got = average_precision(torch.cat(parts[key]), y), meter.result()["occ_ap"]
        print(f"{key:<22} exact AP {exact:.4f}, histogram AP {got:.4f}, |error| {abs(got - exact):.5f} "
              f"({len(y):,} cells over {len(scans)} scans; chance {float(y.mean()):.4f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    step = sub.add_parser("step")
    step.add_argument("--batch_size", type=int, default=2)
    step.add_argument("--reps", type=int, default=5)
    sub.add_parser("validation")
    args = parser.parse_args()
    {"step": cmd_step, "validation": cmd_validation}[args.cmd](args)


if __name__ == "__main__":
    main()
