"""R-MAE + CMAE Phase 1 backbone: a stock OpenPCDet sparse encoder plus masking, an occupancy
decoder and an EMA teacher, active only with ``PRETRAINING: True``.

``RMAECMAEBackbonePhase1`` *is* the encoder named by ``ENCODER`` (default OpenPCDet's
``VoxelResBackBone8xVoxelNeXt``; ``VoxelBackBone8x`` for SECOND-style detectors; or a
``package.module:Class`` of the user's fork): constructing it builds a subclass of that very class,
so the encoder's modules keep OpenPCDet's names and shapes (``backbone_3d.conv_input...``) and the
pretrained weights load 100 % into a stock backbone. The added modules live under
``occ_decoder``, ``ts_regression`` and ``teacher`` (parameters turned into buffers) and are
ignored by the fine-tune detector.

Config (``MODEL.BACKBONE_3D``): the keys of :data:`BACKBONE_SPEC` (``PRETRAINING``, the masking keys
of :class:`~pcdet_ext.algorithms.masking.MaskingConfig`, ``MASK_SEED``, ``RMAE_WEIGHT``,
``OCCUPANCY_DECODER``, the teacher keys, users' ``TEACHER_STUDENT_MODE`` / ``FEATURE_DIM`` /
``TEACHER_BACKBONE_TYPE``, the loss weights of :mod:`.loss_weights`) and the encoder's own keys; any
other key is an error. A top-level ``LOSS_CONFIG`` is folded in (a value given in both places must
agree). Keys accepted without effect are printed as one-line notes when the backbone is built.
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Dict, Iterable, List, Set, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from easydict import EasyDict

from pcdet_ext.config import ConfigError, NoneType, Opt, from_cfg
from pcdet_ext.openpcdet.locator import require_pcdet
from pcdet_ext.openpcdet.models.backbones_3d.loss_weights import (DETECTION_WEIGHT, PHASE1_ABSENT, check_weights,
                                                                  detection_weight, fold_loss_config,
                                                                  global_loss_config, notes, print_notes)
from pcdet_ext.algorithms.masking import MASKING_SPEC, MaskingConfig, mask_voxels
from pcdet_ext.algorithms.occupancy import (CellGeometry, OccupancyConfig, OccupancyDecoder, occupancy_loss,
                                      occupancy_metrics, occupancy_targets)
from pcdet_ext.algorithms.teacher_student import (FeatureRegression, cosine_similarity, ema_update_,
                                                   estimating_batchnorm, match_features, params_to_buffers_)

DEFAULT_ENCODER = "VoxelResBackBone8xVoxelNeXt"
ADDED_MODULES = ("occ_decoder", "ts_regression", "teacher")
METRICS_INTERVAL = 50  # training steps between metrics without a log hook (OpenPCDet's logging interval)
DETECTION_ONLY_FORBIDDEN = {"MASKED_RATIO": 0, "ENABLE_TEACHER_STUDENT": False}


BACKBONE_SPEC = {
    "NAME": Opt(None, (str, NoneType)),
    "ENCODER": Opt(DEFAULT_ENCODER, (str,)),
    "PRETRAINING": Opt(False, (bool,)),
    **MASKING_SPEC,
    "MASK_SEED": Opt(0, (int,)),
    "RMAE_WEIGHT": Opt(1.0, (float,), lo=0.0),
    "OCCUPANCY_DECODER": Opt(None, (dict, NoneType)),
    "ENABLE_TEACHER_STUDENT": Opt(True, (bool,)),
    "TEACHER_BACKBONE_TYPE": Opt("identical", (str,), choices=("identical",),
                                 note="the teacher is always an EMA copy of the student encoder (the only value)"),
    "TEACHER_MOMENTUM": Opt(0.999, (float,), lo=0.0, hi=1.0),
    "TEACHER_STUDENT_WEIGHT": Opt(0.0, (float,), lo=0.0),
    "TEACHER_STUDENT_SCALES": Opt(["x_conv2", "x_conv3", "x_conv4"], (list, tuple)),
    # users' configs: accepted with this meaning
    "TEACHER_STUDENT_MODE": Opt("phase1", (str,), choices=("phase1",),
                                note="Phase 1 feature regression (the only mode of this class)"),
    "FEATURE_DIM": Opt(None, (int, NoneType), lo=1,
                       note="informational: the regression works at each teacher scale's own channel count"),
    "DETECTION_WEIGHT": DETECTION_WEIGHT,
    **PHASE1_ABSENT,
}
_CFG_KEY = re.compile(r"model_cfg(?:\.get\(\s*|\[\s*|\.)['\"]?([A-Za-z_][A-Za-z0-9_]*)")


def encoder_keys(encoder: type) -> Set[str]:
    """The config keys an encoder class (and its bases) reads from ``model_cfg``, from its source;
    they are the encoder's to check."""
    keys: Set[str] = set()
    for cls in encoder.__mro__:
        if cls in (nn.Module, object) or not cls.__module__ or cls.__module__.startswith("torch"):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        keys |= {k for k in _CFG_KEY.findall(source) if k not in ("get", "items", "keys")}
    return keys


