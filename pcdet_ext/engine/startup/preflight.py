"""Checks of a whole OpenPCDet config before any data is loaded or anything is written: the top-level
sections, mistakes in head configs that OpenPCDet only reports at the first training step (as a bare
tensor-size mismatch), and the dataset files. Every error is a ConfigError naming the keys or path."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from pcdet_ext.config import ConfigError, agree, unknown_keys_error
from pcdet_ext.utils.safe_pickle import UnsafePickleError, load_infos
from pcdet_ext.paths import from_yaml

# OpenPCDet's sections, the keys its tools add at run time, and the two of users' configs
TOP_LEVEL = ("CLASS_NAMES", "DATA_CONFIG", "MODEL", "OPTIMIZATION", "LOSS_CONFIG", "EXPERIMENT",
             "TAG", "EXP_GROUP_PATH", "ROOT_DIR", "LOCAL_RANK")
EXPERIMENT_MIRRORS = ("DIFFERENTIAL_LR", "BACKBONE_LR_RATIO", "DENSE_HEAD_LR_RATIO")


def check_top_level(cfg) -> None:
    """Only known top-level sections; ``LOSS_CONFIG`` folded into ``MODEL.BACKBONE_3D`` (a value given
    in both places must agree); optimizer keys repeated under ``EXPERIMENT`` (free-form notes) must
    agree with ``OPTIMIZATION``, which is what is applied."""
    unknown = [k for k in cfg if k not in TOP_LEVEL]
    if unknown:
        raise unknown_keys_error("config top level", unknown, TOP_LEVEL)
    apply_loss_config(cfg)
    notes, optim = cfg.get("EXPERIMENT") or {}, cfg.get("OPTIMIZATION") or {}
    if not isinstance(notes, dict):
        raise ConfigError(f"EXPERIMENT: expected a mapping of notes, got {notes!r}")
    for key in EXPERIMENT_MIRRORS:
        agree(f"OPTIMIZATION.{key}", optim.get(key), f"EXPERIMENT.{key}", notes.get(key))


def apply_loss_config(cfg) -> None:
    """Top-level ``LOSS_CONFIG`` -> ``MODEL.BACKBONE_3D`` (the R-MAE backbone's rule)."""
    if cfg.get("LOSS_CONFIG") is None:
        return
    backbone = (cfg.get("MODEL") or {}).get("BACKBONE_3D")
    if backbone is None:
        raise ConfigError("LOSS_CONFIG: given, but the model has no MODEL.BACKBONE_3D to apply it to")
    from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import RMAECMAEBackbonePhase1
    (_rmae_backbone(backbone) or RMAECMAEBackbonePhase1).fold_loss_config(cfg.LOSS_CONFIG, backbone)


def _rmae_backbone(backbone) -> Optional[type]:
    """The R-MAE backbone class a ``MODEL.BACKBONE_3D`` names, or None for any other backbone."""
    name = backbone.get("NAME")
    if name == "RMAECMAEBackbonePhase1":
        from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import RMAECMAEBackbonePhase1
        return RMAECMAEBackbonePhase1
    if name == "RMAECMAEBackbonePhase2":
        from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase2 import RMAECMAEBackbonePhase2
        return RMAECMAEBackbonePhase2
    return None


def _numbers(value, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def check_data(cfg) -> None:
    """``CLASS_NAMES`` a non-empty list of distinct names; ``DATA_CONFIG.POINT_CLOUD_RANGE`` six finite
    numbers with min < max on each axis; every ``VOXEL_SIZE`` of ``DATA_PROCESSOR`` three finite
    positive numbers (OpenPCDet would divide by them, or build an empty or negative grid)."""
    classes = cfg.get("CLASS_NAMES")
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes):
        raise ConfigError(f"CLASS_NAMES: expected a non-empty list of distinct class names, got {classes!r}")
    data = cfg.get("DATA_CONFIG") or {}
    pc_range = data.get("POINT_CLOUD_RANGE")
    if pc_range is not None:
        if not _numbers(pc_range, 6):
            raise ConfigError(f"DATA_CONFIG.POINT_CLOUD_RANGE: expected six finite numbers [x_min, y_min, z_min, "
                              f"x_max, y_max, z_max], got {pc_range!r}")
        if not all(pc_range[i] < pc_range[i + 3] for i in range(3)):
            raise ConfigError(f"DATA_CONFIG.POINT_CLOUD_RANGE: expected min < max on every axis "
                              f"[x_min, y_min, z_min, x_max, y_max, z_max], got {list(pc_range)}")
    for i, proc in enumerate(data.get("DATA_PROCESSOR") or []):
        if isinstance(proc, dict) and "VOXEL_SIZE" in proc:
            size = proc.get("VOXEL_SIZE")
            if not _numbers(size, 3) or not all(v > 0 for v in size):
                raise ConfigError(f"DATA_CONFIG.DATA_PROCESSOR.{i}.VOXEL_SIZE ({proc.get('NAME')}): expected three "
                                  f"finite positive sizes in metres, got {size!r}")


def check_model(cfg) -> None:
    """Head mistakes caught before any data: code_weights vs regression channels, per-class lists vs
    classes, head class names within CLASS_NAMES, gt_sampling point features vs the point encoding."""
    classes = list(cfg.get("CLASS_NAMES") or [])
    head = (cfg.get("MODEL") or {}).get("DENSE_HEAD")
    if head:
        _check_head_classes(head, classes)
        _check_code_weights(head)
        post = head.get("POST_PROCESSING") or {}
        if post.get("USE_IOU_TO_RECTIFY_SCORE"):
            _check_length("MODEL.DENSE_HEAD.POST_PROCESSING.IOU_RECTIFIER", post.get("IOU_RECTIFIER"),
                          len(classes), f"one per class of CLASS_NAMES {classes}")
        if head.get("IOU_BRANCH"):
            _check_length("MODEL.DENSE_HEAD.RECTIFIER", head.get("RECTIFIER"), len(classes),
                          f"one per class of CLASS_NAMES {classes} (IOU_BRANCH: True)")
        _check_nms_lists(post.get("NMS_CONFIG") or {}, classes, head.get("IOU_BRANCH", False))
    _check_gt_sampling(cfg.get("DATA_CONFIG") or {})


def _check_head_classes(head, classes: List[str]) -> None:
    for i, names in enumerate(head.get("CLASS_NAMES_EACH_HEAD") or []):
        bad = [n for n in names if n not in classes]
        if bad:
            raise ConfigError(f"MODEL.DENSE_HEAD.CLASS_NAMES_EACH_HEAD[{i}]: {bad} not in CLASS_NAMES {classes}")


def _check_code_weights(head) -> None:
    weights = ((head.get("LOSS_CONFIG") or {}).get("LOSS_WEIGHTS") or {}).get("code_weights")
    if weights is None:
        return
    key = "MODEL.DENSE_HEAD.LOSS_CONFIG.LOSS_WEIGHTS.code_weights"
    sep = head.get("SEPARATE_HEAD_CFG")
    if sep:  # CenterHead, VoxelNeXtHead, TransFusionHead: one weight per regressed channel
        order, heads = list(sep.get("HEAD_ORDER") or []), sep.get("HEAD_DICT") or {}
        missing = [h for h in order if h not in heads]
        if missing:
            raise ConfigError(f"MODEL.DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_ORDER: {missing} not in HEAD_DICT {sorted(heads)}")
        channels = [int(heads[h]["out_channels"]) for h in order]
        if len(weights) != sum(channels):
            parts = " + ".join(f"{h} {c}" for h, c in zip(order, channels))
            raise ConfigError(f"{key}: {len(weights)} weights, but MODEL.DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_ORDER "
                              f"regresses {sum(channels)} channels ({parts})")
        return
    assigner = head.get("TARGET_ASSIGNER_CONFIG") or {}
    if assigner.get("BOX_CODER") == "ResidualCoder":  # anchor heads
        coder = assigner.get("BOX_CODER_CONFIG") or {}
        size = int(coder.get("code_size", 7)) + int(bool(coder.get("encode_angle_by_sincos", False)))
        if len(weights) != size:
            raise ConfigError(f"{key}: {len(weights)} weights, but MODEL.DENSE_HEAD.TARGET_ASSIGNER_CONFIG "
                              f"(ResidualCoder, BOX_CODER_CONFIG {dict(coder)}) encodes {size} box channels")


def _check_length(key: str, values, expected: int, what: str) -> None:
    if not isinstance(values, (list, tuple)) or len(values) != expected:
        n = len(values) if isinstance(values, (list, tuple)) else values
        raise ConfigError(f"{key}: expected {expected} values ({what}), got {n!r}")


def _check_nms_lists(nms, classes: List[str], iou_branch: bool) -> None:
    keys = ("NMS_THRESH", "NMS_PRE_MAXSIZE", "NMS_POST_MAXSIZE")
    per_class = iou_branch or nms.get("NMS_TYPE") == "class_specific_nms"
    where = "MODEL.DENSE_HEAD.POST_PROCESSING.NMS_CONFIG"
    for key in keys:
        if key not in nms:
            continue
        is_list = isinstance(nms[key], (list, tuple))
        if per_class:
            why = "IOU_BRANCH: True" if iou_branch else "NMS_TYPE: class_specific_nms"
            _check_length(f"{where}.{key}", nms[key], len(classes), f"one per class of CLASS_NAMES {classes}, {why}")
        elif is_list:
            raise ConfigError(f"{where}.{key}: a list {list(nms[key])} needs NMS_TYPE: class_specific_nms "
                              f"(one per class); {where}.NMS_TYPE is {nms.get('NMS_TYPE')!r}, which takes one number")


def _gt_sampling(data_cfg) -> list:
    """The enabled gt_sampling entries of ``DATA_AUGMENTOR``."""
    augmentor = data_cfg.get("DATA_AUGMENTOR") or {}
    if "gt_sampling" in (augmentor.get("DISABLE_AUG_LIST") or []):
        return []
    return [a for a in augmentor.get("AUG_CONFIG_LIST") or [] if a.get("NAME") == "gt_sampling"]


def _check_gt_sampling(data_cfg) -> None:
    src = list((data_cfg.get("POINT_FEATURE_ENCODING") or {}).get("src_feature_list") or [])
    for aug in _gt_sampling(data_cfg):
        n = aug.get("NUM_POINT_FEATURES")
        if src and n is not None and int(n) != len(src):
            raise ConfigError(f"DATA_CONFIG.DATA_AUGMENTOR gt_sampling NUM_POINT_FEATURES: {n}, but "
                              f"DATA_CONFIG.POINT_FEATURE_ENCODING.src_feature_list has {len(src)} features {src}")


# ---- dataset paths ------------------------------------------------------------------------------
def resolve_data_path(data_cfg, resolve: Callable[[str], Path] = from_yaml) -> None:
    """``DATA_PATH`` made absolute by ``resolve``: :func:`~pcdet_ext.paths.from_yaml` for a value from a YAML
    file (OpenPCDet's convention: ``../data/kitti`` relative to ``<root>/tools``, whatever the working
    directory), :func:`~pcdet_ext.paths.from_cli` for one given with ``--set``."""
    if data_cfg is not None and data_cfg.get("DATA_PATH") is not None:
        data_cfg.DATA_PATH = str(resolve(data_cfg.DATA_PATH))


def check_dataset_files(data_cfg, splits: Iterable[str] = ("train", "test"), root: Optional[Path] = None,
                        root_key: str = "DATA_CONFIG.DATA_PATH") -> None:
    """``root`` (default ``DATA_PATH``) exists and holds the info files of ``splits`` and the gt_sampling
    database infos (OpenPCDet would build 0 samples, or fail on ``BACKUP_DB_INFO``), each a complete
    pickle of what dataset infos hold, read without running code (:func:`~pcdet_ext.utils.safe_pickle.load_infos`:
    a planted or truncated file never reaches OpenPCDet's ``pickle.load``); otherwise an error naming
    the key and the path."""
    root = Path(str(data_cfg.get("DATA_PATH", ""))) if root is None else Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root_key}: {root} is not a directory (create the dataset first: tools/create_data.py)")
    files: List[tuple] = []
    infos = data_cfg.get("INFO_PATH") or {}
    for split in splits:
        files += [(f"DATA_CONFIG.INFO_PATH.{split}", root / name) for name in infos.get(split, [])]
    if "train" in splits:
        files += [("gt_sampling DB_INFO_PATH", root / name) for aug in _gt_sampling(data_cfg)
                  for name in aug.get("DB_INFO_PATH") or []]
    missing = [f"{key}: {path}" for key, path in files if not path.is_file()]
    if missing:
        raise ConfigError("dataset files missing (run tools/create_data.py for this DATA_PATH): " + "; ".join(missing))
    for key, path in files:  # OpenPCDet unpickles them: read each first with only infos' types admitted
        try:
            load_infos(path)
        except UnsafePickleError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def check_not_empty(dataset, data_cfg, split: str) -> None:
    """A dataset that built no samples is an error naming the info files it read."""
    if len(dataset) == 0:
        files = [str(Path(str(data_cfg.DATA_PATH)) / n) for n in (data_cfg.get("INFO_PATH") or {}).get(split, [])]
        raise ConfigError(f"DATA_CONFIG: the {split} split has 0 samples (read {files or 'no INFO_PATH'}); "
                          "check DATA_SPLIT, INFO_PATH and the class names of the infos")


def check_config(cfg) -> None:
    """Every check that needs no data: top-level sections, classes and grid, LOSS_CONFIG / EXPERIMENT, OPTIMIZATION,
    this package's model sections (each module's own spec), head configs."""
    check_top_level(cfg)
    check_data(cfg)
    if cfg.get("OPTIMIZATION") is not None:
        from pcdet_ext.engine.optimization import parse_optimization
        parse_optimization(cfg.OPTIMIZATION)
    model = cfg.get("MODEL") or {}
    if model.get("NAME") == "PointPillarRQ":
        from pcdet_ext.openpcdet.models.bottlenecks.rq_bottleneck import parse_rq_config
        parse_rq_config(model.get("RQ_BOTTLENECK"))
    backbone_cls = _rmae_backbone(model.get("BACKBONE_3D") or {})
    if backbone_cls is not None:
        backbone_cls.check_config(model.BACKBONE_3D)
        from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_phase2_config import check_equipment_types
        check_equipment_types(model.BACKBONE_3D, cfg.CLASS_NAMES)
    check_model(cfg)
