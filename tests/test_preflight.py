"""Config mistakes caught before any data is loaded (pure config checks, no OpenPCDet needed)."""
import copy
from pathlib import Path

import pytest
from easydict import EasyDict

from _subproc import run_python
from pcdet_ext.config import ConfigError, cfg_from_yaml_file
from pcdet_ext.engine.startup import preflight

REPO = Path(__file__).resolve().parent.parent
VOXELNEXT_FT = REPO / "cfgs/custom_models/rmae_cmae_isarc_4class_finetune_phase1.yaml"
SECOND_FT = REPO / "cfgs/custom_models/rmae_cmae_second_isarc_4class_finetune_phase1.yaml"


@pytest.fixture(scope="module")
def voxelnext():
    return cfg_from_yaml_file(VOXELNEXT_FT)


def test_shipped_configs_pass(voxelnext):
    preflight.check_top_level(copy.deepcopy(voxelnext))
    for cfg in (voxelnext, cfg_from_yaml_file(SECOND_FT)):
        preflight.check_model(cfg)


def mutate(cfg, change):
    cfg = copy.deepcopy(cfg)
    change(cfg)
    return cfg


@pytest.mark.parametrize("change, match", [
    (lambda c: c.MODEL.DENSE_HEAD.LOSS_CONFIG.LOSS_WEIGHTS.__setitem__("code_weights", [1.0] * 7),
     r"LOSS_WEIGHTS.code_weights: 7 weights, but MODEL.DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_ORDER regresses 8 channels "
     r"\(center 2 \+ center_z 1 \+ dim 3 \+ rot 2\)"),
    (lambda c: c.MODEL.DENSE_HEAD.__setitem__("CLASS_NAMES_EACH_HEAD", [["dumptruck", "crane"]]),
     r"CLASS_NAMES_EACH_HEAD\[0\]: \['crane'\] not in CLASS_NAMES"),
    (lambda c: c.MODEL.DENSE_HEAD.POST_PROCESSING.update(USE_IOU_TO_RECTIFY_SCORE=True, IOU_RECTIFIER=[0.5] * 3),
     r"POST_PROCESSING.IOU_RECTIFIER: expected 4 values \(one per class"),
    (lambda c: c.MODEL.DENSE_HEAD.POST_PROCESSING.NMS_CONFIG.update(NMS_TYPE="class_specific_nms", NMS_THRESH=[0.1] * 2,
                                                                   NMS_PRE_MAXSIZE=[100] * 4, NMS_POST_MAXSIZE=[50] * 4),
     r"NMS_CONFIG.NMS_THRESH: expected 4 values"),
    (lambda c: c.MODEL.DENSE_HEAD.POST_PROCESSING.NMS_CONFIG.update(NMS_THRESH=[0.1] * 4),
     r"NMS_CONFIG.NMS_THRESH: a list .* needs NMS_TYPE: class_specific_nms"),
    (lambda c: c.DATA_CONFIG.DATA_AUGMENTOR.AUG_CONFIG_LIST[0].__setitem__("NUM_POINT_FEATURES", 4),
     r"gt_sampling NUM_POINT_FEATURES: 4, but DATA_CONFIG.POINT_FEATURE_ENCODING.src_feature_list has 3"),
])
def test_head_and_data_mistakes_name_both_keys(voxelnext, change, match):
    with pytest.raises(ConfigError, match=match):
        preflight.check_model(mutate(voxelnext, change))


def test_anchor_head_code_weights_vs_box_coder():
    cfg = cfg_from_yaml_file(SECOND_FT)
    cfg.MODEL.DENSE_HEAD.LOSS_CONFIG.LOSS_WEIGHTS.code_weights = [1.0] * 8
    with pytest.raises(ConfigError, match=r"code_weights: 8 weights, but .*ResidualCoder.* encodes 7 box channels"):
        preflight.check_model(cfg)


