"""Detectors, registered into ``pcdet.models.detectors`` under these names (OpenPCDet style: the
registry dict lives next to the classes; import needs OpenPCDet)."""
from pcdet_ext.openpcdet.models.detectors.pointpillar_rq import PointPillarRQ
from pcdet_ext.openpcdet.models.detectors.rmae_cmae_detector_phase1 import RMAECMAEDetectorPhase1
from pcdet_ext.openpcdet.models.detectors.rmae_cmae_detector_phase2 import RMAECMAEDetectorPhase2

__all__ = {"PointPillarRQ": PointPillarRQ, "RMAECMAEDetectorPhase1": RMAECMAEDetectorPhase1,
           "RMAECMAEDetectorPhase2": RMAECMAEDetectorPhase2}
