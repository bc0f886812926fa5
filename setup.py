"""pcdet_ext: OpenPCDet plugins (RQ split inference, R-MAE/CMAE pretraining).

torch is required without a version pin so pip never replaces an installed (CPU or CUDA)
torch; install torch first. spconv comes through extras: ``pip install pcdet_ext[cpu]``
(CPU package ``spconv``) or ``[cu120]`` (``spconv-cu120``), ``[cu118]``, ``[cu121]``...
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SPCONV_FLAVOURS = {"cpu": "spconv", "cu113": "spconv-cu113", "cu114": "spconv-cu114",
                   "cu116": "spconv-cu116", "cu117": "spconv-cu117", "cu118": "spconv-cu118",
                   "cu120": "spconv-cu120", "cu121": "spconv-cu121", "cu124": "spconv-cu124",
                   "cu126": "spconv-cu126"}

# What OpenPCDet master imports at `import pcdet.models` and that installs on CPU.
# kornia < 0.7: newer releases break the torch.jit.script in OpenPCDet's argo2 so3 utilities.
OPENPCDET_RUNTIME = ["opencv-python-headless", "scikit-image", "scipy", "SharedArray", "pyquaternion",
                     "kornia<0.7", "av2", "pillow", "llvmlite"]

TOOLS = sorted(p.stem for p in (Path(__file__).resolve().parent / "pcdet_ext" / "cli").glob("*.py") if p.stem != "__init__")

extras = {flavour: [pkg] for flavour, pkg in SPCONV_FLAVOURS.items()}
extras["openpcdet"] = OPENPCDET_RUNTIME
extras["export"] = ["onnx>=1.14", "onnxruntime>=1.16"]  # tools/export_edge.py, the lean edge on this machine
extras["study"] = ["DracoPy>=2"]  # benchmarks/rate_accuracy_study.py: the raw point cloud coded with Draco
extras["test"] = ["pytest>=7", "pytest-xdist>=3.6", "hypothesis>=6", *extras["export"], *extras["study"]]  # spconv: the flavour extra



class BuildPyWithConfigs(build_py):
    """Ship ``cfgs/`` inside the package (``pcdet_ext/_data/cfgs``) so a (non-editable) wheel resolves
    ``cfgs/...`` config paths too; an editable install reads them from the checkout."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = Path(__file__).resolve().parent / "cfgs"
        for path in src.rglob("*.yaml"):
            out = Path(self.build_lib) / "pcdet_ext" / "_data" / "cfgs" / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)


setup(
    name="pcdet_ext",
    version="0.2.0",
    description="OpenPCDet plugins: RQ split inference for PointPillars, R-MAE/CMAE pretraining",
    packages=find_packages(include=["pcdet_ext", "pcdet_ext.*"]),
    python_requires=">=3.8",
    install_requires=["numpy", "torch", "easydict", "pyyaml", "tensorboardX", "numba>=0.59", "tqdm", "matplotlib"],
    extras_require=extras,
    include_package_data=True,
    cmdclass={"build_py": BuildPyWithConfigs},
    # every tool from an installed wheel, without a checkout: pcdet-ext-<tool> (also python -m pcdet_ext.cli.<tool>)
    entry_points={"console_scripts": [f"pcdet-ext-{tool.replace('_', '-')}=pcdet_ext.cli.{tool}:main" for tool in TOOLS]
                  + ["pcdet-ext-edge=pcdet_ext.edge.__main__:main"]},  # as the edge's own wheel (edge/setup.py)
)