def parse_backbone_cfg(model_cfg, spec: Dict = BACKBONE_SPEC) -> EasyDict:
    """``MODEL.BACKBONE_3D`` checked against ``spec`` (:data:`BACKBONE_SPEC`) plus the keys its encoder
    reads: an unknown key (e.g. ``MASKED_RATO``) is an error naming it and the known ones."""
    encoder_name = spec["ENCODER"].check("MODEL.BACKBONE_3D.ENCODER", (model_cfg or {}).get("ENCODER", DEFAULT_ENCODER))
    cfg = from_cfg(model_cfg, spec, "MODEL.BACKBONE_3D", passthrough=encoder_keys(resolve_encoder(encoder_name)))
    MaskingConfig.from_cfg(cfg)
    OccupancyConfig.from_cfg(cfg.OCCUPANCY_DECODER)
    return cfg


def resolve_encoder(name: str) -> type:
    """An OpenPCDet ``backbones_3d`` class by registry name, or ``package.module:Class``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"MODEL.BACKBONE_3D.ENCODER: expected a backbone class name, got {name!r}")
    if ":" in name:
        module_name, cls_name = name.split(":", 1)
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"MODEL.BACKBONE_3D.ENCODER: cannot import {name!r} ({exc})") from exc
    else:
        require_pcdet("RMAECMAEBackbonePhase1")
        from pcdet.models import backbones_3d
        cls = backbones_3d.__all__.get(name)
        if cls is None:
            available = sorted(k for k, v in backbones_3d.__all__.items()
                               if isinstance(v, type) and not issubclass(v, RMAECMAEBackbonePhase1))
            raise ConfigError(f"MODEL.BACKBONE_3D.ENCODER: OpenPCDet has no backbones_3d class {name!r}; "
                              f"available: {available}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, RMAECMAEBackbonePhase1):
        raise ConfigError(f"MODEL.BACKBONE_3D.ENCODER: {name!r} is not a stock sparse encoder class")
    return cls


_CONCRETE: Dict[Tuple[type, type], type] = {}


class RMAECMAEBackbonePhase1(nn.Module):
    """See the module docstring. Pretraining outputs: ``get_loss() -> (loss, tb_dict)``;
    ``batch_dict['teacher_multi_scale_3d_features']`` when the teacher runs."""

    encoder_cls: type = None  # set on the concrete subclass built for one encoder
    CONFIG_SPEC: Dict = BACKBONE_SPEC
    PHASE2 = False  # the Phase 2 terms (MLFR, voxel / frame contrast) exist

    def __new__(cls, model_cfg=None, *args, **kwargs):
        if cls.encoder_cls is None:
            encoder = resolve_encoder((model_cfg or {}).get("ENCODER", DEFAULT_ENCODER))
            if (cls, encoder) not in _CONCRETE:
                _CONCRETE[cls, encoder] = type(f"{cls.__name__}_{encoder.__name__}", (cls, encoder),
                                               {"encoder_cls": encoder, "__module__": cls.__module__})
            cls = _CONCRETE[cls, encoder]
        return super().__new__(cls)

    def __init__(self, model_cfg, input_channels, grid_size, voxel_size, point_cloud_range, **kwargs):
        enc_args = dict(model_cfg=model_cfg, input_channels=input_channels, grid_size=grid_size,
                        voxel_size=voxel_size, point_cloud_range=point_cloud_range, **kwargs)
        cfg = self._parse_cfg(model_cfg)
        print_notes(type(self).config_notes(model_cfg))
        super().__init__(**enc_args)  # the encoder class (next in the MRO)
        self.pretraining = cfg.PRETRAINING
        self.detection_weight = detection_weight(cfg)
        self.voxel_size = [float(v) for v in voxel_size]
        self.point_cloud_range = [float(v) for v in point_cloud_range]
        self.grid_size = [int(g) for g in grid_size]
        if not self.pretraining:
            for key, off in DETECTION_ONLY_FORBIDDEN.items():
                if model_cfg.get(key, off) != off:
                    raise ConfigError(f"MODEL.BACKBONE_3D.{key}: must be {off} with PRETRAINING: False "
                                      f"(got {model_cfg.get(key)!r}); masking and the teacher are pretraining-only")
            return
        self._encoder_params = [n for n, _ in self.named_parameters()]
        # the encoder's float buffers (BatchNorm statistics): the teacher tracks them too
        self._encoder_stats = [n for n, b in self.named_buffers() if b is not None and b.is_floating_point()]
        self.mask_cfg = MaskingConfig.from_cfg(cfg)
        self.mask_seed = cfg.MASK_SEED
        self.register_buffer("mask_step", torch.zeros((), dtype=torch.long))
        self._host_step = None  # mask_step mirrored on the host (read once, then counted: no sync per step)
        self.compute_metrics = None  # training-time metrics now? the log hook sets it per step (see metrics_due)
        self.rmae_weight = cfg.RMAE_WEIGHT
        self.ts_weight = cfg.TEACHER_STUDENT_WEIGHT
        self.use_teacher = cfg.ENABLE_TEACHER_STUDENT
        if self.ts_weight > 0 and not self.use_teacher:
            raise ConfigError("MODEL.BACKBONE_3D.TEACHER_STUDENT_WEIGHT > 0 needs ENABLE_TEACHER_STUDENT: True")
        probe = self._probe(input_channels)
        enc = probe["encoded_spconv_tensor"]
        self._encoded_shape = [int(v) for v in enc.spatial_shape]
        if min(self._encoded_shape) < 1:
            raise ConfigError(f"MODEL.BACKBONE_3D.ENCODER {self.encoder_cls.__name__}: its output grid "
                              f"{self._encoded_shape} (z, y, x) is empty for the voxel grid {list(self.sparse_shape)}; "
                              f"DATA_CONFIG.POINT_CLOUD_RANGE / VOXEL_SIZE give too few cells for its strides "
                              f"(e.g. SECOND's VoxelBackBone8x needs 41 z cells: 4 m at 0.1 m)")
        self.occ_cfg = OccupancyConfig.from_cfg(cfg.OCCUPANCY_DECODER)
        self.full_shape = [int(s) for s in self.sparse_shape]
        self._check_sensor_inside()
        self.occ_decoder = OccupancyDecoder(
            self.occ_cfg, enc.features.shape[1], enc.spatial_shape[0] if len(enc.spatial_shape) == 3 else 1,
            int(probe["encoded_spconv_tensor_stride"]), self.full_shape)
        if self.use_teacher:
            self.momentum = cfg.TEACHER_MOMENTUM
            scales = list(cfg.TEACHER_STUDENT_SCALES)
            multi = probe["multi_scale_3d_features"]
            missing = [s for s in scales if s not in multi]
            if missing:
                raise ConfigError(f"MODEL.BACKBONE_3D.TEACHER_STUDENT_SCALES: {missing} not among the encoder's "
                                  f"multi_scale_3d_features {sorted(multi)}")
            self.ts_scales = scales
            self._scale_channels = {s: multi[s].features.shape[1] for s in scales}
            teacher = self.encoder_cls(**enc_args)
            wanted = teacher.state_dict()
            teacher.load_state_dict({k: v for k, v in self.state_dict().items() if k in wanted})
            for m in teacher.modules():  # its statistics follow the student's by EMA, not its own batches,
                if isinstance(m, nn.modules.batchnorm._NormBase):  # so every DDP rank keeps the same teacher
                    m.momentum = 0.0
            self.teacher = params_to_buffers_(teacher)
            if self.ts_weight > 0:
                self.ts_regression = FeatureRegression(self._scale_channels)
        self.forward_ret_dict: Dict = {}

    @classmethod
    def fold_loss_config(cls, loss_cfg, backbone_cfg, where: str = "LOSS_CONFIG") -> None:
        """A top-level ``LOSS_CONFIG`` (:data:`~.loss_weights.LOSS_KEYS`) into ``backbone_cfg``."""
        fold_loss_config(loss_cfg, backbone_cfg, cls.CONFIG_SPEC, where)

    @classmethod
    def check_config(cls, model_cfg) -> EasyDict:
        """``MODEL.BACKBONE_3D`` validated (no model built)."""
        cfg = parse_backbone_cfg(model_cfg, cls.CONFIG_SPEC)
        check_weights(cfg, cfg.PRETRAINING, cls.PHASE2)
        return cfg

    @classmethod
    def config_notes(cls, model_cfg) -> List[str]:
        """The one-line notes on keys of ``model_cfg`` accepted without effect (or with a meaning of
        their own here); see :func:`~.loss_weights.notes`."""
        return notes(model_cfg, cls.CONFIG_SPEC, bool(model_cfg.get("PRETRAINING", False)))

    @classmethod
    def _parse_cfg(cls, model_cfg) -> EasyDict:
        cls.fold_loss_config(global_loss_config(model_cfg), model_cfg)
        return cls.check_config(model_cfg)

    def _check_sensor_inside(self) -> None:
        """LiDAR rays start at SENSOR_ORIGIN: it must lie inside POINT_CLOUD_RANGE (else no ray is traced)."""
        origin = list(self.mask_cfg.sensor_xyz)
        lo, hi = self.point_cloud_range[:3], self.point_cloud_range[3:]
        if not all(a <= o <= b for o, a, b in zip(origin, lo, hi)):
            raise ConfigError(f"MODEL.BACKBONE_3D.SENSOR_ORIGIN {origin} lies outside DATA_CONFIG.POINT_CLOUD_RANGE "
                              f"{self.point_cloud_range}: free space is traced along rays from the sensor; give the "
                              f"sensor position in the point-cloud frame")

    @torch.no_grad()
    def _probe(self, input_channels: int) -> Dict:
        """The encoder's outputs (shapes, channels, stride) on two voxels, on the CPU where models are
        built. Convolutions run in training mode (stock spconv's CPU kernels refuse the fused bias of
        eval mode, and on a CUDA machine no CPU-runtime patch is there to help), normalisation
        layers in eval mode (running statistics untouched, any number of sites): nothing changes."""
        modes = {m: m.training for m in self.modules()}
        self.train()
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.eval()
        try:
            centre = [s // 2 for s in self.sparse_shape]
            coords = torch.tensor([[0, *centre], [0, centre[0], centre[1] + 1, centre[2]]], dtype=torch.int32)
            device = next(self.parameters()).device
            return self.encoder_cls.forward(self, {"voxel_features": torch.zeros(2, input_channels, device=device),
                                                   "voxel_coords": coords.to(device), "batch_size": 1})
        finally:
            for m, mode in modes.items():
                m.training = mode

    def steps_done(self) -> int:
        """Training forwards so far (``mask_step``), read from the device once per loaded state."""
        if self._host_step is None:
            self._host_step = int(self.mask_step)
        return self._host_step

    def _load_from_state_dict(self, *args, **kwargs):
        self._host_step = None  # mask_step may change: read it again
        super()._load_from_state_dict(*args, **kwargs)

    def _seed(self) -> int:
        if not self.training:
            return self.mask_seed + 1_000_003  # validation: the same masks every time
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return self.mask_seed + self.steps_done() * world + rank

    def metrics_due(self) -> bool:
        """Whether this forward computes the training-time metrics (occupancy AP, P/R/IoU, cosines: host
        copies): always in evaluation; in training as the runner's log hook says (``compute_metrics``),
        else (e.g. stock OpenPCDet's loop in a fork) on the first and every ``METRICS_INTERVAL``-th step."""
        if not self.training:
            return True
        if self.compute_metrics is not None:
            return bool(self.compute_metrics)
        return (self.steps_done() - 1) % METRICS_INTERVAL == 0

    def runs_teacher(self) -> bool:
        """Whether this forward encodes the complete voxels with the teacher: only for a loss that
        uses it (training with ``TEACHER_STUDENT_WEIGHT`` > 0); evaluation never needs it. The
        teacher is kept up to date by EMA either way."""
        return self.use_teacher and self.training and self.ts_weight > 0

    def forward(self, batch_dict: Dict) -> Dict:
        if not self.pretraining:
            return super().forward(batch_dict)
        if "points" not in batch_dict:
            raise KeyError("RMAECMAEBackbonePhase1 pretraining needs batch_dict['points'] (the full scan, for "
                           "ray-cast free space); OpenPCDet's datasets provide it")
        coords = batch_dict["voxel_coords"].long()
        feats = batch_dict["voxel_features"]
        batch_size = int(batch_dict["batch_size"])
        seed = self._seed()
        if self.training:
            if self.use_teacher:  # here the student's state is what DDP broadcast from rank 0 (identical on
                # every rank); the teacher itself is never broadcast. First step: the teacher starts as the student
                # (also after --pretrained_model); then its BatchNorm statistics follow the student's by EMA.
                first = self.steps_done() == 0
                self._ema_teacher(0.0 if first else self.momentum, params=first)
            self.mask_step += 1
            self._host_step = self.steps_done() + 1
        mask = mask_voxels(coords, batch_size, self.voxel_size, self.point_cloud_range, self.mask_cfg,
                           seed=seed, grid_size=self.grid_size)
        masked = mask.masked
        visible = torch.nonzero(~masked).squeeze(1)  # the student's voxels: a shape that depends on the data
        n_vis = len(visible)
        if n_vis:
            student = super().forward(dict(batch_dict, voxel_features=feats[visible],
                                           voxel_coords=batch_dict["voxel_coords"][visible]))
            batch_dict.update({k: student[k] for k in ("encoded_spconv_tensor", "encoded_spconv_tensor_stride",
                                                        "multi_scale_3d_features", "multi_scale_3d_strides")})
            enc = student["encoded_spconv_tensor"]
            logits = self.occ_decoder(enc.features, enc.indices, enc.spatial_shape, batch_size)
        else:  # nothing visible (e.g. every frame empty): the decoder still learns empty space from zeros;
            # every encoder parameter stays in the graph so DDP's reducer sees the same set on all ranks
            nothing = feats.new_zeros(0, self.occ_decoder.reduce.in_features)
            idx = torch.zeros(0, len(self._encoded_shape) + 1, dtype=torch.long, device=feats.device)
            logits = self.occ_decoder(nothing, idx, self._encoded_shape, batch_size) + 0.0 * sum(
                p.sum() for n, p in self.named_parameters() if n in self._encoder_params)
        gen = torch.Generator().manual_seed(seed + 29)
        geometry = CellGeometry.of(batch_size, self.full_shape, self.voxel_size, self.point_cloud_range,
                                   self.occ_cfg, self.mask_cfg.sensor_xyz, self.mask_cfg.distance_thresholds)
        targets = occupancy_targets(coords, masked, batch_dict["points"], geometry, self.occ_cfg, gen)
        loss_occ = occupancy_loss(logits.float(), targets, self.occ_cfg)
        tb = {"loss_occupancy": loss_occ.detach(), "visible_voxels": float(n_vis),
              "masked_voxels": float(len(masked) - n_vis), **mask.log_dict()}
        if self.metrics_due():
            tb.update(occupancy_metrics(logits.detach().float(), targets))
        # logits and targets stay for evaluation against baselines on the same cells (benchmarks)
        self.forward_ret_dict = {"loss_occupancy": loss_occ, "tb_dict": tb, "occupancy": (logits.detach(), targets)}
        if self.use_teacher:
            tb["ema_momentum"] = self.momentum
        if self.runs_teacher():
            if len(coords):  # the encoder cannot run on zero voxels
                with torch.no_grad():
                    teacher = self.teacher(dict(batch_dict))
                batch_dict["teacher_multi_scale_3d_features"] = teacher["multi_scale_3d_features"]
            matched = self._matched(batch_dict, n_vis)
            if self.metrics_due():
                tb.update(cosine_similarity(matched))
            if self.ts_weight > 0:
                loss_ts = self._get_teacher_student_loss(matched)
                self.forward_ret_dict["loss_teacher_student"] = loss_ts
                tb["loss_teacher_student"] = loss_ts.detach()
        return batch_dict

    def _matched(self, batch_dict: Dict, n_vis: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Student / teacher features at shared voxel coordinates per scale (empty when either is absent)."""
        out = {}
        for s in self.ts_scales:
            if n_vis and "teacher_multi_scale_3d_features" in batch_dict:
                st, te = batch_dict["multi_scale_3d_features"][s], batch_dict["teacher_multi_scale_3d_features"][s]
                out[s] = match_features((st.features, st.indices), (te.features, te.indices), st.spatial_shape)
            else:
                empty = torch.zeros(0, self._scale_channels[s], device=self.mask_step.device)
                out[s] = (empty, empty)
        return out

    def _get_teacher_student_loss(self, matched: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Multi-scale latent regression: per scale, predicted student features vs the layer-normalised
        teacher features at the same voxel coordinates (MSE), averaged over scales (unweighted)."""
        return self.ts_regression(matched)

    def get_loss(self) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``RMAE_WEIGHT x occupancy + TEACHER_STUDENT_WEIGHT x teacher-student`` of the last forward."""
        if not self.forward_ret_dict:
            raise RuntimeError("RMAECMAEBackbonePhase1.get_loss() before a pretraining forward")
        ret = self.forward_ret_dict
        loss = self.rmae_weight * ret["loss_occupancy"]
        if "loss_teacher_student" in ret:
            loss = loss + self.ts_weight * ret["loss_teacher_student"]
        tb = dict(ret["tb_dict"], loss_pretrain=loss.detach())
        return loss, tb

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step of the teacher from the student encoder; call after every optimizer step."""
        if self.pretraining and self.use_teacher:
            self._ema_teacher(self.momentum, stats=False)

    def _ema_teacher(self, momentum: float, params: bool = True, stats: bool = True) -> None:
        """Teacher <- EMA of the student's parameters and/or BatchNorm statistics (``momentum`` 0: a copy)."""
        pairs = []
        if params:
            named = dict(self.named_parameters())
            pairs += [(n, named[n]) for n in self._encoder_params]
        if stats:
            named = dict(self.named_buffers())
            pairs += [(n, named[n]) for n in self._encoder_stats]
        ema_update_(self.teacher, pairs, momentum)

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: Iterable[Dict]) -> int:
        """Re-estimate the BatchNorm statistics of the student encoder and of the teacher on complete
        (unmasked) voxels: during pretraining the student's statistics (and the teacher's, an EMA of
        them) come from masked, ~20 %-density input, but a fine-tuned detector, a frozen probe or the
        converted teacher sees complete scans. ``batches``: batch dicts after the VFE
        (``voxel_features``, ``voxel_coords``, ``batch_size``), e.g. a few training batches. Run it
        after pretraining, before those uses (the pretraining tool does, ``--bn_recalibration_batches``).
        In detection mode (a frozen-encoder probe from random init) every BatchNorm here is the encoder's.
        Returns the number of batches used."""
        teacher = self.pretraining and self.use_teacher
        stat_owners = {n.rsplit(".", 1)[0] for n in self._encoder_stats} if self.pretraining else None
        layers = [m for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                  and (stat_owners is None or n in stat_owners)]
        if teacher:
            layers += [m for m in self.teacher.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        used = 0
        modes = {m: m.training for m in self.modules()}
        self.train()  # the encoder's convolutions as in training (stock spconv's CPU kernels need it)
        try:
            with estimating_batchnorm(layers):
                for batch in batches:
                    if len(batch["voxel_coords"]) == 0:
                        continue
                    self.encoder_cls.forward(self, dict(batch))
                    if teacher:
                        self.teacher(dict(batch))
                    used += 1
        finally:
            for m, mode in modes.items():
                m.training = mode
        return used

    def teacher_state_names(self) -> List[str]:
        """Names (relative to this module) of the teacher's tensors: identical on every DDP rank by
        construction (same start, same EMA of DDP-synchronised student state), so not to be broadcast."""
        return [f"teacher.{n}" for n, _ in self.teacher.named_buffers()] if self.pretraining and self.use_teacher else []


def ignore_teachers_in_ddp(model: nn.Module) -> List[str]:
    """Keep every R-MAE backbone teacher of ``model`` out of DDP's buffer broadcast (set before wrapping
    ``model`` in DistributedDataParallel); returns the names."""
    names = [f"{prefix}.{n}" if prefix else n for prefix, m in model.named_modules()
             if isinstance(m, RMAECMAEBackbonePhase1) for n in m.teacher_state_names()]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, existing + [n for n in names if n not in existing])
    return names

