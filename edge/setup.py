"""pcdet_ext_edge: the vehicle side of pcdet_ext's split inference alone (``pcdet_ext.edge`` and the
bitstream coder), installable on an ARM64 device with wheels only:

    pip wheel --no-deps -w dist ./edge        # on the development machine: dist/pcdet_ext_edge-*.whl
    pip install pcdet_ext_edge-*.whl          # on the device: pulls requirements-edge.txt, nothing more

It ships the same sources as pcdet_ext (install one or the other in an environment, not both).
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pcdet_ext": ["__init__"], "pcdet_ext.edge": None, "pcdet_ext.algorithms": ["__init__"],
            "pcdet_ext.algorithms.bitstream": ["__init__", "codec", "contexts", "models", "occupancy", "rans"]}


def requirements():
    lines = (ROOT / "requirements-edge.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def version():
    for line in (ROOT / "pcdet_ext/__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split('"')[1]
    raise RuntimeError("pcdet_ext/__init__.py has no __version__")


class EdgeModules(build_py):
    """Of each package only the edge's modules (None: all); the sources are the repository's."""

    def find_package_modules(self, package, package_dir):
        keep = PACKAGES[package]
        return [m for m in super().find_package_modules(package, package_dir) if keep is None or m[1] in keep]


setup(
    name="pcdet_ext_edge",
    version=version(),
    description="The vehicle side of pcdet_ext split inference: numpy + numba + onnxruntime, no torch",
    python_requires=">=3.9",
    install_requires=requirements(),
    packages=list(PACKAGES),
    package_dir={name: "../" + name.replace(".", "/") for name in PACKAGES},
    cmdclass={"build_py": EdgeModules},
    entry_points={"console_scripts": ["pcdet-ext-edge=pcdet_ext.edge.__main__:main"]},
)
