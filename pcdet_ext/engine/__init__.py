"""Training/evaluation drivers around OpenPCDet's dataloaders, networks and evaluation."""
