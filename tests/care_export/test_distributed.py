"""Training on two CPU processes (torchrun, gloo) learns what one process learns with the same
global batch, and an interrupted distributed run resumes under torchrun."""

import os
import subprocess
import sys

import pytest
import torch
from ddp_worker import run
from helpers import ROOT

from care_export.checkpoint.format import load_checkpoint
from care_export.training.distributed import Group
from care_export.training.task import TaskData, TrainConfig
from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.errors import CareError

# Two processes sum the gradients of a batch in another order than one: the runs agree to float
# rounding, grown over a few dozen SGD steps.
REL_TOL = 1e-4


def torchrun(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_two_gloo_processes_learn_what_one_learns_and_resume(tmp_path):
    run(tmp_path / "single", 2)
    # The distributed run stops after task 0 (as an interrupted run leaves its checkpoint) and
    # is resumed, from the command line, under torchrun.
    torchrun("tests/ddp_worker.py", str(tmp_path / "ddp"), "1")
    assert len(read_checkpoint_manifest(tmp_path / "ddp")["tasks"]) == 1
    res = torchrun("-m", "care_export", "train", "--resume", str(tmp_path / "ddp"), "--quiet")
    assert res.stdout.count("checkpoint ") == 1, res.stdout  # rank 0 alone reports
    assert not list((tmp_path / "ddp").glob(".*tmp*")), "a temporary file was left behind"

    single, _ = load_checkpoint(tmp_path / "single")
    ddp, _ = load_checkpoint(tmp_path / "ddp")
    a, b = single.state_dict(), ddp.state_dict()
    assert a.keys() == b.keys()
    gaps = {k: float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a}
    worst = max(gaps, key=gaps.get)
    print(f"max relative gap {gaps[worst]:.2e} ({worst})")
    assert gaps[worst] <= REL_TOL, (worst, gaps[worst])
    ms, md = (
        read_checkpoint_manifest(tmp_path / "single")["metrics"],
        read_checkpoint_manifest(tmp_path / "ddp")["metrics"],
    )
    assert len(read_checkpoint_manifest(tmp_path / "ddp")["tasks"]) == len(md["top1"]) == 2
    assert all(abs(x - y) <= 100 / 12 for x, y in zip(ms["top1"], md["top1"])), (ms["top1"], md["top1"])


def test_more_processes_than_a_batch_holds_is_a_clear_error():
    """A rank with no part of a batch would wait for the others' gradients forever: refused
    before training, naming the counts."""
    images = list(range(3))
    for world, batch in ((4, 16), (2, 1)):
        with pytest.raises(CareError, match=f"{world} processes need batches of at least {world} images"):
            TaskData(images, images, TrainConfig(batch_size=batch), torch.Generator(), Group(0, world))
    TaskData(images, images, TrainConfig(batch_size=2), torch.Generator(), Group(0, 2))  # enough: no error


def test_an_items_own_seed_leaves_every_generator_as_it_was(monkeypatch):
    """Loading an item seeds its augmentation and restores torch's and Python's generators; GPU
    generators (which ``fork_rng(devices=[])`` does not restore) are never reseeded."""
    import random

    from torch.utils.data import Dataset

    from care_export.training.distributed import SeededItems

    class Draws(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return float(torch.rand(())), random.random()

    gpu_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", gpu_seeds.append)
    items = SeededItems(Draws(), seed=7)
    torch.default_generator.manual_seed(0)
    random.seed(0)
    first = items[(1, 5)]
    after = float(torch.rand(())), random.random()
    torch.default_generator.manual_seed(0)
    random.seed(0)
    assert (float(torch.rand(())), random.random()) == after  # both generators restored
    assert items[(1, 5)] == first and items[(2, 5)] != first  # the item's own seed decides its draws
    assert gpu_seeds == []
