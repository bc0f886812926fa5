"""R-MAE + CMAE Phase 2 detector: Phase 1's detector with the Phase 2 backbone's losses."""
from __future__ import annotations

from pcdet_ext.openpcdet.models.detectors.rmae_cmae_detector_phase1 import RMAECMAEDetectorPhase1


class RMAECMAEDetectorPhase2(RMAECMAEDetectorPhase1):
    """``MODEL.BACKBONE_3D`` an ``RMAECMAEBackbonePhase2``. Pretraining: VFE -> backbone, the backbone's
    balanced loss (occupancy, MLFR, voxel / frame contrast; every term and weight in ``tb_dict``), the
    teacher, its heads and the frame queue kept out of DDP's broadcast. Detection: as Phase 1."""

    def set_total_steps(self, total_steps: int) -> None:
        """Training length (optimizer steps) for the backbone's teacher momentum schedule."""
        if self.pretraining:
            self.backbone_3d.set_total_steps(total_steps)
