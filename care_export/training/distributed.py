"""Training on several processes (``torchrun``): DistributedDataParallel, gloo on CPUs, NCCL on
GPUs, and what makes a run on N processes learn what one process learns with the same global
batch.

* Every process holds the whole model and the same randomness; the data of each global batch is
  split between them (:class:`GlobalBatches`), and each sample's augmentation is drawn from a
  seed of its own (:class:`SeededItems`), so it does not depend on which process loads it.
* The gradients are averaged by DistributedDataParallel; a rank's loss is weighted by its share
  of the global batch, so the average is the global batch's mean loss.
* The class statistics for alignment are computed from every rank's features (:meth:`Group.gather_rows`).
* Rank 0 alone evaluates and writes the checkpoint; the others wait for it.
"""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler


@dataclass(frozen=True)
class Group:
    """The processes of a run: ``world`` of them, this one ``rank``; one process by default."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: its own GPU (``LOCAL_RANK``) when several share a machine."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_rows(self, rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's ``rows`` (n_r, ...) with their sample indices (n_r,), ordered by index."""
        if not self.distributed:
            return rows, index
        count = torch.tensor([len(index)], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        most = int(max(c.item() for c in counts))
        pad = most - len(index)
        rows_p = torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))])
        index_p = torch.cat([index.to(rows.device), index.new_full((pad,), -1).to(rows.device)])
        all_rows = [torch.empty_like(rows_p) for _ in range(self.world)]
        all_index = [torch.empty_like(index_p) for _ in range(self.world)]
        dist.all_gather(all_rows, rows_p)
        dist.all_gather(all_index, index_p)
        rows = torch.cat([r[: int(c.item())] for r, c in zip(all_rows, counts)])
        index = torch.cat([i[: int(c.item())] for i, c in zip(all_index, counts)])
        order = index.argsort()
        return rows[order], index[order]

    def broadcast_(self, tensors) -> None:
        """Overwrite ``tensors`` with rank 0's."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t.data, 0)


SINGLE = Group()


def from_environment() -> Group:
    """The group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), its process
    group initialised: NCCL where CUDA is available, else gloo. One process without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(dist.destroy_process_group)
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class GlobalBatches(Sampler):
    """Batches of ``batch_size`` samples in a fresh random order every epoch, drawn from
    ``generator`` (the same on every rank); each rank loads its share ``batch[rank::world]`` as
    ``(index, salt)`` keys for :class:`SeededItems`. A last batch smaller than the number of
    ranks is left out when there are several (a rank would have nothing to learn from)."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator, group: Group = SINGLE):
        self.size, self.batch_size, self.generator, self.group = size, batch_size, generator, group

    def global_sizes(self) -> list[int]:
        sizes = [min(self.batch_size, self.size - k) for k in range(0, self.size, self.batch_size)]
        return [s for s in sizes if s >= self.group.world]

    def __len__(self) -> int:
        return len(self.global_sizes())

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator).tolist()
        salt = int(torch.randint(2**62, (1,), generator=self.generator))
        for start, size in zip(range(0, self.size, self.batch_size), self.global_sizes()):
            batch = order[start : start + size]
            yield [(i, salt) for i in batch[self.group.rank :: self.group.world]]


class SeededItems(Dataset):
    """``data[index]`` with its random augmentation drawn from a seed of its own, ``(seed, salt,
    index)``, torch's CPU and Python's generators restored afterwards. Only the CPU generator is
    seeded: ``torch.manual_seed`` would also reseed (lazily) every GPU generator, which
    ``fork_rng(devices=[])`` does not restore, and costs a formatted stack per call."""

    def __init__(self, data: Dataset, seed: int):
        self.data, self.seed = data, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]):
        index, salt = key
        seed = hash((self.seed, salt, index)) & (2**63 - 1)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            try:
                return self.data[index]
            finally:
                random.setstate(state)


class ShardedIndices(Sampler):
    """``range(size)[rank::world]``: a rank's part of a data set read once, in order."""

    def __init__(self, size: int, group: Group = SINGLE):
        self.indices = list(range(size))[group.rank :: group.world]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
