"""Tier 2: tests that run unmodified OpenPCDet (PCDET_ROOT or an installed pcdet) on this CPU."""
import subprocess
import sys
from pathlib import Path

import pytest

import pcdet_ext
from pcdet_ext.openpcdet.datasets import create_infos
from pcdet_ext.openpcdet.datasets import synthetic_writer
from tier2 import CUSTOM_TEST_SCENE, KITTI_TEST_SCENE, REPO, SMALL, phase_cfgs, tool


def _why_no_openpcdet():
    try:
        pcdet_ext.import_pcdet()
        return None
    except ImportError as exc:
        return f"tier 2 needs OpenPCDet: {exc}"


_REASON = _why_no_openpcdet()


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=_REASON)
    for item in items:
        if "tests/openpcdet" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pcdet_tools() -> Path:
    """OpenPCDet's tools/ folder on sys.path (train_utils lives there, not in the pcdet package)."""
    import pcdet
    tools = Path(pcdet.__file__).resolve().parent.parent / "tools"
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    return tools


@pytest.fixture(scope="session")
def stock_optimization(pcdet_tools):
    """OpenPCDet's own tools/train_utils/optimization, untouched: ``import pcdet_ext`` serves its
    builders to ``train_utils.optimization`` (a fork's import), so stock behaviour is loaded privately."""
    from pcdet_ext.openpcdet.locator import pcdet_tools_module
    module = pcdet_tools_module("train_utils/optimization")
    from pcdet_ext.engine.optimization import build_optimizer
    assert module.build_optimizer is not build_optimizer
    return module


@pytest.fixture(scope="session")
def synthetic_kitti(tmp_path_factory) -> Path:
    root = synthetic_writer.write_kitti(tmp_path_factory.mktemp("kitti") / "synthetic_kitti", num_frames=6,
                                        seed=7, val_fraction=0.34, spec=KITTI_TEST_SCENE)
    return create_infos.create_kitti(root, workers=1)


@pytest.fixture(scope="session")
def synthetic_isarc(tmp_path_factory) -> Path:
    root = synthetic_writer.write_custom(tmp_path_factory.mktemp("isarc") / "synthetic_isarc", num_frames=6,
                                         seed=7, val_fraction=0.34, spec=CUSTOM_TEST_SCENE)
    return create_infos.create_custom(root, synthetic_writer.CONSTRUCTION_CLASSES,
                                      dataset_cfg=REPO / "cfgs/dataset_configs/custom_dataset_isarc.yaml", workers=1)


@pytest.fixture(scope="session")
def cfgs():
    """Phase 1 (pretraining, fine-tune) configs: VoxelNeXt where OpenPCDet has it, else SECOND."""
    return phase_cfgs(1)


@pytest.fixture(scope="session")
def pretrained(cfgs, synthetic_isarc, tmp_path_factory):
    """A 2-epoch Phase 1 pretraining run on the synthetic 4-class set: (ckpt dir, output root)."""
    out = tmp_path_factory.mktemp("pretrain_out")
    res = tool("train_rmae_cmae_phase1.py", "--cfg_file", cfgs[0], "--batch_size", "2", "--epochs", "2",
               "--workers", "0", "--extra_tag", "t", "--set", "DATA_CONFIG.DATA_PATH", str(synthetic_isarc), *SMALL,
               out_root=out)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt_dir = out / "output/custom_models" / Path(cfgs[0]).stem / "t/ckpt"
    return ckpt_dir, out


@pytest.fixture(scope="session")
def exported(kitti_raw, tmp_path_factory):
    """A full-grid KITTI PointPillarRQ (5 x 256, quantizer fitted to real pillar features), its checkpoint
    with bitstream models, and the bundle tools/export_edge.py writes from it."""
    import torch

    from pcdet_ext.deploy import runtime
    from pcdet_ext.edge import read_scan
    from pcdet_ext.engine.recipes.progressive_rq.measured import STATE_KEY
    from pcdet_ext.utils.checkpoint import atomic_save, plain
    tmp = tmp_path_factory.mktemp("edge")
    torch.manual_seed(0)
    model, dataset, cfg = runtime.load_split_model("cfgs/kitti_models/pointpillar_rq.yaml")
    model.eval()
    scans = sorted((kitti_raw / "velodyne").glob("*.bin"))
    fit = [read_scan(f) for f in scans[:4]]
    runtime.fit_quantizer_to_frames(model, dataset, fit, [16, 64, 256], steps=5)
    models = runtime.fit_probability_models(model, dataset, fit, [16, 64, 256])
    ckpt = tmp / "rq_bitstream.pth"
    atomic_save({"model_state": model.state_dict(), STATE_KEY: models.to_state(), "pcdet_cfg": plain(cfg)}, ckpt)
    proc = subprocess.run([sys.executable, str(REPO / "tools/export_edge.py"), "--ckpt", str(ckpt), "--out",
                           str(tmp / "bundle")], capture_output=True, text=True, cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cells (1, 16), (2, 16)" in proc.stdout and "(5, 256)" in proc.stdout
    return model, dataset, models, ckpt, tmp / "bundle", scans[4:24]
