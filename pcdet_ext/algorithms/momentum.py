"""Teacher momentum schedules (pure python)."""
from __future__ import annotations

import math


def cosine_momentum(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """EMA momentum at ``step`` of ``total_steps``: ``start`` rising to ``end`` along a half cosine
    (BYOL / DINO), so the teacher follows the student early and freezes towards the end."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"momentum schedule: expected 0 <= start <= end <= 1, got start={start}, end={end}")
    if total_steps < 1:
        raise ValueError(f"momentum schedule: total_steps must be >= 1, got {total_steps}")
    t = min(max(step, 0), total_steps) / total_steps
    return end - (end - start) * (math.cos(math.pi * t) + 1.0) / 2.0
