"""Detectors registered into ``pcdet.models.detectors`` (import needs OpenPCDet)."""
