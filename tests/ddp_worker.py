"""One process of tests/care_export/test_distributed.py's torchrun runs: a tiny sequence, no dropout."""

import sys

from helpers import TINY

from care_export.model.config import MoEConfig
from care_export.training.continual import train_sequence
from care_export.training.distributed import from_environment
from care_export.training.task import TrainConfig

DATA = dict(num_classes=12, train_per_class=10, test_per_class=3)
NO_DROPOUT = MoEConfig(dropout=0.0)  # dropout masks are drawn per process: they could not match
CFG = TrainConfig(epochs=2, batch_size=8)


def run(out, tasks: int, group=None):
    kwargs = {} if group is None else {"group": group}
    return train_sequence(
        out,
        builtin=DATA,
        init_cls=4,
        increment=4,
        tasks=tasks,
        backbone=TINY,
        weights=None,
        moe=NO_DROPOUT,
        cfg=CFG,
        progress=False,
        **kwargs,
    )


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), from_environment())
