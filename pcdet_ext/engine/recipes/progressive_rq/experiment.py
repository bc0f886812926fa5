"""Turn a validated experiment config into OpenPCDet objects: model cfg, loaders, model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from easydict import EasyDict

from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file, find_config
from pcdet_ext.openpcdet.datasets.class_names import report_dataset_class_names
from pcdet_ext.openpcdet.datasets.holdout import holdout_indices, infos_attr, keep, resize_sampler
from pcdet_ext.engine.startup.preflight import check_data, check_dataset_files
from pcdet_ext.engine.recipes.progressive_rq import schema
from pcdet_ext.config import agree
from pcdet_ext.engine.recipes.progressive_rq.schema import ConfigError
from pcdet_ext.paths import from_cli

RQ = "MODEL.RQ_BOTTLENECK."
# RQ_BOTTLENECK keys of the model config that are experiment settings under another name: a --set of
# either name sets the one value (the experiment's), so ``--set MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS 3`` is
# ``--set model.n_codebook 3``
RQ_ALIASES: Dict[str, str] = {
    RQ + "NUM_CODEBOOKS": "model.n_codebook",
    RQ + "EMBEDDING_SCHEDULE": "progressive_learning.embedding_schedule",
    RQ + "DECAY": "rq_model.decay",
    RQ + "LOSS_WEIGHTS.DET": "loss_weights.det_weight",
    RQ + "LOSS_WEIGHTS.VQ": "loss_weights.vq_weight",
    RQ + "LOSS_WEIGHTS.CODEBOOK": "loss_weights.codebook_weight",
}
# derived from the experiment, never set on its own: a --set that disagrees is refused
RQ_DERIVED = RQ + "CODEBOOK_SIZE"


def split_overrides(pairs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``--set`` KEY VALUE pairs -> (experiment-schema pairs, OpenPCDet model-config pairs). Lower-case
    ``section.key`` is the experiment's, UPPER-CASE the model config's; the aliases of :data:`RQ_ALIASES`
    become their experiment key. One setting given twice with different values is a ConfigError
    naming both."""
    if len(pairs) % 2:
        raise ConfigError(f"--set takes KEY VALUE pairs, got an odd number of items: {list(pairs)}")
    ours: List[str] = []
    theirs: List[str] = []
    given: Dict[str, Tuple[str, Any]] = {}
    for key, raw in zip(pairs[0::2], pairs[1::2]):
        if key == RQ + "LOSS_WEIGHTS":  # a whole dict: one alias per term
            value = yaml.safe_load(raw)
            if not isinstance(value, dict) or not set(value) <= {"DET", "VQ", "CODEBOOK"}:
                raise ConfigError(f"--set {key}: expected a mapping with keys DET, VQ, CODEBOOK, got {raw!r}")
            items = [(f"{key}.{k}", yaml.safe_dump(v)) for k, v in value.items()]
        else:
            items = [(key, raw)]
        for name, val in items:
            target = RQ_ALIASES.get(name, name)
            if target[:1].isupper():
                theirs += [name, val]
                continue
            value = yaml.safe_load(val)
            if target in given:
                agree(f"--set {given[target][0]}", given[target][1], f"--set {name}", value)
            given[target] = (name, value)
            ours += [target, val]
    return ours, theirs


