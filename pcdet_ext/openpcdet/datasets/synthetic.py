"""Deterministic synthetic LiDAR scenes for tests and demos (pure numpy).

A spinning multi-beam sensor is ray-cast against a ground plane, labelled objects built
from a few oriented boxes each (so returns fall on the sensor-facing surfaces and objects
occlude one another) and unlabelled clutter (walls, poles, bushes). Range noise, dropout
and range-dependent intensity are added. Boxes are OpenPCDet LiDAR boxes
``[x, y, z, dx, dy, dz, heading]`` with ``z`` at the box centre.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

# A part is a box in object-normalised coordinates: (x0, x1, y0, y1, z0, z1) as fractions
# of (dx, dy, dz) around the box centre (x, y in [-0.5, 0.5], z in [0, 1] from the ground).
Part = Tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class ObjectClass:
    """Size prior (mean, std of dx, dy, dz in metres) and part layout of one class."""
    name: str
    mean_size: Tuple[float, float, float]
    std_size: Tuple[float, float, float]
    parts: Tuple[Part, ...]
    heading_aligned: bool = False  # True: heading near 0 or pi (road traffic)


CLASSES: Dict[str, ObjectClass] = {c.name: c for c in (
    ObjectClass("Car", (3.9, 1.6, 1.56), (0.3, 0.08, 0.08),
                ((-0.5, 0.5, -0.5, 0.5, 0.12, 0.55), (-0.28, 0.22, -0.45, 0.45, 0.55, 1.0)), True),
    ObjectClass("Pedestrian", (0.8, 0.6, 1.73), (0.1, 0.06, 0.1),
                ((-0.2, 0.2, -0.35, -0.05, 0.0, 0.5), (-0.2, 0.2, 0.05, 0.35, 0.0, 0.5),
                 (-0.3, 0.3, -0.5, 0.5, 0.5, 0.85), (-0.2, 0.2, -0.2, 0.2, 0.85, 1.0))),
    ObjectClass("Cyclist", (1.76, 0.6, 1.73), (0.12, 0.06, 0.08),
                ((-0.5, 0.5, -0.15, 0.15, 0.0, 0.45), (-0.2, 0.15, -0.5, 0.5, 0.45, 0.85),
                 (-0.12, 0.12, -0.2, 0.2, 0.85, 1.0)), True),
    # construction-site machines (typical transport dimensions)
    ObjectClass("dumptruck", (9.6, 3.5, 3.8), (0.6, 0.25, 0.25),
                ((-0.5, 0.5, -0.5, 0.5, 0.1, 0.35), (0.25, 0.5, -0.45, 0.45, 0.35, 0.85),
                 (-0.5, 0.2, -0.5, 0.5, 0.35, 1.0))),
    ObjectClass("excavator", (8.8, 3.0, 3.1), (0.8, 0.2, 0.2),
                ((-0.3, 0.2, -0.5, 0.5, 0.0, 0.28), (-0.32, 0.15, -0.42, 0.42, 0.28, 0.62),
                 (-0.1, 0.12, -0.42, -0.05, 0.62, 1.0), (0.15, 0.5, -0.06, 0.06, 0.3, 0.8))),
    ObjectClass("grader", (8.7, 2.5, 3.3), (0.5, 0.15, 0.2),
                ((-0.5, 0.5, -0.2, 0.2, 0.2, 0.45), (-0.5, -0.15, -0.5, 0.5, 0.0, 0.6),
                 (-0.4, -0.15, -0.45, 0.45, 0.6, 1.0), (0.0, 0.08, -0.5, 0.5, 0.0, 0.2),
                 (0.38, 0.5, -0.5, 0.5, 0.0, 0.35))),
    ObjectClass("roller", (5.6, 2.2, 2.9), (0.4, 0.15, 0.15),
                ((0.2, 0.5, -0.5, 0.5, 0.0, 0.55), (-0.5, 0.2, -0.45, 0.45, 0.1, 0.5),
                 (-0.45, -0.05, -0.4, 0.4, 0.5, 1.0))),
)}


@dataclass(frozen=True)
class SensorSpec:
    """A spinning LiDAR: beam elevations (degrees), azimuth steps, mounting height, range."""
    elevation_deg: Tuple[float, float] = (2.0, -24.9)
    num_beams: int = 64
    num_azimuth: int = 1024
    height: float = 1.73
    max_range: float = 80.0
    range_noise: float = 0.02
    dropout: float = 0.05


@dataclass(frozen=True)
class SceneSpec:
    """What one scene holds: classes with (min, max) counts per frame and where they go."""
    class_counts: Dict[str, Tuple[int, int]] = field(default_factory=lambda: {
        "Car": (4, 9), "Pedestrian": (1, 4), "Cyclist": (1, 3)})
    min_range: float = 5.0
    max_range: float = 45.0
    fov_deg: float = 360.0  # objects within +-fov/2 of the +x axis
    num_clutter: int = 25
    sensor: SensorSpec = SensorSpec()


KITTI_SCENE = SceneSpec(fov_deg=70.0)
CONSTRUCTION_SCENE = SceneSpec(
    class_counts={"dumptruck": (1, 3), "excavator": (1, 3), "grader": (1, 2), "roller": (1, 2)},
    min_range=8.0, max_range=60.0, fov_deg=360.0, num_clutter=30,
    sensor=SensorSpec(elevation_deg=(15.0, -25.0), num_beams=64, num_azimuth=1024, height=2.0, max_range=90.0))


@dataclass
class Scene:
    points: np.ndarray          # (N, 4) float32: x, y, z, intensity
    boxes: np.ndarray           # (M, 7) float32 OpenPCDet LiDAR boxes
    names: np.ndarray           # (M,) class names
    visibility: np.ndarray      # (M,) share of the object's rays that reach it unoccluded
    num_points: np.ndarray      # (M,) returns on each object


def _rotation(heading: np.ndarray) -> np.ndarray:
    c, s = np.cos(heading), np.sin(heading)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (..., 2, 2)


def _part_boxes(box: np.ndarray, cls: ObjectClass, ground_z: float, inset: float = 0.95) -> np.ndarray:
    """World boxes (P, 7) of one object's parts, inset in x/y so that surface returns with range
    noise still fall inside the label box (as in hand-labelled data)."""
    x, y, _, dx, dy, dz, heading = box
    dx, dy = dx * inset, dy * inset
    out = []
    rot = _rotation(np.array(heading))
    for x0, x1, y0, y1, z0, z1 in cls.parts:
        cx, cy = rot @ np.array([(x0 + x1) / 2 * dx, (y0 + y1) / 2 * dy])
        out.append([x + cx, y + cy, ground_z + (z0 + z1) / 2 * dz, (x1 - x0) * dx, (y1 - y0) * dy,
                    (z1 - z0) * dz, heading])
    return np.asarray(out, dtype=np.float64)


def _ray_box_hits_dense(dirs: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Entry distance of every ray from the origin into every oriented box; inf when missed. (R, B)."""
    rot_t = np.swapaxes(_rotation(boxes[:, 6]), -1, -2)                      # world -> local
    o_xy = -np.einsum("bij,bj->bi", rot_t, boxes[:, :2])                      # (B, 2)
    d_xy = np.einsum("bij,rj->rbi", rot_t, dirs[:, :2])                       # (R, B, 2)
    origin = np.concatenate([o_xy, -boxes[:, 2:3]], 1)[None]                  # (1, B, 3)
    direction = np.concatenate([d_xy, np.broadcast_to(dirs[:, None, 2:3], d_xy.shape[:2] + (1,))], 2)
    half = boxes[None, :, 3:6] / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / direction
        t1 = (-half - origin) * inv
        t2 = (half - origin) * inv
    t_near = np.nanmax(np.minimum(t1, t2), axis=2)
    t_far = np.nanmin(np.maximum(t1, t2), axis=2)
    hit = (t_near <= t_far) & (t_near > 0)
    return np.where(hit, t_near, np.inf)


