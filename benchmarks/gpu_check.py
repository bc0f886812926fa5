"""The prepared GPU check: what the CPU tests cannot show, in one command of a few minutes.

    python benchmarks/gpu_check.py                 # on a CUDA machine (<= 8 min on one GPU)
    python benchmarks/gpu_check.py --device cpu    # small sizes, a few minutes: keeps the script from rotting

Needs PyTorch (CUDA build on a GPU), OpenPCDet's source with its CUDA ops built (PCDET_ROOT) and this
package. Sparse-conv rows run when spconv can convolve on the device (spconv-cu on a GPU) and read
"skipped: no spconv-cu" otherwise. Data: a synthetic KITTI set written to a temporary folder.

Rows: PointPillarRQ training steps (sparse and dense bottleneck; fp32 and AMP: step time, peak
memory, host syncs per step counted with ``torch.cuda.set_sync_debug_mode``) and evaluation; the
residual quantizer's training step and encode at 12k and 214k vectors (5 x 256, dim 64); Phase 1
and Phase 2 pretraining steps for VoxelNeXt and SECOND at KITTI's 0.05 m voxels, batch 8 (fp32 and
AMP). Prints one table; exits 1 when any row failed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List

import pcdet_ext  # noqa: F401  (registers the modules; the CPU runtime on CUDA-less torch)
import torch

REPO = Path(__file__).resolve().parents[1]
PILLARS = "cfgs/kitti_models/pointpillar_rq.yaml"
PRETRAIN = {1: "cfgs/kitti_models/rmae_cmae_kitti_pretraining_phase1.yaml",
            2: "cfgs/kitti_models/rmae_cmae_kitti_pretraining_phase2.yaml"}
ENCODERS = {"VoxelNeXt": "VoxelResBackBone8xVoxelNeXt", "SECOND": "VoxelBackBone8x"}


class Table:
    def __init__(self):
        self.rows: List[Dict[str, str]] = []

    def add(self, name: str, setting: str, fn: Callable[[], Dict[str, str]]) -> None:
        """Run ``fn`` (returns the row's figures); a failure is a FAIL row with the error."""
        print(f"... {name} [{setting}]", flush=True)
        try:
            figures = fn()
            status = figures.pop("status", "ok")
        except Exception as exc:  # a check that fails is reported in the table and fails the run
            traceback.print_exc()
            figures, status = {}, f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        self.rows.append({"check": name, "setting": setting, **figures, "status": status})

    def print(self, device: str) -> None:
        cols = ["check", "setting", "step ms", "peak MiB", "syncs/step", "figure", "status"]
        rows = [[r.get(c, "") for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print(f"\ngpu_check on {device}")
        print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
        print("-|-".join("-" * w for w in widths))
        for r in rows:
            print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))

    @property
    def failed(self) -> bool:
        return any(r["status"].startswith("FAIL") for r in self.rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def counting_syncs(device: torch.device):
    """Counts the host synchronisations CUDA reports (set_sync_debug_mode "warn"); none on the CPU."""
    found: List[str] = []
    if device.type != "cuda":
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


def timed_steps(runner, batches, device: torch.device, steps: int) -> Dict[str, str]:
    """One warm-up step, then ``steps`` timed ones (the last one with its host syncs counted)."""
    runner.step(batches[0])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(steps - 1):
        runner.step(batches[(i + 1) % len(batches)])
    with counting_syncs(device) as syncs:  # the last timed step
        runner.step(batches[0])
    sync(device)
    ms = (time.perf_counter() - start) / steps * 1000
    peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}" if device.type == "cuda" else "-"
    return {"step ms": f"{ms:.0f}", "peak MiB": peak, "syncs/step": str(len(syncs)) if device.type == "cuda" else "-",
            "figure": f"loss {runner.last.loss:.3f}"}


def seeded_model(cfg, dataset, device: torch.device) -> torch.nn.Module:
    """The config's network built from seed 0 (every row starts from the same weights), on ``device``."""
    from pcdet_ext.engine.startup import builders
    torch.manual_seed(0)
    return builders.build_model(cfg, dataset).to(device)


def runner_for(model, optimizer, amp: bool, device: torch.device, hooks=()):
    """The engine's runner, fp32 or AMP (with OpenPCDet's GradScaler)."""
    from pcdet_ext.engine.loop.runner import Runner, grad_scaler
    return Runner(model, optimizer, amp=amp, scaler=grad_scaler(amp, device.type), is_main=False, hooks=list(hooks))


def synthetic_kitti(tmp: Path) -> Path:
    from pcdet_ext.openpcdet.datasets import create_infos, synthetic_writer
    root = synthetic_writer.write_kitti(tmp / "kitti", num_frames=10, seed=3, val_fraction=0.2)
    return create_infos.create_kitti(root, workers=1)


def load_cfg(rel: str, data: Path, sets: List[str]):
    from pcdet_ext.engine.startup.args import load_config
    cfg = load_config(str(REPO / rel), sets)
    cfg.DATA_CONFIG.DATA_PATH = str(data)
    return cfg


def batches_of(cfg, data: Path, batch_size: int, n: int, device: torch.device):
    from pcdet.models import load_data_to_gpu

    from pcdet_ext.engine.startup import builders
    from pcdet_ext.openpcdet.datasets.unlabelled import allow_unlabelled
    (train_set, loader, _), (test_set, test_loader, _) = builders.build_loaders(cfg, data, batch_size=batch_size,
                                                                                workers=2)
    allow_unlabelled(train_set)
    out = []
    for batch in loader:
        if device.type == "cuda":
            load_data_to_gpu(batch)
        out.append(batch)
        if len(out) == n:
            break
    return train_set, out, test_set, test_loader


def check_pillars(table: Table, data: Path, device: torch.device, small: bool) -> None:
    from pcdet_ext.engine.evaluation import evaluate_model
    steps = 1 if small else 10
    for mode in ("sparse", "dense"):
        sets = ["MODEL.RQ_BOTTLENECK.MODE", mode]
        if small:  # an eighth of KITTI's x / y extent (bf16 convolutions are slow on most CPUs)
            sets += ["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -5.12, -3, 10.24, 5.12, 1]"]
        cfg = load_cfg(PILLARS, data, sets)
        train_set, batches, test_set, test_loader = batches_of(cfg, data, 1 if small else 8, 2, device)
        for amp in (False, True):
            def train(amp=amp):
                model = seeded_model(cfg, train_set, device)
                model.quantizer.start_stage(0, 16)
                model.quantizer.set_mode("gradient")
                model.train()
                opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
                row = timed_steps(runner_for(model, opt, amp, device), batches, device, steps)
                if amp:
                    out = model.rq_bottleneck.quantizer(torch.randn(64, model.quantizer.dim, device=device))
                    assert out.quantized.dtype == torch.float32, out.quantized.dtype
                return row
            table.add(f"PointPillarRQ train ({mode})", "AMP" if amp else "fp32", train)

        def evaluate():
            model = seeded_model(cfg, train_set, device)
            model.quantizer.start_stage(0, 16)
            model.eval()
            start = time.perf_counter()
            _, _, result = evaluate_model(model, test_set, test_loader, cfg.CLASS_NAMES)
            sync(device)
            return {"step ms": f"{(time.perf_counter() - start) / len(test_set) * 1000:.0f}",
                    "figure": f"{len(test_set)} frames, {len(result)} AP keys"}
        table.add(f"PointPillarRQ eval ({mode})", "fp32", evaluate)


def check_quantizer(table: Table, device: torch.device, small: bool) -> None:
    from pcdet_ext.algorithms.quantization import ResidualQuantizer
    sizes = (12_000, 214_000) if not small else (12_000, 50_000)
    for n in sizes:
        def run(n=n):
            torch.manual_seed(0)
            q = ResidualQuantizer(dim=64, num_codebooks=5, codebook_size=256).to(device)
            x = torch.randn(n, 64, device=device)
            q.train()
            for c in range(5):
                q.start_stage(c, 256, x[:20000])
            q.set_active(5, 256)
            q(x)
            sync(device)
            reps = 3 if small else 10
            start = time.perf_counter()
            for _ in range(reps):
                q(x)
            sync(device)
            train_ms = (time.perf_counter() - start) / reps * 1000
            q.eval()
            q.encode(x)
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                q.encode(x)
            sync(device)
            encode_ms = (time.perf_counter() - start) / reps * 1000
            return {"step ms": f"{train_ms:.1f}", "figure": f"encode {encode_ms:.1f} ms"}
        table.add(f"RQ 5x256 train step / encode, {n // 1000}k vectors", "fp32", run)


def spconv_on(device: torch.device) -> bool:
    """Whether spconv convolves on ``device`` (spconv-cu on a GPU; the CPU package on the CPU)."""
    try:
        import spconv.pytorch as spconv
        conv = spconv.SubMConv3d(4, 4, 3, indice_key="probe").to(device)
        x = spconv.SparseConvTensor(torch.ones(2, 4, device=device),
                                    torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2]], dtype=torch.int32, device=device),
                                    [4, 4, 4], 1)
        conv(x)
        return True
    except Exception:  # no spconv, or a CPU-only spconv on a GPU machine: the rows say skipped
        return False


