"""Runs a stock OpenPCDet ``tools/train.py`` (from the working directory) until its first optimizer step
and prints each parameter group's name and learning rate there: ``GROUP_LRS [[name, lr], ...]``."""
import json
import runpy
import sys

import torch


def _first_step(self, *args, **kwargs):
    print("GROUP_LRS " + json.dumps([[g.get("name", str(i)), g["lr"]] for i, g in enumerate(self.param_groups)]),
          flush=True)
    raise SystemExit(0)


torch.optim.Adam.step = _first_step
sys.path.insert(0, ".")  # as `python train.py` run from tools/ has it
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
