"""What a GPU cluster run needs, tested on the CPU: no teacher forward without a loss that uses it,
--sync_bn over a pretraining model, AMP plumbing, BatchNorm statistics re-estimated on unmasked
input, and a budget of device-to-host copies per training step."""
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pcdet_ext.algorithms.quantization import ResidualQuantizer
from pcdet_ext.engine.loop.runner import Runner, grad_scaler
from pcdet_ext.engine.startup.prepare import convert_sync_batchnorm
from pcdet_ext.utils.checkpoint import atomic_save, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from _host_copies import count_host_copies  # noqa: E402
from test_rmae_cmae_backbone import batch, make  # noqa: E402


@contextmanager
def counting_teacher(bb):
    calls = []
    forward = bb.teacher.forward
    bb.teacher.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        yield calls
    finally:
        del bb.teacher.forward


def test_teacher_runs_only_for_a_loss_that_uses_it_and_never_at_eval_but_stays_updated():
    off = make(TEACHER_STUDENT_WEIGHT=0.0, TEACHER_MOMENTUM=0.5)
    with counting_teacher(off) as calls:
        off.train()
        off(batch())
        loss, tb = off.get_loss()
        assert calls == [] and "teacher_multi_scale_3d_features" not in tb and math.isfinite(loss.item())
        with torch.no_grad():
            off.conv_out[0].weight.add_(1.0)   # an optimizer step
        before = off.teacher.conv_out[0].weight.clone()
        off.update_teacher()                     # the EMA still follows the student
        assert torch.allclose(off.teacher.conv_out[0].weight, 0.5 * before + 0.5 * off.conv_out[0].weight)
        off.eval()
        off(batch())
        assert calls == []
    on = make(TEACHER_STUDENT_WEIGHT=0.5)
    with counting_teacher(on) as calls:
        on.train()
        on(batch())
        assert calls == [1] and "loss_teacher_student" in on.get_loss()[1]
        on.eval()
        on(batch())
        assert calls == [1]  # evaluation: the AP does not use the teacher