def check_pretraining(table: Table, data: Path, device: torch.device, small: bool) -> None:
    from pcdet_ext.engine.loop.hooks import CallbackHook
    from pcdet_ext.engine.optimization import build_optimizer
    have = spconv_on(device)
    for phase, rel in PRETRAIN.items():
        for name, encoder in ENCODERS.items():
            from pcdet.models import backbones_3d
            sets = ["MODEL.BACKBONE_3D.ENCODER", encoder]
            if small:  # 0.2 m voxels in x / y over 51.2 x 51.2 m (0.1 m in z: SECOND needs its 41 z cells)
                sets += ["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -25.6, -3, 51.2, 25.6, 1]",
                         "DATA_CONFIG.DATA_PROCESSOR.2.VOXEL_SIZE", "[0.2, 0.2, 0.1]"]
            setting = f"Phase {phase}, KITTI {'0.2 x 0.2 x 0.1' if small else '0.05 x 0.05 x 0.1'} m, batch {1 if small else 8}"
            if not have or encoder not in backbones_3d.__all__:
                why = "no spconv-cu" if not have else f"OpenPCDet has no {encoder}"
                for amp in (False, True):
                    table.add(f"{name} pretraining step", f"{setting}, {'AMP' if amp else 'fp32'}",
                              lambda why=why: {"status": f"skipped: {why}"})
                continue
            cfg = load_cfg(rel, data, sets)
            train_set, batches, _, _ = batches_of(cfg, data, 1 if small else 8, 2, device)
            for amp in (False, True):
                def step(amp=amp):
                    model = seeded_model(cfg, train_set, device)
                    if phase == 2:
                        model.set_total_steps(100)
                    runner = runner_for(model, build_optimizer(model, cfg.OPTIMIZATION), amp, device,
                                        [CallbackHook(model.update_teacher)])
                    model.backbone_3d.compute_metrics = False  # an unlogged step
                    return timed_steps(runner, batches, device, 1 if small else 5)
                table.add(f"{name} pretraining step", f"{setting}, {'AMP' if amp else 'fp32'}", step)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["pillars", "quantizer", "pretraining"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but this torch has no CUDA", file=sys.stderr)
        return 2
    small = device.type == "cpu"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table()
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_kitti(Path(tmp))
        if "pillars" not in args.skip:
            check_pillars(table, data, device, small)
        if "quantizer" not in args.skip:
            check_quantizer(table, device, small)
        if "pretraining" not in args.skip:
            check_pretraining(table, data, device, small)
    table.print(f"{name} (torch {torch.__version__})")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
