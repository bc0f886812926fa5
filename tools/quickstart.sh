#!/usr/bin/env bash
# Fresh machine -> everything installed -> the main job on a small default, in one command.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
bash tools/setup_env.sh
source .pcdet_env
python tools/demo_split_rq.py "$@"
