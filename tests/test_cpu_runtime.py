"""The CPU runtime pieces that do not need OpenPCDet: op stand-ins, CUDA shims, spconv patch."""
import numpy as np
import pytest
import torch

import pcdet_ext  # noqa: F401  (activates the CPU runtime on this CUDA-less torch)
from pcdet_ext import cpu
from pcdet_ext.cpu import compiled_ops

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runtime is only for CUDA-less torch")


def test_runtime_active_on_cuda_less_torch():
    assert cpu.is_active()
    assert cpu.activate()["active"] is True  # idempotent


def test_runtime_env_switch_off(tmp_path):
    from _subproc import run_python
    out = run_python("import pcdet_ext, torch; from pcdet_ext import cpu; print(cpu.is_active(), type(torch.Tensor.cuda).__name__)",
                     {"PCDET_EXT_CPU_RUNTIME": "0", "PCDET_ROOT": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "method_descriptor"]  # torch's own C method, unpatched


def test_iou3d_standin_signatures_write_into_outputs():
    mod = compiled_ops.make_module("pcdet.ops.iou3d_nms.iou3d_nms_cuda")
    a = torch.tensor([[0, 0, 0, 2, 2, 1, 0], [1, 0, 0, 2, 2, 1, 0]], dtype=torch.float32)
    ov = torch.zeros(2, 2)
    assert mod.boxes_overlap_bev_gpu(a, a, ov) == 1
    torch.testing.assert_close(ov, torch.tensor([[4.0, 2.0], [2.0, 4.0]]))
    iou = torch.zeros(2, 2)
    mod.boxes_iou_bev_cpu(a, a, iou)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]]))
    paired = torch.zeros(2, 1)
    mod.paired_boxes_overlap_bev_gpu(a, a.flip(0), paired)
    torch.testing.assert_close(paired, torch.tensor([[2.0], [2.0]]))
    mod.boxes_aligned_iou_bev_cpu(a, a, paired)
    torch.testing.assert_close(paired, torch.ones(2, 1))
    keep = torch.LongTensor(2)
    assert mod.nms_gpu(a, keep, 0.3) == 1 and keep[0] == 0
    assert mod.nms_normal_gpu(a, keep, 0.5) == 2


def test_roiaware_standin_points_in_boxes():
    mod = compiled_ops.make_module("pcdet.ops.roiaware_pool3d.roiaware_pool3d_cuda")
    boxes = torch.tensor([[0, 0, 0, 2, 2, 2, 0.0]])
    pts = torch.tensor([[0.5, 0.5, 0.5], [3, 0, 0]])
    idx = torch.zeros(1, 2, dtype=torch.int)
    mod.points_in_boxes_cpu(boxes, pts, idx)
    assert idx.tolist() == [[1, 0]]
    first = torch.full((1, 2), -1, dtype=torch.int)
    mod.points_in_boxes_gpu(boxes[None], pts[None], first)
    assert first.tolist() == [[0, -1]]
    with pytest.raises(NotImplementedError, match="roiaware_pool3d_cuda.forward"):
        mod.forward()


def test_unavailable_ops_import_and_raise_naming_the_op():
    mod = compiled_ops.make_module("pcdet.ops.pointnet2.pointnet2_stack.pointnet2_stack_cuda")
    with pytest.raises(NotImplementedError, match="pointnet2_stack_cuda.ball_query_wrapper"):
        mod.ball_query_wrapper(1, 2)
    with pytest.raises(AttributeError):
        mod.__path__  # the import system must see a plain module


def test_finder_serves_only_compiled_op_names():
    finder = compiled_ops.CompiledOpsFinder()
    assert finder.find_spec("pcdet.ops.bev_pool.bev_pool_ext") is not None
    assert finder.find_spec("pcdet.ops.iou3d_nms.iou3d_nms_utils") is None
    assert finder.find_spec("numpy") is None


def test_cuda_shims():
    t = torch.arange(3.0)
    assert t.cuda() is t
    alloc = torch.cuda.FloatTensor(torch.Size((2, 3))).zero_()
    assert alloc.shape == (2, 3) and alloc.dtype == torch.float32 and not alloc.is_cuda
    assert torch.cuda.LongTensor(4).dtype == torch.int64
    m = torch.nn.Linear(2, 2).cuda()
    assert m.weight.device.type == "cpu"


def test_torchvision_transforms_substitute():
    import torchvision
    if not getattr(torchvision, "PCDET_EXT_SUBSTITUTE", False):
        pytest.skip("a real torchvision is installed")
    img = np.full((4, 5, 3), 255, dtype=np.uint8)
    tf = torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                         torchvision.transforms.Normalize(mean=[0.5] * 3, std=[0.25] * 3)])
    out = tf(img)
    assert out.shape == (3, 4, 5)
    torch.testing.assert_close(out, torch.full((3, 4, 5), 2.0))
    with pytest.raises(ImportError, match="only substitutes torchvision.transforms"):
        torchvision.models


spconv = pytest.importorskip("spconv.pytorch")


def _sparse_input(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.randint(0, 8, (60, 3), generator=g), dim=0)
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords.int()], 1)
    feats = torch.randn(len(coords), 4, generator=g, requires_grad=requires_grad)
    return spconv.SparseConvTensor(feats, idx, [8, 8, 8], 1), feats


def test_spconv_backward_on_cpu():
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 8, 3, indice_key="s1", bias=False),
                                  spconv.SparseConv3d(8, 8, 3, stride=2, padding=1, bias=True))
    x, feats = _sparse_input(requires_grad=True)
    out = net(x)
    out.features.square().sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_spconv_eval_with_bias_matches_dense_reference():
    """Eval-mode submanifold conv with bias (the path spconv's CPU kernel rejects) against an
    independent dense conv3d evaluated at the active sites."""
    conv = spconv.SubMConv3d(4, 6, 3, bias=True, indice_key="k")
    torch.nn.init.uniform_(conv.bias, 0.5, 1.0)
    x, feats = _sparse_input()
    conv.eval()
    with torch.no_grad():
        out = conv(x).features
        dense = torch.zeros(1, 4, 8, 8, 8)
        idx = x.indices.long()
        dense[0, :, idx[:, 1], idx[:, 2], idx[:, 3]] = feats.t()
        weight = conv.weight.permute(0, 4, 1, 2, 3)  # spconv 2.x KRSC -> conv3d [out, in, kz, ky, kx]
        ref = torch.nn.functional.conv3d(dense, weight, conv.bias, padding=1)[0][:, idx[:, 1], idx[:, 2], idx[:, 3]].t()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_spconv_cpu_kernels_do_not_race_with_two_threads():
    """spconv's CPU kernels race with >1 thread (a wrong voxel now and then); the runtime runs them
    single-threaded. 200 random convolutions against the dense reference, train and eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, feats = _sparse_input()
        idx = x.indices.long()
        dense = torch.zeros(1, 4, 8, 8, 8)
        dense[0, :, idx[:, 1], idx[:, 2], idx[:, 3]] = feats.t()
        wrong = 0
        for i in range(200):
            conv = spconv.SubMConv3d(4, 6, 3, bias=bool(i % 2), indice_key="k").train(bool(i % 3))
            x, _ = _sparse_input()
            with torch.no_grad():
                out = conv(x).features
                ref = torch.nn.functional.conv3d(dense, conv.weight.permute(0, 4, 1, 2, 3), conv.bias, padding=1)
            wrong += not torch.allclose(out, ref[0][:, idx[:, 1], idx[:, 2], idx[:, 3]].t(), rtol=1e-4, atol=1e-4)
        assert wrong == 0
    finally:
        torch.set_num_threads(threads)
