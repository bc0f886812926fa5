"""PointPillars with a residual-quantization bottleneck for split inference."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from pcdet_ext.openpcdet.locator import require_pcdet
from pcdet_ext.utils.checkpoint import load_checkpoint
from pcdet_ext.openpcdet.models.bottlenecks.rq_bottleneck import RQBottleneck, parse_rq_config

require_pcdet("PointPillarRQ")
from pcdet.models.detectors.pointpillar import PointPillar  # noqa: E402

HEAD_MODULES = ("vfe", "map_to_bev_module")     # runs on the vehicle
TAIL_MODULES = ("backbone_2d", "dense_head")    # runs on the server


class PointPillarRQ(PointPillar):
    """OpenPCDet's PointPillar with ``rq_bottleneck`` after the pillar features (``MODE: sparse``) or
    after the scatter (``MODE: dense``). Config: ``MODEL.RQ_BOTTLENECK`` (see ``parse_rq_config``).

    With ``FREEZE_HEAD_TAIL`` (default) the head net (vfe, scatter) and tail net (2D backbone, dense
    head) get no gradient and their BatchNorms stay in eval mode while training: only the
    bottleneck trains. Batch outputs: ``rq_codes`` [M, n] (sparse: one row per pillar, in
    ``voxel_coords`` order) besides OpenPCDet's usual keys.
    """

    def __init__(self, model_cfg, num_class, dataset):
        super().__init__(model_cfg=model_cfg, num_class=num_class, dataset=dataset)
        self.rq_cfg = parse_rq_config(model_cfg.get("RQ_BOTTLENECK"))
        channels = self.map_to_bev_module.num_bev_features
        self.rq_bottleneck = RQBottleneck(self.rq_cfg, input_channels=channels)
        if self.rq_cfg.FREEZE_HEAD_TAIL:
            for name in HEAD_MODULES + TAIL_MODULES:
                for p in getattr(self, name).parameters():
                    p.requires_grad_(False)

    @property
    def quantizer(self):
        return self.rq_bottleneck.quantizer

    def frozen_modules(self) -> List[nn.Module]:
        return [getattr(self, n) for n in HEAD_MODULES + TAIL_MODULES] if self.rq_cfg.FREEZE_HEAD_TAIL else []

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, batch_dict):
        batch_dict = self.vfe(batch_dict)
        if self.rq_cfg.MODE == "sparse":
            batch_dict = self.rq_bottleneck(batch_dict)
        batch_dict = self.map_to_bev_module(batch_dict)
        if self.rq_cfg.MODE == "dense":
            batch_dict = self.rq_bottleneck(batch_dict)
        batch_dict = self.backbone_2d(batch_dict)
        batch_dict = self.dense_head(batch_dict)
        if self.training:
            loss, tb_dict, disp_dict = self.get_training_loss(batch_dict.get("rq_output"))
            return {"loss": loss}, tb_dict, disp_dict
        pred_dicts, recall_dicts = self.post_processing(batch_dict)
        return pred_dicts, recall_dicts

    def get_training_loss(self, rq_out) -> Tuple[torch.Tensor, Dict, Dict]:
        w = self.rq_cfg.LOSS_WEIGHTS
        loss_det, tb_dict = self.dense_head.get_loss()
        loss = w.DET * loss_det
        tb_dict = {"loss_det": loss_det.detach(), **tb_dict}  # tensors: read on the host only when logged
        if rq_out is None:  # bottleneck bypassed
            tb_dict["loss_total"] = loss.detach()
            return loss, tb_dict, {}
        vq = [rq_out.losses[k] for k in ("codebook", "commitment") if k in rq_out.losses]
        if vq:  # mse(residual, quantized): pulls the trainable codebooks (and an adapter) to the features
            vq_loss = torch.stack(vq).sum()
            loss = loss + w.VQ * vq_loss
            tb_dict["loss_vq"] = vq_loss.detach()
        tb_dict["loss_total"] = loss.detach()
        tb_dict["rq_num_codebooks"] = rq_out.num_codebooks
        tb_dict["rq_num_embeddings"] = rq_out.num_embeddings[-1]
        tb_dict.update({f"rq_{k}": v for k, v in rq_out.stats.items()})
        return loss, tb_dict, {}

    def load_pretrained_pointpillars(self, filename: str, logger: Optional[logging.Logger] = None
                                     ) -> Dict[str, Tuple[int, int]]:
        """Load an OpenPCDet checkpoint (name- and shape-matched), report loaded/total per module,
        and fail if any frozen head/tail parameter did not load (it would stay random forever)."""
        logger = logger or logging.getLogger(__name__)
        state = load_checkpoint(filename)
        disk = state.get("model_state", state) if isinstance(state, dict) else None
        if not isinstance(disk, dict):
            raise RuntimeError(f"{filename}: no 'model_state' in this checkpoint")
        own = self.state_dict()
        matched = {k: v for k, v in disk.items() if k in own and own[k].shape == v.shape}
        report = {}
        for name in HEAD_MODULES + TAIL_MODULES + ("rq_bottleneck",):
            keys = [k for k in own if k.startswith(name + ".")]
            report[name] = (sum(k in matched for k in keys), len(keys))
        logger.info("pretrained %s: %s", filename,
                    ", ".join(f"{n} {a}/{b}" for n, (a, b) in report.items()))
        missing = [k for n in HEAD_MODULES + TAIL_MODULES for k in own if k.startswith(n + ".") and k not in matched]
        if self.rq_cfg.FREEZE_HEAD_TAIL and missing:
            bad = {n: f"{a}/{b}" for n, (a, b) in report.items() if n != "rq_bottleneck" and a < b}
            raise RuntimeError(f"{filename} does not match this PointPillars head/tail (loaded/total: {bad}; "
                               f"first missing: {missing[:3]}); frozen modules would stay untrained")
        self.load_state_dict(matched, strict=False)
        return report
