"""Self-supervised pretraining on frames without labels through OpenPCDet's datasets.

OpenPCDet's ``DatasetTemplate.prepare_data`` re-draws a random frame whenever a training frame has
no boxes left, so a set of unlabelled frames recurses forever. :func:`allow_unlabelled` makes one
dataset instance run such frames through the same augmentation, point encoding and voxelisation
with an empty box array instead; labelled frames go through OpenPCDet's own code unchanged.
"""
from __future__ import annotations

import types

import numpy as np


def _prepare_data(self, data_dict):
    boxes = data_dict.get("gt_boxes")
    if boxes is not None and len(boxes):
        return type(self).prepare_data(self, data_dict)
    data_dict["gt_boxes"] = np.zeros((0, 7), dtype=np.float32)
    data_dict["gt_names"] = np.zeros(0, dtype=str)
    if self.training:  # a test-mode dataset has no augmentor
        data_dict = self.data_augmentor.forward(data_dict={**data_dict, "gt_boxes_mask": np.zeros(0, dtype=bool)})
        data_dict.pop("gt_boxes_mask", None)
    data_dict["gt_boxes"] = np.zeros((0, 8), dtype=np.float32)  # + class column, as OpenPCDet appends
    data_dict = self.point_feature_encoder.forward(data_dict)
    data_dict = self.data_processor.forward(data_dict=data_dict)
    data_dict.pop("gt_names", None)
    return data_dict


def allow_unlabelled(dataset) -> None:
    """Let ``dataset`` (an OpenPCDet dataset, training or test mode) serve frames without boxes. Idempotent."""
    dataset.prepare_data = types.MethodType(_prepare_data, dataset)