def test_top_level_sections_loss_config_and_experiment_notes(voxelnext):
    with pytest.raises(ConfigError, match=r"config top level: unknown key\(s\) 'OPTIMISATION'"):
        preflight.check_top_level(mutate(voxelnext, lambda c: c.__setitem__("OPTIMISATION", {})))
    ok = mutate(voxelnext, lambda c: c.__setitem__("EXPERIMENT", {"NOTE": "baseline", "BACKBONE_LR_RATIO": 0.1,
                                                                  "DIFFERENTIAL_LR": True}))
    preflight.check_top_level(ok)  # free-form notes, repeating OPTIMIZATION
    with pytest.raises(ConfigError, match=r"OPTIMIZATION.BACKBONE_LR_RATIO=0.1 conflicts with EXPERIMENT.BACKBONE_LR_RATIO=0.2"):
        preflight.check_top_level(mutate(ok, lambda c: c.EXPERIMENT.__setitem__("BACKBONE_LR_RATIO", 0.2)))
    loss = mutate(voxelnext, lambda c: c.__setitem__("LOSS_CONFIG", EasyDict(RMAE_WEIGHT=0.7, TEACHER_STUDENT_WEIGHT=0.5)))
    preflight.check_top_level(loss)
    assert loss.MODEL.BACKBONE_3D.RMAE_WEIGHT == 0.7 and loss.MODEL.BACKBONE_3D.TEACHER_STUDENT_WEIGHT == 0.5
    clash = mutate(voxelnext, lambda c: (c.__setitem__("LOSS_CONFIG", EasyDict(RMAE_WEIGHT=0.7)),
                                         c.MODEL.BACKBONE_3D.__setitem__("RMAE_WEIGHT", 1.0)))
    with pytest.raises(ConfigError, match=r"MODEL.BACKBONE_3D.RMAE_WEIGHT=1.0 conflicts with LOSS_CONFIG.RMAE_WEIGHT=0.7"):
        preflight.check_top_level(clash)
    with pytest.raises(ConfigError, match=r"LOSS_CONFIG: unknown key\(s\) 'RMAE_WEIGTH'"):
        preflight.check_top_level(mutate(voxelnext, lambda c: c.__setitem__("LOSS_CONFIG", {"RMAE_WEIGTH": 1.0})))


def test_dataset_files_and_relative_data_path(tmp_path, voxelnext):
    data = mutate(voxelnext, lambda c: None).DATA_CONFIG
    data.DATA_PATH = "../data/isarc"
    preflight.resolve_data_path(data)  # a YAML value: relative to <root>/tools (the tests' root: this checkout)
    assert data.DATA_PATH == str(REPO / "data" / "isarc")
    data.DATA_PATH = str(tmp_path)
    with pytest.raises(ConfigError, match=rf"DATA_CONFIG.INFO_PATH.train: {tmp_path}/custom_infos_train.pkl; "
                                          rf"gt_sampling DB_INFO_PATH: {tmp_path}/custom_dbinfos_train.pkl"):
        preflight.check_dataset_files(data, ("train",))
    data.DATA_PATH = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="DATA_CONFIG.DATA_PATH: .*absent is not a directory"):
        preflight.check_dataset_files(data)


def test_create_data_without_openpcdet_is_one_line(tmp_path):
    res = run_python("import runpy, sys; sys.argv = ['create_data.py', 'custom', '--data_path', '.', '--class_names', 'a'];"
                     f"runpy.run_path({str(REPO / 'tools/create_data.py')!r}, run_name='__main__')",
                     {"PCDET_ROOT": "", "PYTHONPATH": None})
    if "error:" not in res.stderr:
        pytest.skip("an installed OpenPCDet is importable here")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "needs OpenPCDet" in res.stderr


@pytest.mark.parametrize("change, match", [
    (lambda c: c.DATA_CONFIG.DATA_PROCESSOR[2].__setitem__("VOXEL_SIZE", [0.1, -0.1, 0.2]),
     r"DATA_CONFIG.DATA_PROCESSOR.2.VOXEL_SIZE \(transform_points_to_voxels\): expected three finite positive sizes"),
    (lambda c: c.DATA_CONFIG.DATA_PROCESSOR[2].__setitem__("VOXEL_SIZE", [0.1, float("nan"), 0.2]),
     r"DATA_CONFIG.DATA_PROCESSOR.2.VOXEL_SIZE .*expected three finite positive sizes"),
    (lambda c: c.DATA_CONFIG.__setitem__("POINT_CLOUD_RANGE", [75.2, -75.2, -2, -75.2, 75.2, 4]),
     r"DATA_CONFIG.POINT_CLOUD_RANGE: expected min < max on every axis"),
    (lambda c: c.DATA_CONFIG.__setitem__("POINT_CLOUD_RANGE", [0, 0, 0, 1, 1]),
     r"DATA_CONFIG.POINT_CLOUD_RANGE: expected six finite numbers"),
    (lambda c: c.__setitem__("CLASS_NAMES", []), r"CLASS_NAMES: expected a non-empty list of distinct class names"),
    (lambda c: c.__setitem__("CLASS_NAMES", ["a", "a"]), r"CLASS_NAMES: expected a non-empty list of distinct"),
    (lambda c: c.OPTIMIZATION.__setitem__("LR", float("nan")), r"OPTIMIZATION.LR: expected finite numbers, got nan"),
    (lambda c: c.OPTIMIZATION.__setitem__("LR", float("inf")), r"OPTIMIZATION.LR: expected finite numbers, got inf"),
])
def test_geometry_classes_and_non_finite_values_refused_by_key(voxelnext, change, match):
    with pytest.raises(ConfigError, match=match):
        preflight.check_config(mutate(voxelnext, change))


