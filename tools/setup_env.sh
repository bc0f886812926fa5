#!/usr/bin/env bash
# One-time set-up of pcdet_ext in the current Python (run it inside your venv/conda env):
#   1. torch: kept if installed; otherwise torch==${PCDET_EXT_TORCH:-2.13.0} from the package index.
#   2. pcdet_ext (editable) with its test tools, OpenPCDet's runtime imports and the spconv build
#      matching the torch CUDA version (spconv on CPU, spconv-cu120 for CUDA 12.x, ...).
#   3. OpenPCDet: $PCDET_ROOT when set (your fork); else third_party/OpenPCDet, cloned at the
#      pinned commit when the network allows. On a CUDA machine its ops are built the usual way
#      (python setup.py develop); on a CPU machine nothing is built (pcdet_ext's CPU runtime).
# Writes .pcdet_env (export PCDET_ROOT=...) for `source`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
PY=${PYTHON:-python}
PINNED_COMMIT=8cacccec11db6f59bf6934600c9a175dae254806   # OpenPCDet master 2024-04 (reports 0.6.0)
OPENPCDET_URL=${OPENPCDET_URL:-https://github.com/open-mmlab/OpenPCDet.git}

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==${PCDET_EXT_TORCH:-2.13.0}"
    "$PY" -m pip install "torch==${PCDET_EXT_TORCH:-2.13.0}"
fi
flavour=$("$PY" - <<'PYEOF'
import torch
cuda = torch.version.cuda if torch.cuda.is_available() else None
if not cuda:
    print("cpu")
else:
    major, minor = (int(x) for x in cuda.split(".")[:2])
    print("cu120" if major >= 12 else f"cu11{minor}")
PYEOF
)
echo "[setup] torch $("$PY" -c 'import torch; print(torch.__version__)'), spconv flavour: $flavour"
"$PY" -m pip install -e ".[test,openpcdet,$flavour]"

if [ -n "${PCDET_ROOT:-}" ]; then
    root=$(cd "$PCDET_ROOT" && pwd)
elif [ -d third_party/OpenPCDet/pcdet ]; then
    root="$here/third_party/OpenPCDet"
else
    mkdir -p third_party
    echo "[setup] cloning OpenPCDet $PINNED_COMMIT into third_party/OpenPCDet"
    if timeout 300 git clone --quiet "$OPENPCDET_URL" third_party/OpenPCDet \
        && git -C third_party/OpenPCDet checkout --quiet "$PINNED_COMMIT"; then
        root="$here/third_party/OpenPCDet"
    else
        rm -rf third_party/OpenPCDet
        echo "[setup] could not clone $OPENPCDET_URL (no network to GitHub?)." >&2
        echo "        Set PCDET_ROOT to an OpenPCDet checkout (your fork, or upstream at $PINNED_COMMIT) and re-run." >&2
        echo "        pcdet_ext's pure-torch parts are installed; the OpenPCDet tier of the tests will skip." >&2
        exit 3
    fi
fi
[ -f "$root/pcdet/__init__.py" ] || { echo "[setup] $root is not an OpenPCDet checkout (no pcdet/__init__.py)" >&2; exit 2; }
if [ "$flavour" != "cpu" ]; then
    echo "[setup] building OpenPCDet's CUDA ops in $root"
    (cd "$root" && "$PY" setup.py develop)
else
    echo "[setup] CPU machine: OpenPCDet's CUDA ops are not built; pcdet_ext's CPU runtime stands in"
fi
echo "export PCDET_ROOT=$root" > .pcdet_env
PCDET_ROOT="$root" "$PY" -c "import pcdet_ext, pcdet; print('[setup] OpenPCDet', pcdet.__version__, 'at', '$root', '- ok')"
echo "[setup] done. Run: source .pcdet_env"
