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
    whole = tmp_path / "whole.pth"
    torch.save({"model_state": {f"layer_{i}.weight": torch.zeros(2) for i in range(50)}}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:3000])  # a truncated checkpoint: its reason, in whole words
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(cut)
    reason = str(err.value).split("not a torch.save file (", 1)[1]
    assert reason.endswith(")") and "\n" not in reason
    assert all(word.isascii() for word in reason.split()) and (len(reason) < 130)
    words = reason[:-1].removesuffix(" ...").split()
    assert words and set(words) <= set(str(err.value.__cause__).split())  # whole words, none cut in the middle


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


def test_a_full_disk_keeps_the_previous_file_and_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    import errno

    import torch
    from pcdet_ext.utils.checkpoint import atomic_save, load_checkpoint
    from pcdet_ext.utils.console import DiskFull, disk_full_is_one_line
    path = atomic_save({"a": torch.ones(2)}, tmp_path / "resume_state.pth")

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFull):
        with disk_full_is_one_line():
            atomic_save({"a": torch.zeros(2)}, path)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: No space left on device writing {path}; free space there and run the same command again to "
        "continue from the last saved state"]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2)) and sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(PermissionError):  # other errors are not disk-full messages
        with disk_full_is_one_line():
            raise PermissionError(errno.EACCES, "Permission denied")
