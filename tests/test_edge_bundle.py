"""Edge bundle metadata: every field checked at load, one error naming the file and what was expected."""
import hashlib
import json

import pytest

from pcdet_ext.algorithms.bitstream import GridGeometry, ProbabilityModels
from pcdet_ext.edge.bundle import ENCODER, METADATA, BundleError, EdgeBundle, quantizer_file


def write_bundle(root, **edit):
    geo = GridGeometry(height=100, width=80, sensor_row=50.0, sensor_col=0.0, cell_m=0.16)
    for name in (ENCODER, quantizer_file(16)):
        (root / name).write_bytes(name.encode())
    meta = {"format": 1, "opset": 17, "model_id": "00" * 8, "mode": "sparse", "feature_dim": 64,
            "voxels": {"point_cloud_range": [0, -8, -3, 12.8, 8, 1], "voxel_size": [0.16, 0.16, 4],
                       "max_points_per_voxel": 32, "max_voxels": 4000, "point_columns": [0, 1, 2, 3],
                       "file_columns": 4},
            "cells": [[1, 16], [2, 16]],
            "files": {n: hashlib.sha256(n.encode()).hexdigest() for n in (ENCODER, quantizer_file(16))},
            "bitstream_models": ProbabilityModels.empty(geo, 2, [16]).to_state()}
    for key, value in edit.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (root / METADATA).write_text(json.dumps(meta))
    return root


def test_a_good_bundle_loads_and_its_files_are_checked(tmp_path):
    bundle = EdgeBundle.load(write_bundle(tmp_path))
    assert bundle.cells == [(1, 16), (2, 16)] and bundle.sizes == [16] and not bundle.dense
    assert bundle.graph(ENCODER) == ENCODER.encode()
    (tmp_path / ENCODER).write_bytes(b"other graph")
    with pytest.raises(BundleError, match="pillar_encoder.onnx: does not match"):
        bundle.graph(ENCODER)
    with pytest.raises(BundleError, match=r"\(3, 16\) is not a cell"):
        bundle.cell(3, 16)


@pytest.mark.parametrize("edit,match", [
    ({"extra": 1}, r"unknown keys \['extra'\]"),
    ({"cells": None}, r"missing keys \['cells'\]"),
    ({"format": 2}, "bundle format 2"),
    ({"mode": "half"}, "mode must be"),
    ({"voxels": {"point_cloud_range": [0, -8, -3, 12.8, 8, 1], "voxel_size": [float("nan"), 0.16, 4],
                 "max_points_per_voxel": 32, "max_voxels": 4000, "point_columns": [0, 1, 2, 3]}}, "finite"),
    ({"voxels": {"point_cloud_range": [0, -8, -3, 12.8, 8, 1], "voxel_size": [0.16, float("inf"), 4],
                 "max_points_per_voxel": 32, "max_voxels": 4000, "point_columns": [0, 1, 2, 3]}}, "finite"),
    ({"voxels": {"point_cloud_range": [0, -8, -3, 12.8, 8, 1], "voxel_size": [0.16, 0.16, 4],
                 "max_points_per_voxel": 32, "max_voxels": 4000, "point_columns": [0, 1, 2, 3], "typo": 1}},
     "malformed field"),
    ({"voxels": {"point_cloud_range": [0, -8, -3, 12.8, 8, 1], "voxel_size": [0.32, 0.16, 4],
                 "max_points_per_voxel": 32, "max_voxels": 4000, "point_columns": [0, 1, 2, 3]}}, "100 x 80 grid"),
    ({"files": {}}, "no SHA-256 recorded for pillar_encoder.onnx"),
    ({"bitstream_models": {"geometry": [1]}}, "bitstream models: 'geometry'"),
    ({"model_id": "zz"}, "malformed field"),
])
def test_bad_metadata_is_refused_naming_the_file(tmp_path, edit, match):
    write_bundle(tmp_path, **edit)
    with pytest.raises(BundleError, match=match) as err:
        EdgeBundle.load(tmp_path)
    assert str(tmp_path / METADATA) in str(err.value)


def test_missing_or_unreadable_metadata(tmp_path):
    with pytest.raises(BundleError, match="edge_bundle.json: missing"):
        EdgeBundle.load(tmp_path)
    (tmp_path / METADATA).write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        EdgeBundle.load(tmp_path)
