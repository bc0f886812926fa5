"""Dataset tooling: synthetic LiDAR sets, KITTI-format writers, validation, info creation, class-name reports."""
