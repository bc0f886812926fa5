"""Deployment of a trained PointPillarRQ: the edge / server runtimes, the TCP transport and the
rate/accuracy sweep over operating points."""
