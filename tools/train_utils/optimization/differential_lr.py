"""Drop-in for a fork's ``tools/train_utils/optimization/differential_lr.py``: copy this file (or
put this repo's ``tools/`` on ``sys.path``) and call ``create_optimizer_with_differential_lr(model,
cfg.OPTIMIZATION)`` where OpenPCDet calls ``build_optimizer``; build the schedule with
``build_scheduler`` from here as well."""
from pcdet_ext.engine.optimization import (build_optimizer, build_scheduler,  # noqa: F401
                                    create_optimizer_with_differential_lr, group_lrs)
