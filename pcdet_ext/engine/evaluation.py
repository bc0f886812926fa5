"""Evaluation: the one predict-and-score path, checkpoint loading for it, and --eval_all bookkeeping."""
from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pcdet_ext.utils.checkpoint import (CheckpointError, describe_checkpoint, load_checkpoint, model_state_of,
                                        write_json)
from pcdet_ext.openpcdet.datasets.class_names import report_dataset_class_names
from pcdet_ext.utils.console import progress
from pcdet_ext.engine.checkpointing import epoch_checkpoints, epoch_of, unwrap
from pcdet_ext.engine.startup.preflight import check_dataset_files, check_not_empty


def load_for_eval(model, path: Path, logger=None) -> int:
    """Load a training checkpoint's ``model_state`` strictly; returns its epoch (or -1)."""
    state = load_checkpoint(path)
    model_state = model_state_of(state, path, "--ckpt", expected="an OpenPCDet training checkpoint (model_state)")
    missing, unexpected = unwrap(model).load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"--ckpt {path}: holds {describe_checkpoint(state)}, which does not fit this model "
                              f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                              f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    if logger:
        logger.info("loaded %s (epoch %s)", path, state.get("epoch"))
    return int(state.get("epoch", epoch_of(Path(path))))


def predict(model, dataset, loader, class_names, output_path: Optional[Path] = None,
            on_batch: Optional[Callable[[Dict], None]] = None, recall_thresholds: Sequence[float] = (),
            main: bool = True) -> Tuple[List[Dict], Dict[str, float]]:
    """Predict every frame and count OpenPCDet's recall statistics. ``on_batch(batch)`` sees each
    batch after its prediction (and must leave the model in eval mode); ``output_path`` receives the
    per-frame prediction files. Returns ``(det_annos, stats)``: ``recall/roi_<t>``, ``recall/rcnn_<t>``,
    ``sec_per_example``, ``infer_ms_per_batch`` (model forward) and ``mean_predicted_objects``."""
    from pcdet.models import load_data_to_gpu
    model = unwrap(model)
    model.eval()
    det_annos: List[Dict] = []
    counts = {"gt": 0, **{f"{kind}_{t}": 0 for t in recall_thresholds for kind in ("roi", "rcnn")}}
    start, forward_ms = time.time(), []
    for batch in progress(loader, total=len(loader), desc="eval", main=main):
        load_data_to_gpu(batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            pred_dicts, ret_dict = model(batch)
        forward_ms.append((time.perf_counter() - t0) * 1000)
        for key in counts:
            counts[key] += ret_dict.get(key, 0)
        det_annos += dataset.generate_prediction_dicts(batch, pred_dicts, class_names, output_path=output_path)
        if on_batch is not None:
            on_batch(batch)
    warm = forward_ms[len(forward_ms) // 10:] or forward_ms  # OpenPCDet skips the first 10 % as warm-up
    stats = {"sec_per_example": (time.time() - start) / max(len(dataset), 1),
             "infer_ms_per_batch": sum(warm) / max(len(warm), 1),
             "mean_predicted_objects": sum(len(a["name"]) for a in det_annos) / max(len(det_annos), 1)}
    for t in recall_thresholds:
        for kind in ("roi", "rcnn"):
            stats[f"recall/{kind}_{t}"] = float(counts[f"{kind}_{t}"]) / max(float(counts["gt"]), 1.0)
    return det_annos, stats


def evaluate_model(model, dataset, loader, class_names, output_path: Optional[Path] = None,
                   on_batch: Optional[Callable[[Dict], None]] = None, eval_metric: str = "kitti"
                   ) -> Tuple[List[Dict], str, Dict]:
    """The one evaluation path (tools/test.py and the end of tools/train.py through :func:`evaluate`,
    progressive RQ validation and sweeps, demos): :func:`predict`, then the dataset's evaluation.
    Returns ``(det_annos, result_str, result_dict)`` as the dataset computes them."""
    det_annos, _ = predict(model, dataset, loader, class_names, output_path, on_batch)
    result_str, result_dict = dataset.evaluation(det_annos, class_names, eval_metric=eval_metric,
                                                 output_path=output_path)
    return det_annos, result_str, result_dict


def evaluate(cfg, model, test_loader, epoch_id, logger, result_dir: Path, save_to_file: bool = False,
             infer_time: bool = False) -> Dict:
    """:func:`predict` and the dataset's evaluation with OpenPCDet's ``eval_one_epoch`` outputs: its log
    lines (recall per threshold, objects per frame, the result table), ``<result_dir>/result.pkl`` (and
    ``final_result/data`` with ``save_to_file``), and the returned figures as ``<result_dir>/result.json``
    (what ``benchmarks/pretraining_study.py paired`` reads); ``infer_time`` logs the forward time per batch.
    Returns the recall values and the result dict, as ``eval_one_epoch`` does."""
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    out = result_dir / "final_result" / "data" if save_to_file else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    post = cfg.MODEL.POST_PROCESSING
    dataset = test_loader.dataset
    logger.info("*************** EPOCH %s EVALUATION *****************", epoch_id)
    det_annos, stats = predict(model, dataset, test_loader, cfg.CLASS_NAMES, out,
                               recall_thresholds=post.get("RECALL_THRESH_LIST", ()))
    logger.info("*************** Performance of EPOCH %s *****************", epoch_id)
    logger.info("Generate label finished(sec_per_example: %.4f second).", stats["sec_per_example"])
    if infer_time:
        logger.info("inference time: %.2f ms per batch (after the first 10 %% of batches)", stats["infer_ms_per_batch"])
    recall = {k: v for k, v in stats.items() if k.startswith("recall/")}
    for key, val in recall.items():
        logger.info("recall_%s: %f", key.split("/", 1)[1], val)
    logger.info("Average predicted number of objects(%d samples): %.3f", len(det_annos), stats["mean_predicted_objects"])
    with open(result_dir / "result.pkl", "wb") as f:
        pickle.dump(det_annos, f)
    result_str, result_dict = dataset.evaluation(det_annos, cfg.CLASS_NAMES, eval_metric=post.get("EVAL_METRIC", "kitti"),
                                                 output_path=out)
    logger.info(result_str)
    write_json({**recall, **result_dict}, result_dir / "result.json")
    logger.info("Result is saved to %s", result_dir)
    logger.info("****************Evaluation done.*****************")
    return {**recall, **result_dict}


def pending_checkpoints(ckpt_dir: Path, record: Path) -> List[Path]:
    """Checkpoints in ``ckpt_dir`` not yet listed in ``record`` (oldest first); empty when all are done."""
    done = set(record.read_text().split()) if record.is_file() else set()
    return [p for p in epoch_checkpoints(ckpt_dir) if str(epoch_of(p)) not in done]


def mark_done(record: Path, path: Path) -> None:
    with open(record, "a") as f:
        f.write(f"{epoch_of(path)}\n")


def build_test_loader(cfg, batch_size: int, workers: int, logger):
    """OpenPCDet's test loader, after checking its files; evaluation reports the dataset's own class names."""
    from pcdet.datasets import build_dataloader
    check_dataset_files(cfg.DATA_CONFIG, ("test",))
    test_set, loader, sampler = build_dataloader(dataset_cfg=cfg.DATA_CONFIG, class_names=cfg.CLASS_NAMES,
                                                 batch_size=batch_size, dist=False, workers=workers, logger=logger,
                                                 training=False)
    check_not_empty(test_set, cfg.DATA_CONFIG, "test")
    report_dataset_class_names(test_set)
    return test_set, loader, sampler