def load_experiment(path: Path, set_pairs: Sequence[str] = (), cli: Optional[Dict[Tuple[str, str], Any]] = None,
                    no_wandb: bool = False) -> Tuple[EasyDict, List[str], List[str]]:
    """The experiment YAML with ``--set`` pairs and flag values (``{(section, key): value}``, None: not
    given) applied and validated, before any work. Returns ``(experiment, model-config --set pairs,
    notes to print)``. ``path`` is found like ``--cfg_file`` (:func:`~pcdet_ext.config.find_config`); a
    relative path given with ``--set`` or a flag is relative to the working directory, one in the file to
    ``<root>/tools`` (:mod:`pcdet_ext.paths`)."""
    raw = yaml.safe_load(find_config(str(path), what="--config").read_text()) or {}
    ours, pcdet_set = split_overrides(list(set_pairs))
    raw = schema.set_overrides(raw, ours)
    given = {tuple(key.split(".")) for key in ours[0::2]}
    for (section, key), val in (cli or {}).items():
        if val is not None:
            raw.setdefault(section, {})[key] = val
            given.add((section, key))
    for section, key in set(schema.PATH_KEYS) & given:
        if isinstance(raw[section][key], str) and raw[section][key]:
            raw[section][key] = str(from_cli(raw[section][key]))
    if no_wandb:
        raw.setdefault("logging", {})["use_wandb"] = False
    exp = schema.validate(raw)
    if not exp.progressive_learning.enabled and "progressive_learning.embedding_schedule" in ours[0::2]:
        raise ConfigError(f"--set {RQ}EMBEDDING_SCHEDULE: progressive_learning.enabled is false, so the schedule "
                          f"is not used; the legacy mode trains rq_model.codebook_size "
                          f"({exp.rq_model.codebook_size}) entries")
    return exp, pcdet_set, schema.notes(raw, exp)

DATASET_CLASSES = {"kitti": "KittiDataset", "custom": "CustomDataset"}


def build_model_cfg(exp: EasyDict, pcdet_set: Sequence[str] = ()) -> EasyDict:
    """The OpenPCDet config of ``model.cfg_file`` with ``--set`` overrides, and its RQ_BOTTLENECK
    filled from the experiment (the one source of the RQ parameters: the model file's values are
    defaults, the aliases of :func:`split_overrides` already set the experiment); mismatches are
    ConfigErrors naming the key."""
    cfg = cfg_from_yaml_file(find_config(exp.model.cfg_file))
    cfg_from_list(list(pcdet_set), cfg)
    if RQ_DERIVED in list(pcdet_set)[0::2]:
        asked = cfg.MODEL.RQ_BOTTLENECK.CODEBOOK_SIZE
        if asked != schema.allocated_entries(exp):
            source = ("the largest size of progressive_learning.embedding_schedule "
                      f"{list(exp.progressive_learning.embedding_schedule)}") if exp.progressive_learning.enabled \
                else "rq_model.codebook_size"
            raise ConfigError(f"--set {RQ_DERIVED} {asked} conflicts with {schema.allocated_entries(exp)} entries "
                              f"from {source}; set that instead")
    check_data(cfg)
    if cfg.MODEL.NAME != "PointPillarRQ":
        raise ConfigError(f"model.cfg_file: {exp.model.cfg_file} builds {cfg.MODEL.NAME}, expected PointPillarRQ")
    expected = DATASET_CLASSES.get(exp.dataset.name.lower(), exp.dataset.name)
    if cfg.DATA_CONFIG.DATASET != expected:
        raise ConfigError(f"dataset.name: {exp.dataset.name} does not match the model config's "
                          f"DATA_CONFIG.DATASET {cfg.DATA_CONFIG.DATASET}")
    if len(cfg.CLASS_NAMES) != exp.dataset.num_classes:
        raise ConfigError(f"dataset.num_classes: {exp.dataset.num_classes}, but the model config has "
                          f"{len(cfg.CLASS_NAMES)} CLASS_NAMES {cfg.CLASS_NAMES}")
    channels = cfg.MODEL.MAP_TO_BEV.NUM_BEV_FEATURES
    if exp.rq_model.latent_shape[2] != channels:
        raise ConfigError(f"rq_model.latent_shape: {exp.rq_model.latent_shape} has {exp.rq_model.latent_shape[2]} "
                          f"channels, the model's BEV features have {channels}")
    progressive = exp.progressive_learning.enabled
    rq = cfg.MODEL.get("RQ_BOTTLENECK", EasyDict())
    rq.update({"NUM_CODEBOOKS": exp.model.n_codebook, "CODEBOOK_SIZE": schema.allocated_entries(exp),
               "EMBEDDING_SCHEDULE": list(exp.progressive_learning.embedding_schedule) if progressive
               else [exp.rq_model.codebook_size],
               "DECAY": exp.rq_model.decay, "FREEZE_EARLIER": progressive and rq.get("FREEZE_EARLIER", True),
               "LOSS_WEIGHTS": {"DET": exp.loss_weights.det_weight, "VQ": exp.loss_weights.vq_weight,
                                "CODEBOOK": exp.loss_weights.codebook_weight}})
    cfg.MODEL.RQ_BOTTLENECK = rq
    return cfg