class Detector(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone_3d = backbone
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


def test_sync_bn_converts_the_student_and_leaves_the_teacher_whose_ema_still_works():
    model = Detector(make(TEACHER_MOMENTUM=0.5))
    with pytest.raises(TypeError, match="cannot assign"):  # what --sync_bn did before: the teacher's weights are buffers
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(Detector(make()))
    model = convert_sync_batchnorm(model)
    bb = model.backbone_3d
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    student = {n: k for n, k in kinds.items() if ".teacher." not in n}
    teacher = {n: k for n, k in kinds.items() if ".teacher." in n}
    assert student and all(k is nn.SyncBatchNorm for k in student.values()), student
    assert teacher and all(k is not nn.SyncBatchNorm for k in teacher.values()), teacher
    assert not any(True for _ in bb.teacher.parameters())
    with torch.no_grad():
        bb.conv_input[1].weight.add_(2.0)
        bb.conv_input[1].running_mean.add_(4.0)
    w, m = bb.teacher.conv_input[1].weight.clone(), bb.teacher.conv_input[1].running_mean.clone()
    bb._ema_teacher(0.5)  # parameters and statistics, by name across SyncBatchNorm / BatchNorm
    assert torch.allclose(bb.teacher.conv_input[1].weight, 0.5 * w + 0.5 * bb.conv_input[1].weight)
    assert torch.allclose(bb.teacher.conv_input[1].running_mean, 0.5 * m + 0.5 * bb.conv_input[1].running_mean)


class QuantizingNet(nn.Module):
    """conv -> residual quantizer -> conv; records what the quantizer returned."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 1)
        self.quantizer = ResidualQuantizer(dim=16, num_codebooks=2, codebook_size=16, schedule=[16])
        self.seen = []

    def forward(self, x):
        q = self.quantizer(self.inp(x))
        self.seen.append((q.quantized.dtype, self.quantizer.codebooks[0].dtype))
        return self.out(q.quantized).pow(2).mean() + sum(q.losses.values())


def test_amp_step_runs_in_bf16_on_cpu_with_the_quantizer_fp32_and_the_scaler_saved_and_restored(tmp_path):
    torch.manual_seed(0)
    net = QuantizingNet()
    net.quantizer.set_mode("gradient")
    net.quantizer.start_stage(0, 16, torch.randn(256, 16))
    dtypes = []

    def forward(model, x):
        with_autocast = torch.is_autocast_cpu_enabled() if hasattr(torch, "is_autocast_cpu_enabled") else \
            torch.is_autocast_enabled("cpu")
        dtypes.append(with_autocast)
        loss = model(x)
        return loss, {"inner": loss.detach()}, {}

    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = grad_scaler(True, "cpu", init_scale=256.0)
    runner = Runner(net, opt, forward=forward, amp=True, scaler=scaler, is_main=False)
    x = torch.randn(64, 8)
    before = net.out.weight.detach().clone(), net.quantizer.codebooks[0].detach().clone()
    steps = [runner.step(x) for _ in range(3)]
    assert dtypes == [True] * 3 and all(math.isfinite(s.loss) for s in steps)
    assert steps[0].tb_dict["inner"].dtype == torch.float32  # the loss comes back in fp32
    assert all(q == torch.float32 and book == torch.float32 for q, book in net.seen)  # quantizer in fp32
    assert not torch.equal(before[0], net.out.weight) and not torch.equal(before[1], net.quantizer.codebooks[0])
    scaler.update(512.0)
    atomic_save({"scaler_state": scaler.state_dict()}, tmp_path / "ckpt.pth")
    restored = grad_scaler(True, "cpu")
    restored.load_state_dict(load_checkpoint(tmp_path / "ckpt.pth")["scaler_state"])  # weights_only load
    assert restored.get_scale() == 512.0 and grad_scaler(False, "cpu") is None


def test_batchnorm_statistics_re_estimated_on_unmasked_voxels_for_student_and_teacher():
    bb = make()
    bb.train()
    for seed in range(3):  # pretraining steps: statistics of masked input
        bb(batch(seed=seed))
        bb.update_teacher()
    full = [batch(seed=10 + i) for i in range(3)]
    bn = bb.conv_input[1]
    masked_mean = bn.running_mean.clone()
    bb.eval()
    assert bb.recalibrate_batchnorm(full) == 3
    assert not bb.training and bn.momentum == 0.1 and bb.teacher.conv_input[1].momentum == 0.0  # as before
    # the first layer's statistics are exactly those of the complete voxels' features after its
    # convolution, the student's and the teacher's (its own weights, an EMA of the student's)
    import spconv.pytorch as spconv

    def first_layer_mean(conv):
        feats = [conv(spconv.SparseConvTensor(b["voxel_features"], b["voxel_coords"].int(), bb.sparse_shape,
                                              b["batch_size"])).features for b in full]
        return torch.stack([f.mean(0) for f in feats]).mean(0)
    with torch.no_grad():
        expected, expected_teacher = first_layer_mean(bb.conv_input[0]), first_layer_mean(bb.teacher.conv_input[0])
    assert torch.allclose(bn.running_mean, expected, atol=1e-5) and not torch.allclose(masked_mean, expected)
    assert torch.allclose(bb.teacher.conv_input[1].running_mean, expected_teacher, atol=1e-5)
    assert int(bn.num_batches_tracked) == 3


def _pretraining_step(phase: int, compute_metrics: bool):
    if phase == 1:
        bb = make(TEACHER_STUDENT_WEIGHT=0.0)
    else:  # MLFR, voxel and frame contrast: the teacher runs, the frame queue fills
        from test_rmae_cmae_phase2 import make as make_phase2
        bb = make_phase2()
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.01)

    def forward(model, b):
        model(b)
        loss, tb = model.get_loss()
        return loss, tb, {}
    runner = Runner(bb, opt, forward=forward, is_main=False)
    runner.step(batch(seed=0))  # the first step reads the step counter once
    bb.compute_metrics = compute_metrics
    with count_host_copies() as calls:
        runner.step(batch(seed=1))
        bb.update_teacher()
    return calls


# Budget of a Phase 1 / Phase 2 training step (not logged), read from pcdet_ext's code: the runner's
# finite-loss check, the ray samples' total (the shape of the free-space trace) and, on the CPU only,
# the voxel-coordinate bounds check (on CUDA an asynchronous device assert). The data-dependent shapes
# of nonzero / unique / boolean indexing are syncs these methods do not see: the GPU check counts
# every sync with torch.cuda.set_sync_debug_mode.
STEP_BUDGET = 3


@pytest.mark.parametrize("phase", [1, 2])
def test_a_pretraining_step_stays_within_its_budget_of_host_copies(phase):
    calls = _pretraining_step(phase, compute_metrics=False)
    assert len(calls) <= STEP_BUDGET, "\n".join(calls)
    logged = _pretraining_step(phase, compute_metrics=True)  # a logged step computes the metrics: many more
    assert len(logged) > len(calls)


def test_without_a_log_hook_metrics_come_on_the_first_and_every_50th_step_and_always_at_eval():
    """Stock OpenPCDet's loop (a fork's tools/train.py) sets no compute_metrics: the backbone keeps
    its own cadence, so a step is not paying for the metrics' host copies 49 times out of 50."""
    bb = make(TEACHER_STUDENT_WEIGHT=0.0)
    bb.train()
    has = []
    for i in range(51):
        bb(batch(seed=i % 2))
        has.append("occ_ap" in bb.get_loss()[1])
    assert [i for i, h in enumerate(has) if h] == [0, 50]
    bb.eval()
    bb(batch())
    assert "occ_ap" in bb.get_loss()[1]


