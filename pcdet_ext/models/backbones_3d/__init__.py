"""3D backbones registered into ``pcdet.models.backbones_3d`` (encoder lookup needs OpenPCDet)."""
