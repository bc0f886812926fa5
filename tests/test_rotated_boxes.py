"""Exact rotated-box geometry against independent references."""
import numpy as np
import pytest

from _subproc import run_python
from pcdet_ext.algorithms import rotated_boxes as rb


def random_boxes(rng, n, spread=2.0):
    b = np.zeros((n, 7))
    b[:, :2] = rng.uniform(-spread, spread, (n, 2))
    b[:, 2] = rng.uniform(-1, 1, n)
    b[:, 3:5] = rng.uniform(0.3, 4.0, (n, 2))
    b[:, 5] = rng.uniform(0.5, 2, n)
    b[:, 6] = rng.uniform(-np.pi, np.pi, n)
    return b


def raster_overlap(a, b, res=700):
    """Independent reference: count grid cells inside both rectangles."""
    lo = np.minimum(a[:2], b[:2]) - 3
    hi = np.maximum(a[:2], b[:2]) + 3
    xs, ys = np.linspace(lo[0], hi[0], res), np.linspace(lo[1], hi[1], res)
    X, Y = np.meshgrid(xs, ys)

    def inside(box):
        c, s = np.cos(-box[6]), np.sin(-box[6])
        sx, sy = X - box[0], Y - box[1]
        return (np.abs(sx * c - sy * s) < box[3] / 2) & (np.abs(sx * s + sy * c) < box[4] / 2)
    return (inside(a) & inside(b)).sum() * (xs[1] - xs[0]) * (ys[1] - ys[0])


def test_overlap_matches_rasterised_area_on_300_random_pairs():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 300), random_boxes(rng, 300)
    ours = rb.bev_overlap_paired(a, b)
    ref = np.array([raster_overlap(x, y) for x, y in zip(a, b)])
    assert (ref > 0.05).sum() > 100  # most pairs really intersect
    cell = (10.0 / 700) ** 2
    perimeter = 2 * (a[:, 3] + a[:, 4] + b[:, 3] + b[:, 4])
    # rasterisation error is bounded by the boundary cells
    assert np.all(np.abs(ours - ref) <= perimeter * np.sqrt(cell) + 1e-6)
    assert np.abs(ours - ref).mean() < 0.01


def test_overlap_closed_forms():
    box = np.array([[0, 0, 0, 4, 2, 1, 0.3]])
    assert rb.bev_overlap(box, box)[0, 0] == pytest.approx(8.0, rel=1e-12)
    rot90 = box.copy(); rot90[0, 6] += np.pi / 2  # 4x2 vs 2x4 centred: 2x2 square
    assert rb.bev_overlap(box, rot90)[0, 0] == pytest.approx(4.0, rel=1e-9)
    far = box.copy(); far[0, 0] += 10
    assert rb.bev_overlap(box, far)[0, 0] == 0.0
    half = np.array([[0, 0, 0, 2, 2, 1, 0]]); shifted = half.copy(); shifted[0, 0] = 1
    assert rb.bev_overlap(half, shifted, iou=True)[0, 0] == pytest.approx(2 / 6)
    degenerate = half.copy(); degenerate[0, 3] = 0
    assert rb.bev_overlap(half, degenerate)[0, 0] == 0.0


def test_matrix_symmetric_and_consistent_with_paired():
    rng = np.random.default_rng(1)
    a = random_boxes(rng, 40)
    m = rb.bev_overlap(a, a, iou=True)
    np.testing.assert_allclose(m, m.T, atol=1e-9)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    np.testing.assert_allclose(rb.bev_overlap_paired(a, a[::-1], iou=True), np.diag(m[:, ::-1]), atol=1e-12)


def greedy_nms_reference(boxes, thresh):
    iou = rb.bev_overlap(boxes, boxes, iou=True)
    keep, removed = [], np.zeros(len(boxes), bool)
    for i in range(len(boxes)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= iou[i] > thresh
    return np.array(keep)


@pytest.mark.parametrize("thresh", [0.01, 0.1, 0.5])
def test_nms_matches_greedy_reference(thresh):
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 400, spread=8.0)
    np.testing.assert_array_equal(rb.nms_bev(boxes, thresh), greedy_nms_reference(boxes, thresh))


def test_axis_aligned_nms_ignores_heading():
    boxes = np.array([[0, 0, 0, 4, 2, 1, 0.0], [0.2, 0, 0, 4, 2, 1, 1.5], [10, 0, 0, 4, 2, 1, 0.0]])
    assert rb.nms_bev(boxes, 0.5, rotated=False).tolist() == [0, 2]   # heading dropped: near-duplicate
    assert rb.nms_bev(boxes, 0.5, rotated=True).tolist() == [0, 1, 2]  # rotated: IoU is small


def test_points_in_boxes():
    boxes = np.array([[0, 0, 0, 4, 2, 2, np.pi / 2], [10, 0, 0, 2, 2, 2, 0]])
    pts = np.array([[0, 1.9, 0], [1.9, 0, 0], [0, 0, 1.5], [10.5, 0.5, 0.5], [5, 5, 0]])
    mask = rb.points_in_boxes_mask(pts, boxes)
    assert mask.tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0]]
    first = rb.first_box_of_points(pts[None], boxes[None])
    assert first.tolist() == [[0, -1, -1, 1, -1]]


def test_rotate_iou_eval_criteria():
    a = np.array([[0, 0, 2, 2, 0]], dtype=np.float32)
    q = np.array([[1, 0, 2, 4, 0]], dtype=np.float32)
    assert rb.rotate_iou_eval(a, q, -1)[0, 0] == pytest.approx(2 / 10)
    assert rb.rotate_iou_eval(a, q, 0)[0, 0] == pytest.approx(2 / 8)   # / area of the query box
    assert rb.rotate_iou_eval(a, q, 1)[0, 0] == pytest.approx(2 / 4)
    assert rb.rotate_iou_eval(a, q, 2)[0, 0] == pytest.approx(2)


def test_bad_box_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        rb.bev_overlap(np.zeros((3, 5)), np.zeros((3, 7)))


def test_kernels_work_in_forked_children_of_a_process_that_used_threads():
    """DataLoader workers are forked after the parent ran the threaded kernels (gt_sampling, evaluation):
    GNU OpenMP is not fork-safe there, so children must take the serial kernels and agree with the parent."""
    code = """
import multiprocessing as mp, numpy as np
from pcdet_ext.algorithms import rotated_boxes as rb
boxes = np.random.default_rng(0).uniform(0, 20, (300, 7)); boxes[:, 3:6] += 1
pts = np.random.default_rng(1).uniform(0, 20, (2000, 3))
ref = (rb.bev_overlap(boxes, boxes).sum(), rb.points_in_boxes_mask(pts, boxes).sum())
def child(q):
    q.put((rb.bev_overlap(boxes, boxes).sum(), rb.points_in_boxes_mask(pts, boxes).sum(), rb._FORKED))
ctx = mp.get_context("fork")
q = ctx.Queue()
procs = [ctx.Process(target=child, args=(q,)) for _ in range(2)]
for p in procs: p.start()
for p in procs: p.join(90)
assert [p.exitcode for p in procs] == [0, 0], [p.exitcode for p in procs]
for _ in procs:
    ov, inside, forked = q.get(timeout=5)
    assert forked and ov == ref[0] and inside == ref[1]
print("ok", rb._FORKED)
"""
    res = run_python(code, timeout=240)
    assert res.returncode == 0 and res.stdout.split() == ["ok", "False"], res.stderr[-2000:]
