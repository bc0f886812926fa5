"""Checkpoint evaluation through OpenPCDet's ``eval_one_epoch`` (one process, rank 0)."""
from __future__ import annotations

import argparse
import types
from pathlib import Path
from typing import Dict, List

from pcdet_ext.openpcdet.locator import pcdet_tools_module
from pcdet_ext.utils.checkpoint import CheckpointError, describe_checkpoint, load_checkpoint, model_state_of
from pcdet_ext.openpcdet.datasets.class_names import report_dataset_class_names
from pcdet_ext.utils.console import progress
from pcdet_ext.engine.checkpointing import epoch_checkpoints, epoch_of, unwrap
from pcdet_ext.engine.preflight import check_dataset_files, check_not_empty


TERMINAL_TQDM = types.SimpleNamespace(tqdm=progress)  # what eval_one_epoch calls as tqdm.tqdm


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


def evaluate(cfg, model, test_loader, epoch_id, logger, result_dir: Path, save_to_file: bool = False,
             infer_time: bool = False) -> Dict:
    """OpenPCDet's ``eval_one_epoch`` on this process (no DDP wrapper: it assumes CUDA)."""
    eval_utils = pcdet_tools_module("eval_utils/eval_utils.py")
    eval_utils.tqdm = TERMINAL_TQDM  # (this package's private copy of the module) its bar only on a terminal
    cfg.LOCAL_RANK = 0
    result_dir.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(save_to_file=save_to_file, infer_time=infer_time)
    return eval_utils.eval_one_epoch(cfg, args, unwrap(model), test_loader, epoch_id, logger,
                                     dist_test=False, result_dir=result_dir)


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
