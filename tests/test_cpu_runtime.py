"""The CPU runtime pieces that do not need OpenPCDet: op stand-ins, CUDA shims, spconv patch."""
import numpy as np
import pytest
import torch

import pcdet_ext  # noqa: F401  (activates the CPU runtime on this CUDA-less torch)
from pcdet_ext.openpcdet import cpu
from pcdet_ext.openpcdet.cpu import compiled_ops

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
    from pcdet_ext.openpcdet.cpu.ledger import Ledger
    finder = compiled_ops.CompiledOpsFinder(Ledger())
    assert finder.find_spec("pcdet.ops.bev_pool.bev_pool_ext") is not None
    assert finder.find_spec("pcdet.ops.iou3d_nms.iou3d_nms_utils") is None
    assert finder.find_spec("numpy") is None


def _in_pcdet_ext(code: str, **names):
    """Run ``code`` as if it were a line of pcdet_ext (the shims' scope)."""
    scope = {"__name__": "pcdet_ext._test", **names}
    exec(compile(code, pcdet_ext.__file__, "exec"), scope)
    return scope


def test_cuda_shims_serve_openpcdet_and_pcdet_ext_callers():
    t = torch.arange(3.0)
    scope = _in_pcdet_ext("same = t.cuda() is t\n"
                          "alloc = torch.cuda.FloatTensor(torch.Size((2, 3))).zero_()\n"
                          "long = torch.cuda.LongTensor(4)\n"
                          "m = torch.nn.Linear(2, 2).cuda()", t=t, torch=torch)
    assert scope["same"]
    assert scope["alloc"].shape == (2, 3) and scope["alloc"].dtype == torch.float32 and not scope["alloc"].is_cuda
    assert scope["long"].dtype == torch.int64
    assert scope["m"].weight.device.type == "cpu"  # Module.cuda -> torch frames -> the pcdet_ext caller


def test_cuda_shims_leave_other_callers_to_torch():
    """This test module is neither OpenPCDet, pcdet_ext nor __main__: torch's own behaviour."""
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        torch.arange(3.0).cuda()
    with pytest.raises(TypeError, match="not available"):
        torch.cuda.FloatTensor(3)


_SNAPSHOT = """
import os, sys, torch, spconv.pytorch.ops as ops, spconv.pytorch.conv as conv, spconv.pytorch.cppcore as core
def snap():
    return {"Tensor": dict(vars(torch.Tensor)), "cuda": dict(vars(torch.cuda)), "ops": dict(vars(ops)),
            "conv": dict(vars(conv.SparseConvolution)), "core": dict(vars(core)), "env": dict(os.environ),
            "meta_path": list(sys.meta_path), "modules": set(sys.modules)}
"""


def test_deactivate_restores_every_patched_attribute():
    from _subproc import run_python
    code = _SNAPSHOT + """
import pcdet_ext
from pcdet_ext.openpcdet import cpu
assert not cpu.is_active()
before = snap()
cpu.activate()
import torchvision.transforms
during = snap()
assert "torchvision.transforms" in during["modules"]
assert during["Tensor"]["cuda"] is not before["Tensor"].get("cuda") and len(cpu.patched()) > 20
cpu.deactivate()
after = snap()
assert not cpu.patched() and not cpu.is_active()
for key in before:
    if key in ("env", "meta_path"):
        assert after[key] == before[key], key
    elif key == "modules":  # what the runtime served leaves; what it imported (its own modules) may stay
        assert not any(m.startswith("torchvision") for m in after[key])
    else:
        assert after[key].keys() == before[key].keys(), (key, set(after[key]) ^ set(before[key]))
        changed = [k for k in before[key] if after[key][k] is not before[key][k]]
        assert not changed, (key, changed)
print("restored", len(during["meta_path"]) - len(before["meta_path"]))
"""
    out = run_python(code, {"PCDET_EXT_CPU_RUNTIME": "0", "PCDET_ROOT": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["restored", "2"]


def test_runtime_context_manager_and_suspended():
    assert cpu.is_active()
    with cpu.suspended():
        assert not cpu.is_active() and not cpu.patched()
        assert type(torch.Tensor.cuda).__name__ == "method_descriptor"
        with cpu.runtime() as state:
            assert state["active"] and cpu.patched()
        assert not cpu.is_active()
    assert cpu.is_active() and cpu.patched()
    with cpu.runtime():  # already on: stays on afterwards
        pass
    assert cpu.is_active()


def test_numba_simulator_only_for_the_importing_block():
    import os
    from pcdet_ext.openpcdet.cpu import shims
    assert "NUMBA_ENABLE_CUDASIM" not in os.environ  # not inherited by every child process
    with shims.numba_cuda_simulator():
        assert os.environ["NUMBA_ENABLE_CUDASIM"] == "1"
        import numba.cuda  # noqa: F401
        import sys
        assert "numba.cuda.simulator_init" in sys.modules
    assert "NUMBA_ENABLE_CUDASIM" not in os.environ


def test_single_threaded_spconv_ops_leave_other_threads_alone():
    """The split server runs one thread per connection: a spconv op in one thread must not change the
    thread count of another (OpenMP: the setting is per OS thread)."""
    import threading
    from pcdet_ext.openpcdet.cpu import spconv_patch
    if not spconv_patch.thread_count_is_per_thread():
        pytest.skip("this torch's thread count is process-wide (not OpenMP)")
    inside, release, seen = threading.Event(), threading.Event(), {}

    def op():
        seen["op"] = torch.get_num_threads()
        inside.set()
        release.wait(10)
    wrapped = spconv_patch._single_threaded(op)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        worker = threading.Thread(target=lambda: (torch.set_num_threads(2), wrapped()))
        worker.start()
        assert inside.wait(10)
        seen["main"] = torch.get_num_threads()
        release.set()
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == {"op": 1, "main": 2}


def test_torchvision_transforms_substitute():
    import torchvision
    if not getattr(torchvision, "PCDET_EXT_SUBSTITUTE", False):
        pytest.skip("a real torchvision is installed")
    img = np.full((4, 5, 3), 255, dtype=np.uint8)
    tf = torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                         torchvision.transforms.Normalize(mean=[0.5] * 3, std=[0.25] * 3)])
    out = tf(img)
    from torchvision.transforms import Normalize  # the submodule import path works too
    assert Normalize is torchvision.transforms.Normalize
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