def _ray_box_hits(dirs: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """:func:`_ray_box_hits_dense`, evaluated only for the rays whose azimuth lies within each box's
    azimuth sector (boxes around the sensor: every ray); the same values, a fraction of the work."""
    out = np.full((len(dirs), len(boxes)), np.inf)
    ray_az = np.arctan2(dirs[:, 1], dirs[:, 0])
    center_az = np.arctan2(boxes[:, 1], boxes[:, 0])
    reach = np.hypot(boxes[:, 3], boxes[:, 4]) / 2                           # footprint radius
    dist = np.hypot(boxes[:, 0], boxes[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        half_sector = np.where(dist > reach * 1.01, np.arcsin(np.clip(reach / dist, 0, 1)) + 1e-3, np.inf)
    offset = np.abs((ray_az[:, None] - center_az[None] + np.pi) % (2 * np.pi) - np.pi)   # (R, B)
    for b in range(len(boxes)):  # per box (tens to hundreds), each over its own rays
        rays = np.flatnonzero(offset[:, b] <= half_sector[b])
        if len(rays):
            out[rays, b] = _ray_box_hits_dense(dirs[rays], boxes[b:b + 1])[:, 0]
    return out


def _clutter(rng: np.random.Generator, spec: SceneSpec, ground_z: float) -> np.ndarray:
    """Unlabelled boxes: walls at the scene edge, poles and bushes in between."""
    out = []
    for _ in range(spec.num_clutter):
        kind = rng.choice(3, p=[0.25, 0.4, 0.35])
        ang = rng.uniform(-np.pi, np.pi)
        if kind == 0:  # wall / building face
            r = rng.uniform(spec.max_range * 0.8, spec.max_range * 1.3)
            size = (rng.uniform(6, 25), rng.uniform(0.3, 1.0), rng.uniform(2.5, 8.0))
            heading = ang + np.pi / 2 + rng.normal(0, 0.2)
        elif kind == 1:  # pole
            r = rng.uniform(spec.min_range, spec.max_range)
            size = (0.25, 0.25, rng.uniform(3.0, 7.0))
            heading = 0.0
        else:  # bush / pile
            r = rng.uniform(spec.min_range, spec.max_range)
            size = (rng.uniform(0.6, 2.5), rng.uniform(0.6, 2.5), rng.uniform(0.3, 1.2))
            heading = rng.uniform(-np.pi, np.pi)
        out.append([r * np.cos(ang), r * np.sin(ang), ground_z + size[2] / 2, *size, heading])
    return np.asarray(out, dtype=np.float64).reshape(-1, 7)


def _place_objects(rng: np.random.Generator, spec: SceneSpec, ground_z: float
                   ) -> Tuple[np.ndarray, List[str], List[Tuple[str, np.ndarray]]]:
    boxes, names = [], []
    for name, (lo, hi) in spec.class_counts.items():
        if name not in CLASSES:
            raise KeyError(f"unknown synthetic class {name!r}; known: {sorted(CLASSES)}")
        cls = CLASSES[name]
        for _ in range(int(rng.integers(lo, hi + 1))):
            size = np.maximum(rng.normal(cls.mean_size, cls.std_size), 0.3)
            radius = 0.5 * np.hypot(size[0], size[1])
            for _attempt in range(50):
                r = rng.uniform(spec.min_range + radius, spec.max_range)
                half_fov = np.deg2rad(spec.fov_deg) / 2
                ang = rng.uniform(-half_fov, half_fov)
                # keep the whole footprint inside the FOV wedge
                if spec.fov_deg < 360 and abs(ang) + np.arcsin(min(radius / r, 1.0)) > half_fov:
                    continue
                xy = np.array([r * np.cos(ang), r * np.sin(ang)])
                if all(np.hypot(*(xy - b[:2])) > radius + 0.5 * np.hypot(b[3], b[4]) + 0.4 for b in boxes):
                    break
            else:
                continue
            heading = (rng.choice([0.0, np.pi]) + rng.normal(0, 0.15)) if cls.heading_aligned \
                else rng.uniform(-np.pi, np.pi)
            heading = (heading + np.pi) % (2 * np.pi) - np.pi
            boxes.append(np.array([xy[0], xy[1], ground_z + size[2] / 2, *size, heading]))
            names.append(name)
    parts = [(n, _part_boxes(b, CLASSES[n], ground_z)) for b, n in zip(boxes, names)]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 7), names, parts


def ray_directions(sensor: SensorSpec) -> np.ndarray:
    """(num_beams * num_azimuth, 3) unit ray directions of one sweep."""
    elev = np.deg2rad(np.linspace(sensor.elevation_deg[0], sensor.elevation_deg[1], sensor.num_beams))
    azim = np.linspace(-np.pi, np.pi, sensor.num_azimuth, endpoint=False)
    e, a = np.meshgrid(elev, azim, indexing="ij")
    return np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)


def generate_scene(seed: int, spec: SceneSpec = KITTI_SCENE, chunk: int = 16384) -> Scene:
    """Ray-cast one scene; the same ``seed`` and ``spec`` always give the same scene."""
    rng = np.random.default_rng(seed)
    sensor = spec.sensor
    ground_z = -sensor.height
    boxes, names, parts = _place_objects(rng, spec, ground_z)
    clutter = _clutter(rng, spec, ground_z)
    part_boxes = np.concatenate([p for _, p in parts] + [clutter], 0)
    owner = np.concatenate([np.full(len(p), i) for i, (_, p) in enumerate(parts)] +
                           [np.full(len(clutter), -1)]).astype(np.int64)
    dirs = ray_directions(sensor)
    num_obj = len(boxes)
    reached = np.zeros(num_obj, dtype=np.int64)     # rays whose first hit is the object
    crossing = np.zeros(num_obj, dtype=np.int64)    # rays that would hit it if alone
    pts, ids = [], []
    for start in range(0, len(dirs), chunk):
        d = dirs[start:start + chunk]
        with np.errstate(divide="ignore"):
            t_ground = np.where(d[:, 2] < -1e-6, ground_z / d[:, 2], np.inf)
        t_parts = _ray_box_hits(d, part_boxes) if len(part_boxes) else np.full((len(d), 0), np.inf)
        best = np.argmin(t_parts, axis=1) if t_parts.shape[1] else np.zeros(len(d), dtype=np.int64)
        t_best = t_parts[np.arange(len(d)), best] if t_parts.shape[1] else np.full(len(d), np.inf)
        hit_id = np.where(t_best < t_ground, owner[best] if len(owner) else -1, -2)  # -2: ground
        t = np.minimum(t_best, t_ground)
        if num_obj:
            obj_t = np.full((len(d), num_obj), np.inf)
            obj_mask = owner >= 0
            np.minimum.at(obj_t.T, owner[obj_mask], t_parts[:, obj_mask].T)
            crossing += np.isfinite(obj_t).sum(0)
            reached += np.bincount(hit_id[hit_id >= 0], minlength=num_obj)
        keep = np.isfinite(t) & (t < sensor.max_range) & (rng.random(len(d)) > sensor.dropout)
        t_noisy = t[keep] + rng.normal(0, sensor.range_noise, keep.sum())
        pts.append(d[keep] * t_noisy[:, None])
        ids.append(hit_id[keep])
    xyz = np.concatenate(pts, 0)
    hit = np.concatenate(ids, 0)
    rng_m = np.linalg.norm(xyz, axis=1)
    reflect = np.where(hit >= 0, rng.uniform(0.25, 0.7, len(hit)),
                       np.where(hit == -1, rng.uniform(0.05, 0.5, len(hit)), rng.uniform(0.0, 0.25, len(hit))))
    intensity = np.clip(reflect * np.exp(-rng_m / 120.0), 0, 1)
    points = np.concatenate([xyz, intensity[:, None]], 1).astype(np.float32)
    num_points = np.bincount(hit[hit >= 0], minlength=num_obj) if num_obj else np.zeros(0, np.int64)
    visibility = reached / np.maximum(crossing, 1)
    return Scene(points=points, boxes=boxes.astype(np.float32), names=np.asarray(names),
                 visibility=visibility.astype(np.float32), num_points=num_points)


def class_counts_for(class_names: Sequence[str], lo: int = 1, hi: int = 3) -> Dict[str, Tuple[int, int]]:
    """Per-class (min, max) counts for a custom class list; unknown names are an error."""
    unknown = [c for c in class_names if c not in CLASSES]
    if unknown:
        raise KeyError(f"no synthetic shape for classes {unknown}; known: {sorted(CLASSES)}")
    return {c: (lo, hi) for c in class_names}