def build(exp: EasyDict, cfg: EasyDict, dist: bool, logger: logging.Logger):
    """``(model, (train_set, train_loader, train_sampler), (val_set, val_loader), (selection_set,
    selection_loader))``: the selection frames choose stage bests and early stopping; with
    ``dataset.selection: train_holdout`` (when training) they are a held-out part of train (which then
    trains on the rest), with ``val`` the validation split itself."""
    from pcdet.datasets import build_dataloader
    from pcdet.models import build_network
    root = Path(exp.dataset.dir)
    check_dataset_files(cfg.DATA_CONFIG, ("train", "test"), root=root, root_key="dataset.dir")
    common = dict(dataset_cfg=cfg.DATA_CONFIG, class_names=cfg.CLASS_NAMES, batch_size=exp.training.batch_size,
                  root_path=root, workers=exp.training.num_workers, logger=logger)
    train = build_dataloader(dist=dist, training=True, **common)
    val_set, val_loader, _ = build_dataloader(dist=False, training=False, **common)
    if len(train[0]) == 0 or len(val_set) == 0:
        raise ConfigError(f"dataset.dir: {root} has no train or val infos (run tools/create_data.py first)")
    selection = (val_set, val_loader)
    if exp.dataset.selection == "train_holdout" and exp.training.mode == "train":
        train_set, seed = train[0], exp.seed if exp.seed is not None else 0
        held = holdout_indices(len(train_set), exp.dataset.selection_fraction, seed)
        frames = getattr(train_set, infos_attr(train_set))
        sel_set, sel_loader = train_frames_loader(exp, cfg, [frames[i] for i in held], logger)
        keep(train_set, [i for i in range(len(frames)) if i not in set(held)])
        resize_sampler(train[2], train_set)
        selection = (sel_set, sel_loader)
        logger.info("selection: %d train frames held out (dataset.selection_fraction %g, seed %d) select stage bests "
                    "and early stopping; %d train; results are reported on val (%d)", len(sel_set),
                    exp.dataset.selection_fraction, seed, len(train_set), len(val_set))
    report_dataset_class_names(val_set)
    model = build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=train[0]).cuda()
    return model, train, (val_set, val_loader), selection


def train_frames_loader(exp: EasyDict, cfg: EasyDict, frames: List[Dict], logger: logging.Logger):
    """``(dataset, loader)`` in test mode (no augmentation, no shuffling) over the train split's infos ``frames``."""
    from pcdet.datasets import build_dataloader
    dataset, loader, _ = build_dataloader(dataset_cfg=cfg.DATA_CONFIG, class_names=cfg.CLASS_NAMES,
                                          batch_size=exp.training.batch_size, root_path=Path(exp.dataset.dir),
                                          workers=exp.training.num_workers, logger=logger, dist=False, training=False)
    dataset.set_split(cfg.DATA_CONFIG.DATA_SPLIT["train"])
    setattr(dataset, infos_attr(dataset), list(frames))
    return dataset, loader


def describe_selection(config: Optional[Dict[str, Any]]) -> str:
    """Which frames selected the checkpoint of a run whose experiment config is ``config`` (as stored in
    its checkpoints)."""
    dataset = (config or {}).get("dataset") or {}
    selection = dataset.get("selection")
    if selection == "train_holdout":
        return (f"a held-out {dataset.get('selection_fraction', 0) * 100:g} % of the train split (seed "
                f"{(config or {}).get('seed') or 0}), never trained on")
    if selection == "val":
        return "the val split itself (dataset.selection: val): the reported numbers are optimistic"
    return "unknown (a checkpoint without dataset.selection: selected on val by the tool of its time)"


def class_names(cfg: EasyDict) -> List[str]:
    return list(cfg.CLASS_NAMES)
