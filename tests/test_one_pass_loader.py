"""one_pass_loader: a training loader's steps as one pass of back-to-back shuffled epochs, its workers
started once (cycling a few-frame set epoch by epoch restarted them every few steps)."""
import functools
import os
import uuid

import pytest
import torch

from pcdet_ext.engine.startup.builders import one_pass_loader


class Frames(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return i


def collate(items):
    return torch.tensor(items)


def mark_start(folder, worker_id):
    (folder / f"{worker_id}-{os.getpid()}-{uuid.uuid4().hex}").touch()


def test_one_pass_is_shuffled_epochs_back_to_back_with_workers_started_once(tmp_path):
    loader = torch.utils.data.DataLoader(Frames(), batch_size=2, shuffle=True, num_workers=2, collate_fn=collate,
                                         worker_init_fn=functools.partial(mark_start, tmp_path))
    steps = 10  # 20 frames: four epochs of the 5-frame set
    torch.manual_seed(0)
    batches = list(one_pass_loader(loader, steps))
    assert len(batches) == steps and all(len(b) == 2 for b in batches)
    order = torch.cat(batches).tolist()
    epochs = [order[i:i + 5] for i in range(0, 20, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs)  # every frame once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    assert len(list(tmp_path.iterdir())) == 2  # each worker started once (collate and seeding kept)


def test_refuses_loaders_it_would_change_the_meaning_of():
    ordered = torch.utils.data.DataLoader(Frames(), batch_size=2, shuffle=False)
    with pytest.raises(ValueError, match="expected a shuffled training loader"):
        one_pass_loader(ordered, 4)
    with pytest.raises(ValueError, match="steps 0"):
        one_pass_loader(torch.utils.data.DataLoader(Frames(), batch_size=2, shuffle=True), 0)
