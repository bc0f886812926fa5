"""Split inference with the RQ bottleneck: experiment schema, progressive training, evaluation, rates."""
