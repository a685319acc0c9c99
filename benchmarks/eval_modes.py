"""Top-1 after every task of the demo sequence with the single pass and with the reference's
iterative prediction, both measured on the same model after each task.

    python benchmarks/eval_modes.py --work /tmp/eval-modes        # the demo's settings (about 5 min)
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from care_export.data.sources import TaskSequence, open_source  # noqa: E402
from care_export.model.config import MoEConfig  # noqa: E402
from care_export.model.iterative import prediction_scores  # noqa: E402
from care_export.training.continual import (  # noqa: E402
    BUILTIN_WEIGHTS,
    ContinualRun,
    build_care_vit,
    default_backbone,
    evaluate_recorded,
)
from care_export.training.task import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="checkpoint directory to write (must not exist)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--task-classes", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    backbone = default_backbone(BUILTIN_WEIGHTS)
    source = open_source("builtin", num_classes=args.classes, image_size=backbone.img_size)
    seq = TaskSequence.build(source.num_classes, args.task_classes, args.task_classes)
    model, weights, pre = build_care_vit(backbone, BUILTIN_WEIGHTS, MoEConfig(), progress=False)
    cfg = TrainConfig(epochs=args.epochs, batch_size=16)
    run = ContinualRun(args.work, model, seq, source, pre, cfg, limit=args.tasks, weights=weights)
    print(f"{'task':>4} {'single':>8} {'iterative':>10} {'iter s':>7}")
    for task in range(args.tasks):
        run.learn_next(progress=False)
        row = []
        for mode in ("single", "iterative"):
            t0 = time.perf_counter()
            top1, _, _ = evaluate_recorded(
                model,
                run.records,
                pre,
                48,
                "cpu",
                predict=partial(prediction_scores, model, mode=mode, scale=cfg.scale),
            )
            row.append((top1, time.perf_counter() - t0))
        print(f"{task:>4} {row[0][0]:>7.2f}% {row[1][0]:>9.2f}% {row[1][1]:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
