"""Evaluate a PointPillarRQ at (codebooks, entries) operating points: KITTI-metric mAP and rate."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from pcdet_ext.algorithms.rate import RateMeter


MAP_DEFINITION = ("mean over classes of the 3D AP (KITTI metric, R40, moderate difficulty, each class at its "
                  "strict IoU: 0.7 for Car)")


def mean_moderate_ap(result_dict: Dict[str, float]) -> float:
    """mAP (%) = :data:`MAP_DEFINITION`."""
    vals = [v for k, v in result_dict.items() if k.endswith("_3d/moderate_R40")]
    return float(sum(vals) / len(vals)) if vals else 0.0


@contextlib.contextmanager
def operating_point(quantizer, n: int, k: int) -> Iterator[None]:
    """Temporarily use the first k entries of the first n codebooks (restores the active state)."""
    depth, sizes = quantizer.active_depth.clone(), quantizer.active_size.clone()
    quantizer.set_active(n, k)
    try:
        yield
    finally:
        quantizer.active_depth.copy_(depth)
        quantizer.active_size.copy_(sizes)
        quantizer._apply_freezing()


@contextlib.contextmanager
def rate_aware(quantizer, rate_lambda: float, models) -> Iterator[None]:
    """Temporarily choose codes by distortion + ``rate_lambda`` x bits under the bitstream ``models``,
    in their coding contexts (``set_rate`` refuses a negative lambda)."""
    from pcdet_ext.algorithms.bitstream.rate_choice import ContextRate
    if rate_lambda > 0 and models is None:
        raise ValueError("rate-aware coding needs the checkpoint's bitstream models (split_infer.py --fit_models)")
    quantizer.set_rate(rate_lambda, ContextRate(models) if rate_lambda > 0 else None)
    try:
        yield
    finally:
        quantizer.set_rate(0.0)


@contextlib.contextmanager
def bypassed(model) -> Iterator[None]:
    model.rq_bottleneck.bypass = True
    try:
        yield
    finally:
        model.rq_bottleneck.bypass = False


def trained_cells(quantizer, schedule: List[int]) -> List[Tuple[int, int]]:
    """Every (n, k) the run trained: n up to the deepest trained codebook, k in the schedule up to
    the size every one of those n codebooks was trained at."""
    sizes = [int(s) for s in quantizer.trained_size]
    cells = []
    for n in range(1, len(sizes) + 1):
        if sizes[n - 1] == 0:
            break
        cap = min(sizes[:n])
        cells += [(n, k) for k in schedule if k <= cap]
    return cells


def check_cell(quantizer, n: int, k: int, n_from: str = "--eval_num_codebooks",
               k_from: str = "--eval_num_embeddings") -> Optional[str]:
    """--mode eval check of a cell: n <= trained codebooks and k <= the entries trained in each of
    them (errors naming where each value came from, ``n_from`` / ``k_from``); a k that is not a
    schedule size was never trained as an operating point: returns a warning to print (None otherwise)."""
    trained = quantizer.trained_depth
    if not 1 <= n <= trained:
        raise ValueError(f"{n_from} {n}: this checkpoint has {trained} trained codebook(s); expected 1..{trained}")
    sizes = [int(s) for s in quantizer.trained_size[:n]]
    if not 1 <= k <= min(sizes):
        raise ValueError(f"{k_from} {k}: codebooks 1..{n} of this checkpoint were trained with "
                         f"{sizes} entries; expected 1..{min(sizes)}")
    if k not in quantizer.schedule:
        return (f"warning: {k_from} {k} is not a trained operating point (schedule "
                f"{list(quantizer.schedule)}); entries 1..{k} are evaluated as they are")
    return None


def run_eval(model, dataset, loader, class_names, n: Optional[int] = None, k: Optional[int] = None,
             detection_loss: bool = False, bitstream=None, rate_lambda: float = 0.0) -> Dict:
    """Predict every frame (at (n, k), or uncompressed when n is None) and evaluate.

    Returns mAP, the KITTI result string/dict, the rate summary (estimates: fixed-length and
    empirical entropy; with ``bitstream``, the checkpoint's fitted ProbabilityModels, also the
    measured serialised frame length ``bytes_per_frame_measured``), and with ``detection_loss`` the
    mean detection loss on these frames (quantizer in eval mode: no EMA update). ``rate_lambda`` > 0
    chooses the codes rate-aware under ``bitstream`` (:func:`rate_aware`).
    """
    from pcdet_ext.engine.evaluation import evaluate_model
    grid = dataset.grid_size
    meter = RateMeter(n, k, int(grid[0] * grid[1]), sparse=model.rq_cfg.MODE == "sparse") if n else None
    measured = None
    if n and bitstream is not None:
        from pcdet_ext.engine.recipes.progressive_rq.measured import FrameBytes
        measured = FrameBytes(model, bitstream, k, grid)
    losses = []

    def on_batch(batch: Dict) -> None:
        if meter is not None:
            meter.add(batch["rq_codes"], batch["voxel_coords"][:, 0].long(), int(batch["batch_size"]))
        if measured is not None:
            measured.add(batch)
        if detection_loss:  # the head's targets need training mode; the quantizer stays in eval
            model.train()
            model.rq_bottleneck.eval()
            with torch.no_grad():
                ret, _, _ = model(dict(batch))
            losses.append(float(ret["loss"]))
            model.eval()

    with contextlib.ExitStack() as stack:
        if n:
            stack.enter_context(operating_point(model.quantizer, n, k))
            stack.enter_context(rate_aware(model.quantizer, rate_lambda, bitstream))
        else:
            stack.enter_context(bypassed(model))
        _, result_str, result_dict = evaluate_model(model, dataset, loader, class_names, on_batch=on_batch)
    out = {"mAP": mean_moderate_ap(result_dict), "result_str": result_str, "result_dict": result_dict,
           "rate_lambda": rate_lambda}
    if meter is not None:
        out.update(meter.summary())
    if measured is not None and measured.sizes:
        out["bytes_per_frame_measured"] = sum(measured.sizes) / len(measured.sizes)
        out["kb_per_frame_measured"] = out["bytes_per_frame_measured"] / 1024
    if losses:
        out["loss"] = sum(losses) / len(losses)
    return out


def quantizer_mismatch(model, state: Dict, path, config_path) -> Optional[str]:
    """Why the checkpoint ``state`` (read from ``path``) cannot load into ``model`` as the experiment
    (``config_path``) built it: the codebooks and entries on each side and where each comes from; None
    when they agree."""
    key = "rq_bottleneck.quantizer.codebooks."
    saved = {k: v for k, v in state["model_state"].items() if k.startswith(key)}
    q = model.quantizer
    n, k = len(saved), int(next(iter(saved.values())).shape[0]) if saved else 0
    if (n, k) == (q.num_codebooks, q.codebook_size):
        return None
    trained = (state.get("config") or {}).get("model", {})
    hint = f" (its run had model.n_codebook {trained['n_codebook']})" if "n_codebook" in trained else ""
    return (f"--rq_ckpt {path} holds {n} codebook(s) x {k} entries{hint}, but the experiment {config_path} builds "
            f"{q.num_codebooks} x {q.codebook_size} (model.n_codebook; entries: the largest size of "
            f"progressive_learning.embedding_schedule, legacy mode rq_model.codebook_size): evaluate with the "
            f"experiment config the checkpoint was trained with, or --set those keys to match")
