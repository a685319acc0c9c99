"""The main job on the built-in dataset, end to end on a CPU in a few minutes.

1. Pre-train a small ViT on built-in classes that the sequence never uses (cached on disk, so
   only the first run pays for it): the stand-in for ImageNet pre-training.
2. Learn 9 of the 10 tasks of a 100-class built-in sequence with CaRE (BR-MoE in every block,
   frozen backbone) and print the accuracy after every task.
3. Export the checkpoint as a static ONNX graph with room for 301 tasks, and prove it equal to
   PyTorch (max |dlogit|, top-1 and routing agreement on random inputs).
4. Learn task 10 and give it to the running artifact in place (no re-export), then classify the
   held-out images with ``runtime.Session`` (no PyTorch) and check parity again.

    python examples/demo.py                     # defaults: M=2 routers, K=3 experts
    python examples/demo.py -M 1 -K 1 --out demo-m1k1/
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from care_export.checkpoint import read_manifest
from care_export.config import MoEConfig
from care_export.continual import resume_sequence, train_sequence
from care_export.datasets import LabelledImages, source_from_dict
from care_export.evaluate import Metrics
from care_export.export.writer import export_artifact
from care_export.parity import run_parity
from care_export.train import TrainConfig
from runtime import Session

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


def held_out_images(ckpt: Path) -> tuple[list, np.ndarray]:
    """The test images of every learned class (uint8 RGB arrays) and their global labels."""
    m = read_manifest(ckpt)
    seq = m["sequence"]
    classes = range(sum(t["classes"] for t in m["tasks"]))
    data = LabelledImages(source_from_dict(seq["data"]), "test", seq["class_order"], classes, np.asarray)
    images, labels = zip(*(data[i] for i in range(len(data))))
    return list(images), np.array(labels)


def parity(ckpt: Path, artifact: Path) -> None:
    report = run_parity(ckpt, artifact, samples=256)
    print("\n".join("  " + line for line in report.lines()))
    report.check()  # raises (AtolError / RoutingError) outside tolerance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="directory to create for checkpoint and artifact (default: temporary)")
    ap.add_argument("-M", "--topk-routers", type=int, default=2)
    ap.add_argument("-K", "--topk-experts", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=DEMO_TRAIN.epochs)
    ap.add_argument("--capacity", type=int, default=301, help="tasks the exported graph has room for")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="care-demo-"))
    ckpt, artifact = out / "ckpt", out / "model"
    moe = MoEConfig(topk_routers=args.topk_routers, topk_experts=args.topk_experts)
    cfg = TrainConfig(epochs=args.epochs, batch_size=DEMO_TRAIN.batch_size)
    t0 = time.perf_counter()

    print("== 1-2. pre-train (cached) and learn 9 tasks")
    learn_builtin_sequence(ckpt, 9, moe, cfg, args.device, progress=not args.quiet)

    print(f"\n== 3. export with room for {args.capacity} tasks, and parity against PyTorch")
    export_artifact(ckpt, artifact, args.capacity)
    parity(ckpt, artifact)

    print("\n== 4. learn task 10, add it to the running artifact in place")
    session = Session(artifact, device="cpu")
    resume_sequence(ckpt, device=args.device, progress=not args.quiet)
    before = session.num_tasks
    session.add_task(ckpt, persist=True)
    print(f"  {session!r}: {before} -> {session.num_tasks} tasks without re-export")
    parity(ckpt, artifact)

    images, labels = held_out_images(ckpt)
    pred = session.predict(images)
    runtime_acc = 100 * float((pred.classes[:, 0] == labels).mean())
    metrics = Metrics.from_dict(read_manifest(ckpt)["metrics"])
    print(f"\nCaRE on the built-in sequence (M={moe.topk_routers}, K={moe.topk_experts}), top-1 % after each task:")
    print(metrics.table())
    print(f"runtime.Session top-1 on {len(labels)} held-out images of all {session.num_classes} classes: "
          f"{runtime_acc:.2f}% (PyTorch: {metrics.a_last:.2f}%)")
    print(f"checkpoint {ckpt}, artifact {artifact}; wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
