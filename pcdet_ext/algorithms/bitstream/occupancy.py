"""Context-modelled quadtree coding of the BEV occupancy map (numpy; coded by :mod:`.rans`).

The map is padded to a multiple of ``2**levels`` and reduced to a pyramid (a parent cell is
occupied when any of its 2 x 2 children is). The top level is coded cell by cell; every occupied
parent then codes the pattern of its 4 children as one of 15 symbols. The context of a symbol is
(level, how many of the parent's 8 neighbours are occupied, the parent's range from the sensor),
all known to the decoder from the level above, so each level decodes in one vectorised call.
Occupancy from a spinning LiDAR is clustered (objects, ground rings) and thins out with range:
both are what the contexts capture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

NEIGHBOUR_BUCKETS = np.array([0, 1, 2, 3, 3, 4, 4, 4, 4])  # 0..8 occupied neighbours -> 5 buckets
NUM_NB = 5
RANGE_EDGES_M = (10.0, 20.0, 40.0)                          # -> 4 range buckets
NUM_RANGE = len(RANGE_EDGES_M) + 1
PATTERNS = 15                                               # non-empty 2 x 2 child patterns


@dataclass(frozen=True)
class GridGeometry:
    """Grid shape, where the sensor sits (in cells, fractional) and the cell size in metres."""
    height: int
    width: int
    sensor_row: float
    sensor_col: float
    cell_m: float
    levels: int = 4

    @property
    def padded(self) -> Tuple[int, int]:
        m = 2 ** self.levels
        return -(-self.height // m) * m, -(-self.width // m) * m


def pyramid(occ: np.ndarray, geo: GridGeometry) -> List[np.ndarray]:
    """[level 0 (padded cells), ..., level ``levels``] boolean maps."""
    ph, pw = geo.padded
    base = np.zeros((ph, pw), dtype=bool)
    base[: occ.shape[0], : occ.shape[1]] = occ
    out = [base]
    for _ in range(geo.levels):
        b = out[-1]
        out.append(b[0::2, 0::2] | b[0::2, 1::2] | b[1::2, 0::2] | b[1::2, 1::2])
    return out


def neighbour_count(occ: np.ndarray) -> np.ndarray:
    pad = np.pad(occ.astype(np.int8), 1)
    total = sum(pad[1 + dy: 1 + dy + occ.shape[0], 1 + dx: 1 + dx + occ.shape[1]]
                for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    return total


def range_bucket(rows: np.ndarray, cols: np.ndarray, level: int, geo: GridGeometry) -> np.ndarray:
    """Range bucket of cells (row, col) of ``level`` (cell centres, metres from the sensor)."""
    scale = 2 ** level
    dy = (rows + 0.5) * scale - geo.sensor_row
    dx = (cols + 0.5) * scale - geo.sensor_col
    return np.searchsorted(np.asarray(RANGE_EDGES_M), np.hypot(dy, dx) * geo.cell_m)


def top_contexts(geo: GridGeometry, shape) -> np.ndarray:
    rows, cols = np.indices(shape)
    return range_bucket(rows.ravel(), cols.ravel(), geo.levels, geo)


def child_contexts(parent_occ: np.ndarray, level: int, geo: GridGeometry) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For children at ``level`` of the occupied parents (at ``level + 1``): parent rows, cols and
    context ids (raster order of the parents)."""
    rows, cols = np.nonzero(parent_occ)
    nb = NEIGHBOUR_BUCKETS[neighbour_count(parent_occ)[rows, cols]]
    rb = range_bucket(rows, cols, level + 1, geo)
    return rows, cols, (level * NUM_NB + nb) * NUM_RANGE + rb


def child_patterns(child_occ: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The 4-bit pattern (1..15) of each parent's children -> symbol 0..14."""
    r, c = rows * 2, cols * 2
    bits = (child_occ[r, c].astype(np.int64) | (child_occ[r, c + 1].astype(np.int64) << 1)
            | (child_occ[r + 1, c].astype(np.int64) << 2) | (child_occ[r + 1, c + 1].astype(np.int64) << 3))
    return bits - 1


def place_children(child_occ: np.ndarray, rows: np.ndarray, cols: np.ndarray, symbols: np.ndarray) -> None:
    bits = symbols.astype(np.int64) + 1
    r, c = rows * 2, cols * 2
    child_occ[r, c] = bits & 1
    child_occ[r, c + 1] = (bits >> 1) & 1
    child_occ[r + 1, c] = (bits >> 2) & 1
    child_occ[r + 1, c + 1] = (bits >> 3) & 1


def num_child_contexts(levels: int) -> int:
    return levels * NUM_NB * NUM_RANGE


def count(occ: np.ndarray, geo: GridGeometry) -> Tuple[np.ndarray, np.ndarray]:
    """Symbol counts of one map: top [NUM_RANGE, 2] and children [contexts, 15] (for fitting)."""
    pyr = pyramid(occ, geo)
    top = np.zeros((NUM_RANGE, 2), dtype=np.int64)
    np.add.at(top, (top_contexts(geo, pyr[-1].shape), pyr[-1].ravel().astype(np.int64)), 1)
    child = np.zeros((num_child_contexts(geo.levels), PATTERNS), dtype=np.int64)
    for level in range(geo.levels):
        rows, cols, ctx = child_contexts(pyr[level + 1], level, geo)
        np.add.at(child, (ctx, child_patterns(pyr[level], rows, cols)), 1)
    return top, child
