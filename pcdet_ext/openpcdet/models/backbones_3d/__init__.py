"""3D backbones, registered into ``pcdet.models.backbones_3d`` under these names (OpenPCDet style: the
registry dict lives next to the classes; import needs OpenPCDet)."""
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase1 import RMAECMAEBackbonePhase1
from pcdet_ext.openpcdet.models.backbones_3d.rmae_cmae_backbone_phase2 import RMAECMAEBackbonePhase2

__all__ = {"RMAECMAEBackbonePhase1": RMAECMAEBackbonePhase1, "RMAECMAEBackbonePhase2": RMAECMAEBackbonePhase2}
