"""Bad dataset files give errors naming the file, the line and what was expected."""
import numpy as np
import pytest

from pcdet_ext.openpcdet.datasets.validation import (DatasetFormatError, check_custom_points, check_velodyne,
                                           parse_custom_labels, parse_kitti_labels)

CLASSES = ["dumptruck", "excavator", "grader", "roller"]


def test_corrupt_velodyne(tmp_path):
    f = tmp_path / "000001.bin"
    np.zeros(10, dtype=np.float32).tofile(f)  # 40 bytes: not whole points
    with pytest.raises(DatasetFormatError, match=r"000001.bin: 40 bytes is not a positive multiple of 16"):
        check_velodyne(f)
    np.zeros(8, dtype=np.float32).tofile(f)
    assert check_velodyne(f) == 2


def test_custom_label_class_missing_from_config(tmp_path):
    f = tmp_path / "000003.txt"
    f.write_text("1 2 0 9 3 4 0.1 dumptruck\n4 5 0 5 2 3 0 bulldozer\n")
    with pytest.raises(DatasetFormatError, match=r"000003.txt:2: class 'bulldozer' is not in the config's CLASS_NAMES"):
        parse_custom_labels(f, CLASSES)


def test_custom_label_empty_file(tmp_path):
    f = tmp_path / "000004.txt"
    f.write_text("\n")
    with pytest.raises(DatasetFormatError, match="000004.txt: empty label file"):
        parse_custom_labels(f, CLASSES)


@pytest.mark.parametrize("line,match", [
    ("1 2 0 9 3 4 dumptruck", "expected 8 fields"),
    ("1 2 0 9 x 4 0.1 dumptruck", "non-numeric"),
    ("1 2 0 9 -3 4 0.1 dumptruck", "box values must be finite with dx, dy, dz > 0"),
])
def test_custom_label_malformed_line_number(tmp_path, line, match):
    f = tmp_path / "000005.txt"
    f.write_text("1 2 0 9 3 4 0.1 dumptruck\n\n" + line + "\n")
    with pytest.raises(DatasetFormatError, match=rf"000005.txt:3: {match}"):
        parse_custom_labels(f, CLASSES)


def test_custom_points_shape(tmp_path):
    f = tmp_path / "000006.npy"
    np.save(f, np.zeros((5, 4), dtype=np.float32))
    with pytest.raises(DatasetFormatError, match=r"shape \(N, 3\).*\(5, 4\)"):
        check_custom_points(f, 3)
    f.write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="not a readable .npy"):
        check_custom_points(f, 3)


def test_kitti_label_fields(tmp_path):
    f = tmp_path / "000007.txt"
    f.write_text("Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59\nCar 0 0\n")
    with pytest.raises(DatasetFormatError, match=r"000007.txt:2: expected 15 KITTI label fields"):
        parse_kitti_labels(f)
