"""A two-level spconv encoder with OpenPCDet's backbone_3d interface, for tests without OpenPCDet."""
import torch.nn as nn
import spconv.pytorch as spconv


class TinyEncoder(nn.Module):
    def __init__(self, model_cfg, input_channels, grid_size, **kwargs):
        super().__init__()
        self.sparse_shape = list(grid_size[::-1])
        self.conv_input = spconv.SparseSequential(
            spconv.SubMConv3d(input_channels, 8, 3, padding=1, bias=False, indice_key="subm1"),
            nn.BatchNorm1d(8), nn.ReLU())
        self.conv2 = spconv.SparseSequential(
            spconv.SparseConv3d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        use_bias = model_cfg.get("USE_BIAS", False) if model_cfg else False  # as VoxelNeXt's biased convs
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(16, 16, 3, stride=2, padding=1, bias=use_bias), nn.BatchNorm1d(16), nn.ReLU())
        self.num_point_features = 16

    def forward(self, batch_dict):
        x = spconv.SparseConvTensor(batch_dict["voxel_features"], batch_dict["voxel_coords"].int(),
                                    self.sparse_shape, batch_dict["batch_size"])
        x1 = self.conv_input(x)
        x2 = self.conv2(x1)
        out = self.conv_out(x2)
        batch_dict.update({"encoded_spconv_tensor": out, "encoded_spconv_tensor_stride": 4,
                           "multi_scale_3d_features": {"x_conv1": x1, "x_conv2": x2},
                           "multi_scale_3d_strides": {"x_conv1": 1, "x_conv2": 2}})
        return batch_dict
