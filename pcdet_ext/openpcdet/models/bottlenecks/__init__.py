from pcdet_ext.openpcdet.models.bottlenecks.rq_bottleneck import RQBottleneck, parse_rq_config

__all__ = ["RQBottleneck", "parse_rq_config"]
