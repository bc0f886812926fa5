"""R-MAE + CMAE Phase 2 backbone: Phase 1 (radial masking, occupancy, EMA teacher) plus multi-scale
latent feature reconstruction (MLFR) on the teacher's sites, voxel- and frame-level contrast, a
teacher momentum schedule and loss balancing.

Like Phase 1 it *is* the configured encoder: the pretrained encoder weights keep OpenPCDet's names.
Phase 2's own modules (``mlfr``, ``voxel_head``, ``voxel_head_teacher``, ``frame_head``,
``frame_head_teacher``, ``frame_queue``, ``balancer``) are pretraining-only and dropped by the
convert tool (:data:`PHASE2_ADDED_MODULES`). Config: :mod:`.rmae_cmae_phase2_config`.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from easydict import EasyDict

from pcdet_ext.algorithms.contrastive import (FrameQueue, ProjectionHead, frame_infonce, frame_sequence_ids,
                                              sample_sites, top1_retrieval, voxel_infonce)
from pcdet_ext.algorithms.loss_balancing import LossBalancer
from pcdet_ext.algorithms.mlfr import reconstruction_loss
from pcdet_ext.algorithms.momentum import cosine_momentum
from pcdet_ext.algorithms.teacher_student import ema_update_, match_features, params_to_buffers_
from pcdet_ext.config import ConfigError
from pcdet_ext.openpcdet.models.backbones_3d.mlfr_decoder import MLFRDecoder
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import RMAECMAEBackbonePhase1
from pcdet_ext.openpcdet.models.backbones_3d.loss_weights import notes
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_phase2_config import (PHASE2_SPEC, SECTIONS,
                                                                             parse_phase2_sections)

PHASE2_ADDED_MODULES = ("mlfr", "voxel_head", "voxel_head_teacher", "frame_head", "frame_head_teacher",
                        "frame_queue", "balancer")
TEACHER_HEADS = ("voxel_head_teacher", "frame_head_teacher")
TOP1_ROWS = 512  # sampled sites (a random order) whose retrieval among all is logged


def _zero(module: nn.Module) -> torch.Tensor:
    """0 that keeps every parameter of ``module`` in the graph (DDP: the same parameter set on every rank)."""
    return sum(p.sum() for p in module.parameters()) * 0.0


class RMAECMAEBackbonePhase2(RMAECMAEBackbonePhase1):
    """See the module docstring. ``get_loss() -> (loss, tb_dict)`` with every term ``loss_<term>``
    and its effective weight ``weight_<term>``; call :meth:`set_total_steps` before training with the
    cosine momentum schedule (the Phase 2 tool does)."""

    CONFIG_SPEC = PHASE2_SPEC
    PHASE2 = True

    def __init__(self, model_cfg, input_channels, grid_size, voxel_size, point_cloud_range, **kwargs):
        super().__init__(model_cfg, input_channels, grid_size, voxel_size, point_cloud_range, **kwargs)
        if not self.pretraining:
            return
        cfg = self._parse_cfg(model_cfg)
        sec = parse_phase2_sections(cfg)
        self.phase2 = sec
        self.use_mlfr, self.use_voxel, self.use_frame = (cfg.ENABLE_MLFR, cfg.ENABLE_VOXEL_CONTRASTIVE,
                                                         cfg.ENABLE_FRAME_CONTRASTIVE)
        if not self.use_teacher and (self.use_mlfr or self.use_voxel or self.use_frame):
            raise ConfigError("MODEL.BACKBONE_3D: ENABLE_MLFR / ENABLE_VOXEL_CONTRASTIVE / ENABLE_FRAME_CONTRASTIVE "
                              "need the teacher (ENABLE_TEACHER_STUDENT: True)")
        self.total_steps: Optional[int] = None
        probe = self._probe(input_channels)
        multi, strides = probe["multi_scale_3d_features"], probe.get("multi_scale_3d_strides") or {}
        channels = {s: int(t.features.shape[1]) for s, t in multi.items()}
        if self.use_mlfr:
            missing = [s for s in sec.MLFR.SCALES if s not in multi]
            if missing:
                raise ConfigError(f"MODEL.BACKBONE_3D.MLFR_CONFIG.MLFR_SCALES: {missing} not among the encoder's "
                                  f"multi_scale_3d_features {sorted(multi)}")
            self.mlfr = nn.ModuleDict({s: MLFRDecoder(channels[s], sec.MLFR.DECODER_BLOCKS, s,
                                                      min(channels[s], sec.MLFR.DECODER_CHANNELS))
                                       for s in sec.MLFR.SCALES})
        if self.use_voxel or self.use_frame:
            scale = sec.VOXEL.SCALE or max(multi, key=lambda s: (int(strides.get(s, 0)), s))
            if scale not in multi:
                raise ConfigError(f"MODEL.BACKBONE_3D.VOXEL_CONTRASTIVE_CONFIG.SCALE: {scale!r} not among the "
                                  f"encoder's multi_scale_3d_features {sorted(multi)}")
            self.contrast_scale = scale
        if self.use_voxel:
            self.voxel_head = ProjectionHead(channels[scale], sec.VOXEL.PROJECTION_DIM)
            self.voxel_head_teacher = params_to_buffers_(copy.deepcopy(self.voxel_head))
        if self.use_frame:
            self.frame_head = ProjectionHead(channels[scale], sec.FRAME.PROJECTION_DIM)
            self.frame_head_teacher = params_to_buffers_(copy.deepcopy(self.frame_head))
            self.frame_queue = FrameQueue(sec.FRAME.MEMORY_BANK_SIZE, sec.FRAME.PROJECTION_DIM)
        weights = {"occupancy": self.rmae_weight, "teacher_student": self.ts_weight,
                   "mlfr": cfg.MLFR_WEIGHT if self.use_mlfr else 0.0,
                   "voxel_contrast": cfg.VOXEL_CONTRASTIVE_WEIGHT if self.use_voxel else 0.0,
                   "frame_contrast": cfg.FRAME_CONTRASTIVE_WEIGHT if self.use_frame else 0.0}
        self.balancer = LossBalancer({k: w for k, w in weights.items() if w > 0}, cfg.LOSS_BALANCING)
        self.momentum_start = sec.MOMENTUM.START if sec.MOMENTUM.START is not None else self.momentum
        if sec.MOMENTUM.NAME == "cosine" and self.momentum_start > sec.MOMENTUM.END:
            raise ConfigError(f"MODEL.BACKBONE_3D.MOMENTUM_SCHEDULE: START {self.momentum_start} must be <= END "
                              f"{sec.MOMENTUM.END}")
        self.momentum = self._momentum_at(0)

    @classmethod
    def check_config(cls, model_cfg) -> EasyDict:
        cfg = super().check_config(model_cfg)
        parse_phase2_sections(cfg)
        return cfg

    @classmethod
    def config_notes(cls, model_cfg) -> List[str]:
        pretraining = bool(model_cfg.get("PRETRAINING", False))
        return notes(model_cfg, cls.CONFIG_SPEC, pretraining, sections=SECTIONS if pretraining else ())

    # ---- momentum --------------------------------------------------------------------------------
    def set_total_steps(self, total_steps: int) -> None:
        """Length of the training (optimizer steps) for the momentum schedule."""
        if total_steps < 1:
            raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    def _momentum_at(self, step: int) -> float:
        sched = self.phase2.MOMENTUM
        if sched.NAME == "constant":
            return self.momentum
        start = self.momentum_start
        if self.total_steps is None:
            return start
        return cosine_momentum(step, self.total_steps, start, sched.END)

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, batch_dict: Dict) -> Dict:
        if not self.pretraining:
            return super().forward(batch_dict)
        if self.training:
            if self.phase2.MOMENTUM.NAME == "cosine" and self.total_steps is None:
                raise RuntimeError("RMAECMAEBackbonePhase2: the cosine MOMENTUM_SCHEDULE needs set_total_steps(n) "
                                   "before training (tools/train_rmae_cmae_phase2.py calls it)")
            step = self.steps_done()
            self.momentum = self._momentum_at(step)
            if step == 0:  # the teacher heads start as the student's (the encoder: Phase 1's forward)
                self._ema_heads(0.0, 0.0)
        batch_dict = super().forward(batch_dict)
        ret, tb = self.forward_ret_dict, self.forward_ret_dict["tb_dict"]
        batch_size = int(batch_dict["batch_size"])
        student = batch_dict.get("multi_scale_3d_features") if tb["visible_voxels"] > 0 else None
        teacher = batch_dict.get("teacher_multi_scale_3d_features")
        if self.use_mlfr:
            ret["loss_mlfr"] = self._mlfr_loss(student, teacher, batch_size, tb)
        if self.use_voxel:
            ret["loss_voxel_contrast"] = self._voxel_loss(student, teacher, tb)
        if self.use_frame:
            ret["loss_frame_contrast"] = self._frame_loss(student, teacher, batch_dict, batch_size, tb)
        return batch_dict

    def runs_teacher(self) -> bool:
        """Phase 1's rule, and whenever a Phase 2 term (MLFR, voxel / frame contrast) trains."""
        return super().runs_teacher() or (self.use_teacher and self.training
                                          and (self.use_mlfr or self.use_voxel or self.use_frame))

    def _mlfr_loss(self, student, teacher, batch_size: int, tb: Dict) -> torch.Tensor:
        """Per scale: decoder on the teacher's sites, loss on the sites the student lacks; the
        weighted mean over scales (``MLFR_LOSS_WEIGHTS``)."""
        cfg = self.phase2.MLFR
        total, weight = _zero(self.mlfr), 0.0
        for s in cfg.SCALES:
            t = teacher[s] if teacher is not None else None
            if t is None or len(t.indices) == 0:
                continue
            pred, masked = self.mlfr[s](student[s] if student is not None else None, t, t.spatial_shape, batch_size)
            loss = reconstruction_loss(pred, t.features, masked, cfg.LOSS, cfg.VISIBLE_WEIGHT)
            tb[f"loss_mlfr_{s}"] = loss.detach()
            tb[f"mlfr_masked_share_{s}"] = masked.float().mean()
            total = total + cfg.SCALE_WEIGHTS[s] * loss
            weight += cfg.SCALE_WEIGHTS[s]
        return total / weight if weight > 0 else total

    def _pair(self, student, teacher) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.contrast_scale
        if student is None or teacher is None:
            return torch.zeros(0, 1), torch.zeros(0, 1)
        st, te = student[s], teacher[s]
        return match_features((st.features, st.indices), (te.features, te.indices), st.spatial_shape)

    def _voxel_loss(self, student, teacher, tb: Dict) -> torch.Tensor:
        """InfoNCE of student vs EMA-teacher projections of the same sites (at most
        ``MAX_NEGATIVE_SAMPLES`` sampled sites of the batch), relational soft targets."""
        cfg = self.phase2.VOXEL
        s_feat, t_feat = self._pair(student, teacher)
        if len(s_feat) < 2:
            return _zero(self.voxel_head)
        gen = torch.Generator().manual_seed(self._seed() + 31)
        pick = sample_sites(len(s_feat), cfg.MAX_NEGATIVE_SAMPLES, gen, device=s_feat.device)
        proj_s = self.voxel_head(s_feat[pick])
        with torch.no_grad():
            proj_t = self.voxel_head_teacher(t_feat[pick])
        loss = voxel_infonce(proj_s, proj_t, cfg.CONTRASTIVE_TEMPERATURE, cfg.RELATIONAL_WEIGHT,
                             cfg.RELATIONAL_TEMPERATURE,
                             cfg.HARD_NEGATIVE_RATIO if cfg.ENABLE_HARD_NEGATIVE_MINING else None)
        tb.update(loss_voxel_contrast=loss.detach(), voxel_top1_chance=1.0 / len(pick), voxel_sites=float(len(pick)))
        if self.metrics_due():
            tb["voxel_top1"] = top1_retrieval(proj_s, proj_t, rows=TOP1_ROWS)
        return loss

    def _frame_loss(self, student, teacher, batch_dict: Dict, batch_size: int, tb: Dict) -> torch.Tensor:
        """Pooled student frame embeddings against their teacher embeddings and the queue; frames of
        one drive within ``SEQUENCE_WINDOW`` are not negatives. Training steps enqueue the teacher's."""
        cfg = self.phase2.FRAME
        device = self.mask_step.device
        s_pool = self._pool(student, batch_size, device)
        with torch.no_grad():
            t_emb = self.frame_head_teacher(self._pool(teacher, batch_size, device))
        s_emb = self.frame_head(s_pool)
        frame_ids = batch_dict.get("frame_id")
        if frame_ids is None:
            seq, idx = torch.arange(batch_size), torch.zeros(batch_size, dtype=torch.long)
        else:
            seq, idx = frame_sequence_ids(list(frame_ids))
        seq, idx = seq.to(device), idx.to(device)
        loss = frame_infonce(s_emb, t_emb, seq, self.frame_queue, cfg.FRAME_TEMPERATURE, cfg.MAX_FRAME_NEGATIVES,
                             index=idx, window=cfg.SEQUENCE_WINDOW,
                             hard_negative_ratio=cfg.HARD_NEGATIVE_RATIO if cfg.ENABLE_HARD_NEGATIVE_MINING else None)
        tb["loss_frame_contrast"] = loss.detach()
        tb["frame_queue_filled"] = (self.frame_queue.sequence >= 0).float().mean()
        if self.training:
            self.frame_queue.enqueue(t_emb, seq, idx)
        return loss

    def _pool(self, features, batch_size: int, device) -> torch.Tensor:
        """[B, C] mean of each frame's features at the contrast scale (zeros for a frame without sites)."""
        channels = self.frame_head.net[0].in_features
        if features is None:
            return torch.zeros(batch_size, channels, device=device)
        t = features[self.contrast_scale]
        b = t.indices[:, 0].long()
        summed = t.features.new_zeros(batch_size, channels).index_add_(0, b, t.features)
        count = torch.bincount(b, minlength=batch_size).clamp_min(1).to(summed.dtype)
        return summed / count[:, None]

    # ---- loss and teacher ----------------------------------------------------------------------
    def get_loss(self) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Balanced sum of the enabled terms (occupancy, teacher-student, MLFR, voxel and frame
        contrast); ``tb_dict`` carries each ``loss_<term>`` and its effective ``weight_<term>``."""
        if not self.forward_ret_dict:
            raise RuntimeError("RMAECMAEBackbonePhase2.get_loss() before a pretraining forward")
        ret = self.forward_ret_dict
        terms = {name: ret[f"loss_{name}"] for name in self.balancer.weights if f"loss_{name}" in ret}
        loss, effective = self.balancer(terms)
        tb = dict(ret["tb_dict"], loss_pretrain=loss.detach())
        tb.update({f"loss_{k}": v.detach() for k, v in terms.items()})
        tb.update({f"weight_{k}": v for k, v in effective.items()})
        return loss, tb

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step of the teacher encoder (scheduled momentum) and of the teacher heads (voxel head:
        the same momentum; frame head: ``FRAME_CONTRASTIVE_CONFIG.MOMENTUM_UPDATE``)."""
        super().update_teacher()
        if self.pretraining and self.use_teacher:
            self._ema_heads(self.momentum, self.phase2.FRAME.MOMENTUM_UPDATE)

    def _ema_heads(self, voxel_momentum: float, frame_momentum: float) -> None:
        for name, m in (("voxel_head", voxel_momentum), ("frame_head", frame_momentum)):
            if hasattr(self, name):
                ema_update_(getattr(self, f"{name}_teacher"), getattr(self, name).named_parameters(), m)

    def teacher_state_names(self) -> List[str]:
        """Phase 1's teacher plus the teacher heads and the frame queue: identical on every rank."""
        names = super().teacher_state_names()
        if self.pretraining:
            for module in (*TEACHER_HEADS, "frame_queue"):
                if hasattr(self, module):
                    names += [f"{module}.{n}" for n, _ in getattr(self, module).named_buffers()]
        return names
