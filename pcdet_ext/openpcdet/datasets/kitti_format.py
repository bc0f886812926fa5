"""KITTI object-format calibration and labels for synthetic scenes (pure numpy)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

IMAGE_SHAPE = (375, 1242)  # rows, cols


@dataclass(frozen=True)
class Calibration:
    """A KITTI-like rig: camera 0.27 m ahead of the LiDAR, 0.08 m below, axes permuted."""
    focal: float = 720.0
    cu: float = 610.0
    cv: float = 175.0

    @property
    def P2(self) -> np.ndarray:
        return np.array([[self.focal, 0, self.cu, 44.0], [0, self.focal, self.cv, 0.2], [0, 0, 1, 0.003]])

    @property
    def R0(self) -> np.ndarray:
        return np.eye(3)

    @property
    def Tr_velo_to_cam(self) -> np.ndarray:
        return np.array([[0, -1, 0, 0.0], [0, 0, -1, -0.08], [1, 0, 0, -0.27]], dtype=np.float64)

    def lidar_to_rect(self, xyz: np.ndarray) -> np.ndarray:
        hom = np.concatenate([xyz, np.ones((len(xyz), 1))], 1)
        return (hom @ self.Tr_velo_to_cam.T) @ self.R0.T

    def rect_to_image(self, xyz: np.ndarray) -> np.ndarray:
        hom = np.concatenate([xyz, np.ones((len(xyz), 1))], 1) @ self.P2.T
        return hom[:, :2] / hom[:, 2:3]

    def road_plane_text(self, sensor_height: float) -> str:
        """KITTI ``planes/`` file of the flat ground ``sensor_height`` below the LiDAR (camera frame)."""
        ground = self.lidar_to_rect(np.array([[10.0, 0.0, -sensor_height]]))[0]
        normal = np.array([0.0, -1.0, 0.0])  # camera y points down: the ground normal is -y
        return f"# Matrix\nWIDTH 4\nHEIGHT 1\n{normal[0]:.6e} {normal[1]:.6e} {normal[2]:.6e} {-normal @ ground:.6e}\n"

    def to_text(self) -> str:
        rows = {"P0": self.P2, "P1": self.P2, "P2": self.P2, "P3": self.P2, "R0_rect": self.R0,
                "Tr_velo_to_cam": self.Tr_velo_to_cam, "Tr_imu_to_velo": self.Tr_velo_to_cam}
        return "".join(f"{k}: {' '.join('%.12e' % v for v in m.reshape(-1))}\n" for k, m in rows.items())


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(M, 8, 3) corners of LiDAR boxes [x, y, z, dx, dy, dz, heading]."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    local = signs[None] * boxes[:, None, 3:6] / 2
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s + boxes[:, None, 0]
    y = local[..., 0] * s + local[..., 1] * c + boxes[:, None, 1]
    return np.stack([x, y, local[..., 2] + boxes[:, None, 2]], -1)


def kitti_label_lines(boxes: np.ndarray, names: List[str], visibility: np.ndarray,
                      calib: Calibration) -> List[str]:
    """KITTI label_2 lines (type trunc occ alpha bbox[4] h w l x y z ry) for LiDAR boxes."""
    lines = []
    rows, cols = IMAGE_SHAPE
    for box, name, vis in zip(boxes.astype(np.float64), names, visibility):
        bottom = calib.lidar_to_rect(np.array([[box[0], box[1], box[2] - box[5] / 2]]))[0]
        ry = -box[6] - np.pi / 2
        ry = (ry + np.pi) % (2 * np.pi) - np.pi
        alpha = -np.arctan2(-box[1], box[0]) + ry
        uv = calib.rect_to_image(calib.lidar_to_rect(box_corners(box[None])[0]))
        x1, y1 = uv.min(0)
        x2, y2 = uv.max(0)
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, cols - 1), min(y2, rows - 1)
        full = max((x2 - x1) * (y2 - y1), 1e-6)
        truncated = float(np.clip(1 - max(cx2 - cx1, 0) * max(cy2 - cy1, 0) / full, 0, 1))
        occluded = 0 if vis > 0.8 else (1 if vis > 0.4 else 2)
        lines.append(f"{name} {truncated:.2f} {occluded} {alpha:.2f} {cx1:.2f} {cy1:.2f} {cx2:.2f} {cy2:.2f} "
                     f"{box[5]:.2f} {box[4]:.2f} {box[3]:.2f} {bottom[0]:.2f} {bottom[1]:.2f} {bottom[2]:.2f} {ry:.2f}\n")
    return lines


def write_gray_png(path: Path, shape=IMAGE_SHAPE, value: int = 96) -> None:
    """A constant 8-bit grey PNG (only the image shape matters to LiDAR pipelines)."""
    import struct
    import zlib
    rows, cols = shape
    raw = b"".join(b"\x00" + bytes([value]) * cols for _ in range(rows))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)
