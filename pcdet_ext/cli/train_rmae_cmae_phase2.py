"""R-MAE + CMAE Phase 2 pretraining (MLFR, voxel / frame contrast, momentum schedule, loss
balancing) of a sparse-voxel backbone; the Phase 1 tool's flags and output layout.

    python tools/train_rmae_cmae_phase2.py \\
        --cfg_file cfgs/custom_models/rmae_cmae_isarc_4class_pretraining_phase2.yaml \\
        --batch_size 8 --epochs 30 --extra_tag rmae_cmae_pretraining_phase2
    torchrun --nproc_per_node 4 tools/train_rmae_cmae_phase2.py --launcher pytorch --cfg_file ...

Checkpoints: output/<cfg group>/<cfg stem>/<extra_tag>/ckpt/checkpoint_epoch_N.pth, the
--pretrained_model of the fine-tune run (cfgs/custom_models/*_finetune_phase2.yaml). Re-running
the command resumes; a checkpoint of another config (e.g. a Phase 1 run) is refused with the
differing keys. A Phase 1 checkpoint as --pretrained_model initialises the encoder, occupancy
decoder and teacher; the coverage table shows the Phase 2 modules starting fresh.
"""
import sys

from pcdet_ext.algorithms.contrastive import check_queue_size
from pcdet_ext.cli.train_rmae_cmae_phase1 import pretrain
from pcdet_ext.config import ConfigError
from pcdet_ext.engine.checkpointing import unwrap
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase2 import PHASE2_ADDED_MODULES

DETECTOR = "RMAECMAEDetectorPhase2"


def setup(run) -> None:
    """Momentum schedule length from the loader and epochs; the queue holds whole global batches."""
    detector = unwrap(run.model)
    backbone = detector.backbone_3d
    steps = len(run.train_loader)
    if run.args.max_iters_per_epoch:
        steps = min(steps, run.args.max_iters_per_epoch)
    detector.set_total_steps(max(1, steps * run.total_epochs))
    if getattr(backbone, "use_frame", False):
        batch = run.train_loader.batch_size * run.info.world_size
        try:
            check_queue_size(backbone.frame_queue.size, batch)
        except ValueError as exc:
            raise ConfigError(f"MODEL.BACKBONE_3D.{exc}") from exc
    run.logger.info("teacher momentum: %s from %.4f over %d steps", backbone.phase2.MOMENTUM.NAME,
                    backbone.momentum_start, backbone.total_steps)


def main(argv=None) -> int:
    return pretrain(argv, DETECTOR, __doc__, setup=setup,
                    new_modules=[f"backbone_3d.{m}" for m in PHASE2_ADDED_MODULES])


if __name__ == "__main__":  # python -m pcdet_ext.cli.train_rmae_cmae_phase2
    sys.exit(main())
