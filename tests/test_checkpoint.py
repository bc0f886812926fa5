"""weights_only loading of OpenPCDet-style checkpoints and atomic saves."""
import os

import numpy as np
import pytest
import torch

from pcdet_ext.utils import checkpoint as ck


def onecycle_like_state():
    return {"epoch": 3, "it": 120, "model_state": {"w": torch.ones(2)},
            "optimizer_state": {"param_groups": [{"lr": np.float64(0.003), "betas": (np.float64(0.95), 0.99),
                                                  "wd": np.float32(0.01), "step": np.int64(5)}]},
            "version": "pcdet+0.6.0"}


def test_numpy_scalars_load_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint_epoch_3.pth"
    torch.save(onecycle_like_state(), path)
    ck.allow_numpy_scalars()
    loaded = torch.load(path, weights_only=True)  # what OpenPCDet's loaders do by default on torch >= 2.6
    assert loaded["optimizer_state"]["param_groups"][0]["lr"] == pytest.approx(0.003)
    assert ck.load_checkpoint(path)["it"] == 120


def test_arbitrary_objects_stay_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"array": np.arange(3)}, path)  # arrays are not on the allow-list
    with pytest.raises(ck.CheckpointError, match=r"evil.pth: it holds pickled Python objects \(numpy") as err:
        ck.load_checkpoint(path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ck.CheckpointError, match="junk.pth: not a torch.save file"):
        ck.load_checkpoint(junk)


def test_model_state_of_says_what_the_file_holds(tmp_path):
    state = {"epoch": 3, "model_state": {"vfe.w": torch.zeros(1), "dense_head.b": torch.zeros(1)}}
    assert ck.model_state_of(state, "a.pth") is state["model_state"]
    with pytest.raises(ck.CheckpointError, match=r"--rq_ckpt a.pth: holds an OpenPCDet checkpoint, epoch 3 with "
                                                 r"modules \['dense_head', 'vfe'\]; expected RQ"):
        ck.model_state_of(state, "a.pth", "--rq_ckpt", needs_prefix="rq_bottleneck.", expected="RQ")
    with pytest.raises(ck.CheckpointError, match="holds a list, not a checkpoint dict"):
        ck.model_state_of([1], "a.pth")


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ck.load_checkpoint(tmp_path / "nope.pth")


def test_atomic_save_crash_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "best.pth"
    ck.atomic_save({"v": 1}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert sorted(os.listdir(path.parent)) == ["best.pth"]  # no temp file left behind
