"""import pcdet_ext with and without OpenPCDet; PCDET_ROOT validation."""
from _subproc import run_python


def test_import_without_openpcdet_keeps_pure_torch_parts():
    code = ("import sys, pcdet_ext\n"
            "from pcdet_ext.algorithms import rotated_boxes\n"
            "assert 'pcdet' not in sys.modules\n"
            "try:\n    pcdet_ext.register()\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = run_python(code, {"PCDET_ROOT": "", "PYTHONPATH": None})
    assert out.returncode == 0, out.stderr
    if "ERR" in out.stdout:  # no installed OpenPCDet on this machine
        assert "needs OpenPCDet" in out.stdout and "PCDET_ROOT" in out.stdout


def test_pcdet_root_not_openpcdet_is_a_clear_error(tmp_path):
    (tmp_path / "pcdet").mkdir()
    code = ("import pcdet_ext\n"
            "try:\n    pcdet_ext.import_pcdet()\nexcept ImportError as e:\n    print(type(e).__name__, e)\n")
    out = run_python(code, {"PCDET_ROOT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "OpenPCDetNotFoundError" in out.stdout
    assert f"PCDET_ROOT={tmp_path} is not an OpenPCDet checkout" in out.stdout
    assert "pcdet/__init__.py" in out.stdout
    assert not any(p.name != "pcdet" for p in tmp_path.iterdir())  # nothing written into it


def test_bad_pcdet_root_warns_at_import(tmp_path):
    out = run_python("import warnings; warnings.simplefilter('always'); import pcdet_ext; print('imported')",
                     {"PCDET_ROOT": str(tmp_path / "missing")})
    assert out.returncode == 0 and "imported" in out.stdout
    assert "OpenPCDet not registered" in out.stderr and "is not an OpenPCDet checkout" in out.stderr