def test_base_config_cycle_is_one_error_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_CONFIG_: b.yaml\nX: 1\n")
    (tmp_path / "b.yaml").write_text("DATA:\n  _BASE_CONFIG_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"_BASE_CONFIG_: the bases form a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        cfg_from_yaml_file(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("_BASE_CONFIG_: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        cfg_from_yaml_file(tmp_path / "self.yaml")
    (tmp_path / "c.yaml").write_text("DATA:\n  _BASE_CONFIG_: d.yaml\nMODEL:\n  _BASE_CONFIG_: d.yaml\n")
    (tmp_path / "d.yaml").write_text("K: 1\n")  # one base used twice is not a cycle
    assert cfg_from_yaml_file(tmp_path / "c.yaml").MODEL.K == 1


class _Planted:
    """A pickle that runs code when loaded (what a crafted kitti_infos_train.pkl would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_planted_and_truncated_infos_are_refused_before_any_code_runs(tmp_path, voxelnext):
    import pickle

    import numpy as np
    data = mutate(voxelnext, lambda c: None).DATA_CONFIG
    data.DATA_PATH = str(tmp_path)
    infos = [{"point_cloud": {"lidar_idx": "000000", "num_features": 4},
              "annos": {"name": np.array(["excavator"]), "gt_boxes_lidar": np.zeros((1, 7), np.float32),
                        "num_points_in_gt": np.int64(5)}}]
    dbinfos = {"excavator": [{"path": "gt_database/0.bin", "box3d_lidar": np.ones(7, np.float32), "difficulty": 0}]}
    for protocol in (2, 4, 5):
        (tmp_path / "custom_infos_train.pkl").write_bytes(pickle.dumps(infos, protocol=protocol))
        (tmp_path / "custom_dbinfos_train.pkl").write_bytes(pickle.dumps(dbinfos, protocol=protocol))
        preflight.check_dataset_files(data, ("train",))  # what OpenPCDet writes passes
    marker = tmp_path / "code_ran"
    (tmp_path / "custom_dbinfos_train.pkl").write_bytes(pickle.dumps([_Planted(str(marker))]))
    with pytest.raises(ConfigError, match=rf"gt_sampling DB_INFO_PATH: {tmp_path}/custom_dbinfos_train.pkl: it "
                                          r"references pathlib.*touch, which OpenPCDet dataset infos never hold"):
        preflight.check_dataset_files(data, ("train",))
    assert not marker.exists()
    for name in ("os", "posix", "builtins"):  # the usual payloads
        payload = {"os": b"cos\nsystem\n(S'true'\ntR.", "posix": b"cposix\nsystem\n(S'true'\ntR.",
                   "builtins": b"cbuiltins\neval\n(S'1'\ntR."}[name]
        (tmp_path / "custom_infos_train.pkl").write_bytes(payload)
        with pytest.raises(ConfigError, match=rf"DATA_CONFIG.INFO_PATH.train: .*custom_infos_train.pkl: it references "
                                              rf"{name}\.(system|eval)"):
            preflight.check_dataset_files(data, ("train",))
    whole = pickle.dumps(infos)
    (tmp_path / "custom_infos_train.pkl").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match=r"custom_infos_train.pkl: not a complete pickle file \(truncated or corrupt"):
        preflight.check_dataset_files(data, ("train",))


def test_create_data_unlabelled_names_a_missing_or_empty_folder(tmp_path, capsys):
    from pcdet_ext.cli import create_data
    for path, why in ((tmp_path / "absent", "does not exist"), (tmp_path, "holds no .bin / .npy scans")):
        assert create_data.main(["unlabelled", "--data_path", str(path), "--out_dir", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --data_path: {path} {why}" + (" (unlabelled: a folder of .bin / .npy scans)" if "exist" in why else ""))
