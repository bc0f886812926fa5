"""Evaluation reports in a custom dataset's own class names.

OpenPCDet scores custom-layout sets with the KITTI metric after renaming classes through
``MAP_CLASS_TO_KITTI`` (``dumptruck -> Truck``), and reports the KITTI names. Renaming back needs
the mapping to be one-to-one, which OpenPCDet requires anyway (two classes on one KITTI name would
be scored as one).
"""
from __future__ import annotations

import re
from typing import Dict, Tuple


class DatasetNamedEvaluation:
    """``dataset.evaluation`` whose result text and keys use the dataset's class names (picklable,
    so DataLoader workers started with ``spawn`` can carry the dataset)."""

    def __init__(self, evaluation, to_dataset: Dict[str, str]):
        self.evaluation, self.to_dataset = evaluation, dict(to_dataset)

    def __call__(self, det_annos, class_names, **kwargs) -> Tuple[str, Dict]:
        result_str, result_dict = self.evaluation(det_annos, class_names, **kwargs)
        return rename_result(result_str, result_dict, self.to_dataset)


def rename_result(result_str: str, result_dict: Dict, to_dataset: Dict[str, str]) -> Tuple[str, Dict]:
    """KITTI class names at the start of result lines (``Truck AP@...``) and of result keys
    (``Truck_3d/moderate_R40``) replaced by ``to_dataset[name]``."""
    if not to_dataset:
        return result_str, result_dict
    names = "|".join(re.escape(k) for k in sorted(to_dataset, key=len, reverse=True))
    line = re.compile(rf"^({names})(?= AP)", re.MULTILINE)
    key = re.compile(rf"^({names})(?=_)")
    text = line.sub(lambda m: to_dataset[m.group(1)], result_str)
    return text, {key.sub(lambda m: to_dataset[m.group(1)], k): v for k, v in result_dict.items()}


def report_dataset_class_names(dataset) -> None:
    """Make ``dataset.evaluation`` report the names of ``MAP_CLASS_TO_KITTI``'s keys (idempotent; a
    dataset without the mapping, e.g. KITTI, is left as it is)."""
    mapping = dict(dataset.dataset_cfg.get("MAP_CLASS_TO_KITTI") or {})
    if not mapping or isinstance(dataset.evaluation, DatasetNamedEvaluation):
        return
    inverse = {kitti: own for own, kitti in mapping.items() if own != kitti}
    dataset.evaluation = DatasetNamedEvaluation(dataset.evaluation, inverse)
