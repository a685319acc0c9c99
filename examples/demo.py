"""The main job on the built-in dataset, end to end on a CPU in a few minutes.

1. Pre-train a small ViT on built-in classes that the sequence never uses (cached on disk, so
   only the first run pays for it): the stand-in for ImageNet pre-training.
2. Learn 100 built-in classes in 10 tasks with CaRE (BR-MoE in every block, frozen backbone).
3. Print the accuracy after every task over all classes seen so far.

    python examples/demo.py                     # defaults: M=2 routers, K=3 experts
    python examples/demo.py -M 1 -K 1 --out ckpt-m1k1/
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from care_export.checkpoint import read_manifest
from care_export.config import MoEConfig
from care_export.continual import train_sequence
from care_export.evaluate import Metrics
from care_export.train import TrainConfig

# Scaled down from the reference's 20 epochs and batch 16 so that the demo runs on two CPU cores.
DEMO_CLASSES = 100
DEMO_TASK_CLASSES = 10
DEMO_TRAIN = TrainConfig(epochs=4, batch_size=16)


def learn_builtin_sequence(out: Path, tasks: int = 10, moe: MoEConfig = MoEConfig(), cfg: TrainConfig = DEMO_TRAIN,
                           device: str = "auto", progress: bool = True) -> Path:
    """Pre-train (cached) and learn ``tasks`` tasks of the built-in sequence into checkpoint ``out``."""
    return train_sequence(out, data="builtin", builtin=dict(num_classes=DEMO_CLASSES), init_cls=DEMO_TASK_CLASSES,
                          increment=DEMO_TASK_CLASSES, tasks=tasks, weights="builtin-pretrained", moe=moe, cfg=cfg,
                          device=device, progress=progress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="checkpoint directory to create (default: a new temporary one)")
    ap.add_argument("--tasks", type=int, default=10, help="tasks to learn (of 10)")
    ap.add_argument("-M", "--topk-routers", type=int, default=2)
    ap.add_argument("-K", "--topk-experts", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=DEMO_TRAIN.epochs)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="care-demo-")) / "ckpt"
    moe = MoEConfig(topk_routers=args.topk_routers, topk_experts=args.topk_experts)
    cfg = TrainConfig(epochs=args.epochs, batch_size=DEMO_TRAIN.batch_size)
    t0 = time.perf_counter()
    ckpt = learn_builtin_sequence(out, args.tasks, moe, cfg, args.device, progress=not args.quiet)
    wall = time.perf_counter() - t0

    metrics = Metrics.from_dict(read_manifest(ckpt)["metrics"])
    print(f"\nCaRE on the built-in sequence (M={moe.topk_routers}, K={moe.topk_experts}), top-1 % after each task:")
    print(metrics.table())
    print(f"checkpoint: {ckpt}  (wall time {wall:.0f} s, pre-training included when not cached)")
    print(f"next: export it with `care-export onnx {ckpt} --tasks 301 -o model/` and run it with runtime.Session "
          f"(the exporter and the runtime are not part of this demo yet)")


if __name__ == "__main__":
    main()
