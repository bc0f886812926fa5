"""OpenPCDet-style YAML loading with _BASE_CONFIG_ and --set overrides."""
import pytest
from easydict import EasyDict

from pcdet_ext.config import ConfigError, Opt, cfg_from_list, cfg_from_yaml_file, find_config, from_cfg


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_nested_bases_resolved_relative_to_including_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "cfgs/base/root.yaml", "A: 1\nB: {C: 2, D: [1, 2]}\n")
    write(tmp_path / "cfgs/base/mid.yaml", "_BASE_CONFIG_: root.yaml\nA: 5\n")
    top = write(tmp_path / "cfgs/exp/top.yaml", "DATA:\n  _BASE_CONFIG_: ../base/mid.yaml\n  B: {C: 7}\nX: 3\n")
    cfg = cfg_from_yaml_file(top)
    assert isinstance(cfg, EasyDict)
    assert cfg.DATA.A == 5 and cfg.DATA.B.C == 7 and cfg.DATA.B.D == [1, 2] and cfg.X == 3


def test_base_falls_back_to_pcdet_root_tools(tmp_path, monkeypatch):
    write(tmp_path / "pcdet/tools/cfgs/dataset_configs/x.yaml", "K: 1\n")
    for f in ("pcdet/__init__.py", "pcdet/models/detectors/__init__.py", "pcdet/datasets/__init__.py"):
        write(tmp_path / "pcdet" / f, "")  # the files that make PCDET_ROOT a checkout
    monkeypatch.setenv("PCDET_ROOT", str(tmp_path / "pcdet"))
    monkeypatch.chdir(tmp_path)
    assert find_config("cfgs/dataset_configs/x.yaml", tmp_path / "elsewhere").name == "x.yaml"


def test_missing_base_lists_what_was_tried(tmp_path, monkeypatch):
    top = write(tmp_path / "top.yaml", "_BASE_CONFIG_: nowhere.yaml\n")
    monkeypatch.chdir(tmp_path)  # the including folder is the working directory too: listed once
    with pytest.raises(FileNotFoundError, match="nowhere.yaml.*tried") as err:
        cfg_from_yaml_file(top)
    tried = str(err.value).split("tried: ", 1)[1].split(", ")
    assert len(tried) == len(set(tried)) and str(tmp_path / "nowhere.yaml") in tried


def test_set_overrides_and_errors():
    cfg = EasyDict({"OPT": {"LR": 0.1, "EPOCHS": 3, "FLAG": True, "R": [0.0, 1.0]}})
    cfg_from_list(["OPT.LR", "0.5", "OPT.EPOCHS", "7", "OPT.R", "[1, 2]", "OPT.FLAG", "False"], cfg)
    assert cfg.OPT.LR == 0.5 and cfg.OPT.EPOCHS == 7 and cfg.OPT.R == [1, 2] and cfg.OPT.FLAG is False
    cfg_from_list(["OPT.LR", "1"], cfg)
    assert cfg.OPT.LR == 1.0 and isinstance(cfg.OPT.LR, float)
    with pytest.raises(ConfigError, match="OPT.NOPE"):
        cfg_from_list(["OPT.NOPE", "1"], cfg)
    with pytest.raises(ConfigError, match="OPT.EPOCHS: expected int"):
        cfg_from_list(["OPT.EPOCHS", "abc"], cfg)
    with pytest.raises(ConfigError, match="odd number"):
        cfg_from_list(["OPT.LR"], cfg)


def test_set_reaches_list_items_by_index():
    cfg = EasyDict({"DATA": {"PROC": [EasyDict({"NAME": "a"}), EasyDict({"NAME": "vox", "SIZE": [0.16, 0.16, 4.0]})]}})
    cfg_from_list(["DATA.PROC.1.SIZE", "[0.2, 0.2, 4]"], cfg)
    assert cfg.DATA.PROC[1].SIZE == [0.2, 0.2, 4]
    with pytest.raises(ConfigError, match="DATA.PROC.5"):
        cfg_from_list(["DATA.PROC.5.SIZE", "[1]"], cfg)


def test_from_cfg_refuses_unknown_keys_and_checks_values():
    spec = {"RATIO": Opt(0.5, (float,), lo=0.0, hi=1.0, hi_open=True), "MODE": Opt("a", (str,), choices=("a", "b")),
            "N": Opt(required=True, types=(int,), lo=1)}
    out = from_cfg({"RATIO": 0, "MODE": "B", "N": 3, "OWNED": [1]}, spec, "SEC", passthrough=("OWNED",))
    assert out == {"RATIO": 0.0, "MODE": "b", "N": 3, "OWNED": [1]} and isinstance(out.RATIO, float)
    assert from_cfg({"N": 1}, spec, "SEC").RATIO == 0.5
    with pytest.raises(ConfigError, match=r"SEC: unknown key\(s\) 'RATO' \(did you mean 'RATIO'\?\); "
                                          r"known keys: \['MODE', 'N', 'RATIO'\]"):
        from_cfg({"RATO": 0.1, "N": 1}, spec, "SEC")
    for bad, match in (({"N": 1, "RATIO": 1.0}, r"SEC.RATIO: expected a value in \[0.0, 1.0\), got 1.0"),
                       ({"N": True}, r"SEC.N: expected int, got True"),
                       ({"N": 0}, r"SEC.N: expected a value in \[1, inf\)"),
                       ({"N": 1, "MODE": "c"}, r"SEC.MODE: expected one of \['a', 'b'\]"),
                       ({}, r"SEC.N: required"), ([1], r"SEC: expected a mapping")):
        with pytest.raises(ConfigError, match=match):
            from_cfg(bad, spec, "SEC")


def test_non_finite_numbers_are_refused_naming_the_key():
    spec = {"LR": Opt(0.1, (float,), lo=0.0, lo_open=True), "MOMS": Opt([0.9], (list,)),
            "ANY": Opt(None, ()), "MAP": Opt(None, (dict, type(None)))}
    for bad, key in (({"LR": float("nan")}, "SEC.LR"), ({"LR": float("inf")}, "SEC.LR"),
                     ({"MOMS": [0.9, float("nan")]}, "SEC.MOMS"), ({"ANY": -float("inf")}, "SEC.ANY"),
                     ({"MAP": {"A": [float("nan")]}}, "SEC.MAP")):
        with pytest.raises(ConfigError, match=rf"^{key}: expected finite numbers"):
            from_cfg(bad, spec, "SEC")
    assert from_cfg({"LR": 1e300, "MOMS": [0.95, 0.85]}, spec, "SEC").LR == 1e300


def test_set_takes_pairs_up_to_the_next_flag():
    import argparse
    from pcdet_ext.engine.startup.args import add_train_args
    parser = add_train_args(argparse.ArgumentParser())
    args = parser.parse_args(["--cfg_file", "x.yaml", "--set", "A.B", "-1", "C", "[-2.5, 3]", "--epochs", "3"])
    assert args.set_cfgs == ["A.B", "-1", "C", "[-2.5, 3]"] and args.epochs == 3  # --epochs is a flag again
    assert parser.parse_args(["--cfg_file", "x.yaml"]).set_cfgs is None