def test_batchnorm_statistics_re_estimated_in_detection_mode_for_a_frozen_random_probe():
    """A probe from random init (no pretraining attributes) gets its statistics from complete voxels too."""
    bb = make(PRETRAINING=False, MASKED_RATIO=0.0, ENABLE_TEACHER_STUDENT=False, TEACHER_STUDENT_WEIGHT=0.0)
    bn = bb.conv_input[1]
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    full = [batch(seed=20 + i) for i in range(2)]
    bb.eval()
    assert bb.recalibrate_batchnorm(full) == 2 and not bb.training
    import spconv.pytorch as spconv
    with torch.no_grad():
        expected = torch.stack([bb.conv_input[0](spconv.SparseConvTensor(
            b["voxel_features"], b["voxel_coords"].int(), bb.sparse_shape, b["batch_size"])).features.mean(0)
            for b in full]).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-5) and int(bn.num_batches_tracked) == 2


class _Writer:
    def close(self):
        pass


def _finish_two_ranks(rank, world, port, results):
    import gc
    import weakref

    import torch.distributed as dist

    from pcdet_ext.engine.startup.distributed import DistInfo
    from pcdet_ext.engine.startup.prepare import TrainingRun
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    inner = nn.Linear(3, 1)
    ddp = nn.parallel.DistributedDataParallel(inner)
    ddp(torch.randn(2, 3)).sum().backward()  # the reducer has run: its buckets hold the group's work
    run = TrainingRun(None, None, DistInfo(rank, world, rank), None, None, None, _Writer(), None, None, None, ddp,
                      None, None, None, 0, 0, 1, None)
    wrapper = weakref.ref(ddp)
    del ddp
    run.finish()
    gc.collect()
    results[rank] = (dist.is_initialized(), run.model is inner, wrapper() is None)


def test_finish_releases_the_ddp_wrapper_and_leaves_the_process_group():
    """A group (or a DDP wrapper holding it) alive at interpreter shutdown can abort a rank from gloo's
    threads after its checkpoints are written; finish() leaves it on every rank."""
    from _subproc import run_gloo_ranks
    assert run_gloo_ranks(_finish_two_ranks, 2) == {0: (False, True, True), 1: (False, True, True)}
