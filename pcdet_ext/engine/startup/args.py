"""OpenPCDet-style command lines: flags, config loading (``--set``), output folders."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file, find_config
from pcdet_ext.engine.startup.preflight import check_config, resolve_data_path
from pcdet_ext.paths import from_cli, from_yaml, output_root


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """OpenPCDet's ``tools/train.py`` flags (``--local_rank`` / ``--local-rank`` accepted and ignored:
    torchrun's ``LOCAL_RANK`` is used)."""
    p = parser
    p.add_argument("--cfg_file", type=str, required=True, help="model config (cfgs/<group>/<name>.yaml)")
    p.add_argument("--batch_size", type=int, default=None, help="per GPU / process (default: BATCH_SIZE_PER_GPU)")
    p.add_argument("--epochs", type=int, default=None, help="default: OPTIMIZATION.NUM_EPOCHS")
    p.add_argument("--workers", type=int, default=4, help="dataloader workers")
    p.add_argument("--extra_tag", type=str, default="default")
    p.add_argument("--ckpt", type=str, default=None, help="checkpoint to resume from (default: latest in ckpt/)")
    p.add_argument("--pretrained_model", type=str, default=None)
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none")
    p.add_argument("--tcp_port", type=int, default=18888, help="rendezvous port when MASTER_PORT is unset")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sync_bn", action="store_true", default=False,
                   help="SyncBatchNorm under torch.distributed (pretraining: the student; the teacher follows it)")
    p.add_argument("--use_amp", action="store_true", default=False,
                   help="mixed precision (also OPTIMIZATION.USE_AMP; initial loss scale LOSS_SCALE_FP16)")
    p.add_argument("--logger_iter_interval", type=int, default=50,
                   help="log training scalars (and compute training-time metrics) every N iterations")
    p.add_argument("--fix_random_seed", action="store_true", default=False)
    p.add_argument("--ckpt_save_interval", type=int, default=1)
    p.add_argument("--max_ckpt_save_num", type=int, default=30)
    p.add_argument("--preflight_only", action="store_true",
                   help="check the config, dataset files and checkpoints, then exit (dist_train.sh runs it first)")
    add_set_argument(p, default=None)
    return p


def add_set_argument(parser: argparse.ArgumentParser, default=None) -> None:
    """``--set KEY VALUE [KEY VALUE ...]``, up to the next ``--flag`` (OpenPCDet's tools take everything after
    it; negative numbers and list literals are values)."""
    parser.add_argument("--set", dest="set_cfgs", default=default, nargs="+", metavar="KEY VALUE",
                        help="config overrides, KEY VALUE pairs (up to the next --flag)")


def load_config(cfg_file: str, set_cfgs: Optional[Sequence[str]]):
    """The EasyDict config with ``--set`` applied, ``TAG`` (file stem) and ``EXP_GROUP_PATH`` (its
    folders below ``cfgs/``, as OpenPCDet computes them), checked before any data is loaded
    (:func:`~pcdet_ext.engine.startup.preflight.check_config`). A relative ``DATA_CONFIG.DATA_PATH`` from a
    YAML file is taken relative to ``<root>/tools`` (OpenPCDet's convention), one given with
    ``--set`` relative to the working directory (:mod:`pcdet_ext.paths`)."""
    path = find_config(cfg_file, what="--cfg_file")
    cfg = cfg_from_yaml_file(path)
    resolve_data_path(cfg.get("DATA_CONFIG"), from_yaml)
    if set_cfgs:
        cfg_from_list(list(set_cfgs), cfg)
        if "DATA_CONFIG.DATA_PATH" in list(set_cfgs)[0::2]:
            resolve_data_path(cfg.DATA_CONFIG, from_cli)
    cfg.TAG = path.stem
    parts = Path(cfg_file).parts
    cfg.EXP_GROUP_PATH = "/".join(parts[parts.index("cfgs") + 1:-1] if "cfgs" in parts else parts[1:-1])
    check_config(cfg)
    return cfg


def output_dir(cfg, extra_tag: str) -> Path:
    """``<root>/output/<EXP_GROUP_PATH>/<TAG>/<extra_tag>`` (OpenPCDet's layout); ``<root>`` as in
    :mod:`pcdet_ext.paths`, or ``$PCDET_EXT_OUTPUT_ROOT`` when set (e.g. a read-only checkout)."""
    return output_root() / "output" / cfg.EXP_GROUP_PATH / cfg.TAG / extra_tag
