"""R-MAE + CMAE Phase 1 detector: pretraining (VFE -> backbone, self-supervised loss) or detection."""
from __future__ import annotations

from typing import Dict

import torch

from pcdet_ext.config import ConfigError
from pcdet_ext.openpcdet.locator import require_pcdet
from pcdet_ext.openpcdet.lr_rules import unserved
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import ignore_teachers_in_ddp
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_phase2_config import check_equipment_types

require_pcdet("RMAECMAEDetectorPhase1")
from pcdet.models.detectors.detector3d_template import Detector3DTemplate  # noqa: E402

PRETRAINING_TOPOLOGY = ["vfe", "backbone_3d"]


class RMAECMAEDetectorPhase1(Detector3DTemplate):
    """``MODEL.BACKBONE_3D.PRETRAINING: True``: only VFE and backbone are built (other MODEL sections
    are ignored); training returns the backbone's ``RMAE_WEIGHT x occupancy + TEACHER_STUDENT_WEIGHT x
    teacher-student`` loss, evaluation returns ``(metrics, {})`` (occupancy P/R/IoU, losses).

    ``PRETRAINING: False``: VFE -> backbone -> (map_to_bev, 2D backbone) -> dense head as configured
    (e.g. VoxelNeXtHead, CenterHead, AnchorHeadSingle); ``DETECTION_WEIGHT`` x the head's loss, its
    post-processing.
    """

    def __init__(self, model_cfg, num_class, dataset):
        super().__init__(model_cfg=model_cfg, num_class=num_class, dataset=dataset)
        self.pretraining = bool(model_cfg.BACKBONE_3D.get("PRETRAINING", False))
        if self.pretraining:
            self.module_topology = PRETRAINING_TOPOLOGY
        elif model_cfg.get("DENSE_HEAD") is None:
            raise ConfigError("MODEL.DENSE_HEAD: detection mode (BACKBONE_3D.PRETRAINING: False) needs a dense head")
        check_equipment_types(model_cfg.BACKBONE_3D, self.class_names)
        self.module_list = self.build_networks()
        # LOSS_CONFIG folded and checked by the backbone (a stock backbone: the default weight)
        self.detection_weight = getattr(self.backbone_3d, "detection_weight", 1.0)
        self._lr_checked = False
        if self.pretraining:
            ignore_teachers_in_ddp(self)

    def forward(self, batch_dict: Dict):
        if self.training and not self._lr_checked:  # before the first step: never train at 1x by accident
            why = unserved(self)
            if why:
                raise ConfigError(why)
            self._lr_checked = True
        for module in self.module_list:
            batch_dict = module(batch_dict)
        if self.pretraining:
            loss, tb_dict = self.backbone_3d.get_loss()
            if self.training:
                return {"loss": loss}, tb_dict, {}
            return tb_dict, {}
        if self.training:
            loss, tb_dict = self.dense_head.get_loss()
            return {"loss": self.detection_weight * loss}, dict(tb_dict, loss_rpn=loss.item()), {}
        return self.post_processing(batch_dict)

    def post_processing(self, batch_dict: Dict):
        if "final_box_dicts" not in batch_dict:  # anchor heads: OpenPCDet's NMS post-processing
            return super().post_processing(batch_dict)
        thresh = self.model_cfg.POST_PROCESSING.RECALL_THRESH_LIST
        recall_dict: Dict = {}
        for index in range(batch_dict["batch_size"]):
            recall_dict = self.generate_recall_record(
                box_preds=batch_dict["final_box_dicts"][index]["pred_boxes"], recall_dict=recall_dict,
                batch_index=index, data_dict=batch_dict, thresh_list=thresh)
        return batch_dict["final_box_dicts"], recall_dict

    def recalibrate_batchnorm(self, loader, max_batches: int) -> int:
        """The backbone's :meth:`~.RMAECMAEBackbonePhase1.recalibrate_batchnorm` over at most
        ``max_batches`` batches of ``loader`` (through the VFE); returns the batches used."""
        from pcdet.models import load_data_to_gpu

        def batches():
            for i, batch in enumerate(loader):
                if i >= max_batches:
                    break
                load_data_to_gpu(batch)
                with torch.no_grad():
                    yield self.vfe(batch)
        return self.backbone_3d.recalibrate_batchnorm(batches())

    def update_teacher(self) -> None:
        """EMA step of the backbone's teacher (pretraining); call after every optimizer step."""
        if self.pretraining:
            self.backbone_3d.update_teacher()
