"""CPU runtime op speed: rotated NMS and BEV IoU as OpenPCDet's post-processing calls them.

Reference: the textbook algorithm (full N x N IoU matrix from the same exact kernel, then a
greedy numpy loop over it), i.e. what a straightforward CPU port of nms_gpu does.
Prints times and ratios; run:  python benchmarks/bench_cpu_ops.py [--boxes 4096]
"""
import argparse
import time

import numpy as np
import torch

import pcdet_ext  # noqa: F401  (CPU runtime)
from pcdet_ext.openpcdet.cpu import compiled_ops
from pcdet_ext.algorithms import rotated_boxes as rb


def detections(n, seed=0):
    """Head-like output: clusters of overlapping boxes around ~n/40 objects in a 70 m x 80 m area."""
    rng = np.random.default_rng(seed)
    centres = np.c_[rng.uniform(0, 70, n // 40 + 1), rng.uniform(-40, 40, n // 40 + 1)]
    pick = rng.integers(0, len(centres), n)
    b = np.zeros((n, 7), dtype=np.float32)
    b[:, :2] = centres[pick] + rng.normal(0, 0.6, (n, 2))
    b[:, 3:6] = [3.9, 1.6, 1.5] * rng.uniform(0.9, 1.1, (n, 3))
    b[:, 6] = rng.normal(0, 0.3, n) + rng.choice([0, np.pi], n)
    return torch.from_numpy(b), torch.from_numpy(rng.random(n).astype(np.float32))


def best_of(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def reference_nms(boxes, thresh):
    iou = rb.bev_overlap(boxes, boxes, iou=True)
    removed = np.zeros(len(boxes), bool)
    keep = []
    for i in range(len(boxes)):
        if not removed[i]:
            keep.append(i)
            removed |= iou[i] > thresh
    return keep


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--boxes", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(2)
    boxes, scores = detections(args.boxes)
    order = scores.argsort(descending=True)
    sorted_boxes = boxes[order].contiguous()
    mod = compiled_ops.make_module("pcdet.ops.iou3d_nms.iou3d_nms_cuda")
    keep = torch.LongTensor(len(boxes))
    t_ours = best_of(lambda: mod.nms_gpu(sorted_boxes, keep, 0.01))
    t_ref = best_of(lambda: reference_nms(sorted_boxes.numpy().astype(np.float64), 0.01), repeats=2)
    n_ours = mod.nms_gpu(sorted_boxes, keep, 0.01)
    assert keep[:n_ours].tolist() == reference_nms(sorted_boxes.numpy().astype(np.float64), 0.01)
    iou = torch.zeros(len(boxes), 64)
    t_iou = best_of(lambda: mod.boxes_iou_bev_gpu(boxes, boxes[:64].contiguous(), iou))
    print(f"rotated NMS, {args.boxes} boxes -> {n_ours} kept: {t_ours * 1e3:.1f} ms "
          f"(target < 100 ms); reference (full IoU matrix + greedy): {t_ref * 1e3:.0f} ms; ratio {t_ours / t_ref:.3f}x")
    print(f"BEV IoU matrix {args.boxes} x 64 (target assignment size): {t_iou * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
