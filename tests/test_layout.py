"""The package layout's import rules (docs/architecture.md): each layer imports only the layers below it.

    algorithms (pure torch)  <-  edge (vehicle side)  <-  openpcdet (glue)  <-  engine (training recipes)
    <-  deploy  <-  cli
    config, utils: pure python, importable by every layer; tools/*.py call one cli main
    edge: numpy, numba, onnxruntime and the bitstream only (it installs where torch cannot)
"""
import ast
import sys
from pathlib import Path

import pytest

from _subproc import run_python

PKG = Path(__file__).resolve().parents[1] / "pcdet_ext"
LAYERS = ["algorithms", "edge", "openpcdet", "engine", "deploy", "cli"]
EDGE_MAY_IMPORT = ("pcdet_ext.edge", "pcdet_ext.algorithms.bitstream", "numpy", "numba", "onnxruntime")
SHARED = ("pcdet_ext.config", "pcdet_ext.utils")


def _imports(path: Path):
    """Every module name ``path`` imports, at module level or inside functions (all absolute here)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the layout rules read absolute ones)"
            yield node.module


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pcdet_ext" and parts[1] in LAYERS else None


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_layers_below(layer):
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for mod in _imports(path):
            target = _layer(mod)
            if target is not None and target not in allowed:
                bad.append(f"{path.relative_to(PKG.parent)} imports {mod}")
            if layer == "algorithms" and mod.split(".")[0] == "pcdet_ext" and target != "algorithms" \
                    and not mod.startswith(SHARED):
                bad.append(f"{path.relative_to(PKG.parent)} imports {mod}")
            if layer == "algorithms" and mod.split(".")[0] == "pcdet":
                bad.append(f"{path.relative_to(PKG.parent)} imports OpenPCDet ({mod})")
            if layer == "edge" and not (mod.split(".")[0] in sys.stdlib_module_names or mod == "__future__"
                                        or mod.startswith(EDGE_MAY_IMPORT)):
                bad.append(f"{path.relative_to(PKG.parent)} imports {mod} (the edge installs without it)")
    assert not bad, "\n".join(bad)


def test_shared_modules_import_no_layer_but_the_locator():
    for path in [PKG / "config.py", *sorted((PKG / "utils").rglob("*.py"))]:
        for mod in _imports(path):
            assert mod.split(".")[0] != "pcdet" and (_layer(mod) is None or mod == "pcdet_ext.openpcdet.locator"), \
                f"{path.name} imports {mod}"


def test_every_algorithm_module_imports_without_openpcdet_being_imported():
    """With OpenPCDet importable (PCDET_ROOT of the session, when set) importing all of algorithms/
    must not import pcdet."""
    modules = sorted("pcdet_ext." + ".".join(p.relative_to(PKG).with_suffix("").parts).replace(".__init__", "")
                     for p in (PKG / "algorithms").rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'pcdet' or m.startswith('pcdet.'))\n"
            "print(len(sys.modules), bad)\n")
    out = run_python(code, {"PCDET_EXT_AUTO_REGISTER": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "[]", out.stdout


def test_tools_are_thin_entries_into_cli():
    """``tools/<name>.py`` imports ``pcdet_ext.cli.<name>.main`` and calls it, after naming its checkout as
    the root of relative paths (pcdet_ext.paths); no library code, no sys.path."""
    tools = sorted(p for p in (PKG.parent / "tools").glob("*.py"))
    assert len(tools) >= 10
    for path in tools:
        tree = ast.parse(path.read_text())
        imports = [m for m in _imports(path) if m not in ("sys", "pathlib")]
        assert imports == [f"pcdet_ext.cli.{path.stem}", "pcdet_ext.paths"], (path.name, imports)
        guard = [n for n in tree.body if isinstance(n, ast.If)]
        assert len(guard) == 1 and [ast.unparse(n) for n in guard[0].body] == [
            "use_checkout(__file__)", "sys.exit(main())"], path.name
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], path.name
        assert (PKG / "cli" / path.name).is_file()


def test_every_tool_runs_as_a_module_and_a_console_script(tmp_path):
    """``python -m pcdet_ext.cli.<tool>`` runs the tool (a module without the ``__main__`` guard would exit 0
    silently) and setup.py installs ``pcdet-ext-<tool>`` for each; both from outside the checkout."""
    import re
    import shutil
    import subprocess
    tools = sorted(p.stem for p in (PKG / "cli").glob("*.py") if p.stem != "__init__")
    for tool in tools:
        source = (PKG / "cli" / f"{tool}.py").read_text()
        tree = ast.parse(source)
        tail = tree.body[-1]
        assert isinstance(tail, ast.If) and "__main__" in ast.unparse(tail.test) and "main()" in ast.unparse(tail), tool
        doc = source.splitlines()[tree.body[0].lineno - 1:tree.body[0].end_lineno]  # the --help text
        assert not [line for line in doc if line.endswith(" \\") and not line.endswith("\\\\")], tool
    setup = (PKG.parent / "setup.py").read_text()
    assert re.search(r'"pcdet-ext-\{tool\.replace\(\'_\', \'-\'\)\}=pcdet_ext\.cli\.\{tool\}:main" for tool in TOOLS', setup)
    runs = [[sys.executable, "-m", "pcdet_ext.cli.make_synthetic_data", "--help"]]
    script = shutil.which("pcdet-ext-make-synthetic-data")  # installed by pip (CI's wheel, an editable install)
    if script:
        runs.append([script, "--help"])
    for cmd in runs:
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stdout.startswith("usage: "), (cmd, res.stderr[-1000:])


def test_copy_cfgs_gives_a_fork_every_config_and_keeps_its_own(tmp_path):
    from pcdet_ext.cli import copy_cfgs
    tools = tmp_path / "tools"
    (tools / "cfgs/kitti_models").mkdir(parents=True)
    (tools / "train.py").write_text("")
    own = tools / "cfgs/kitti_models/pointpillar_rq.yaml"
    own.write_text("# the fork's own\n")
    assert copy_cfgs.main([str(tools)]) == 0
    ours = sorted(p.relative_to(PKG.parent / "cfgs") for p in (PKG.parent / "cfgs").rglob("*.yaml"))
    assert ours and all((tools / "cfgs" / rel).is_file() for rel in ours)
    assert own.read_text() == "# the fork's own\n"  # kept
    assert copy_cfgs.main([str(tools), "--overwrite"]) == 0 and own.read_text() != "# the fork's own\n"
    assert copy_cfgs.main([str(tmp_path)]) == 2  # not a tools/ folder
