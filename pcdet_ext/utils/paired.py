"""Paired differences between two arms run with the same seeds: mean and a t confidence interval."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence


@dataclass
class PairedDifference:
    """``treatment - control`` per pair, their mean and a two-sided t interval (n - 1 degrees of freedom)."""
    diffs: List[float]
    mean: float
    low: float
    high: float
    confidence: float

    def as_dict(self) -> Dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_difference(treatment: Sequence[float], control: Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
    """Differences of paired runs (same seed, same labelled frames). With one pair the interval is
    unbounded (``-inf, inf``): one seed says nothing about the spread."""
    if len(treatment) != len(control) or not treatment:
        raise ValueError(f"paired runs: {len(treatment)} treatment vs {len(control)} control values; "
                         "expected the same non-zero number (one per seed)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence}: expected 0 < confidence < 1")
    diffs = [float(t) - float(c) for t, c in zip(treatment, control)]
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return PairedDifference(diffs, mean, -math.inf, math.inf, confidence)
    from scipy.stats import t
    half = float(t.ppf(0.5 + confidence / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(diffs, mean, mean - half, mean + half, confidence)
