"""Latency of the iterative-prediction artifact against the single-pass one, at several task
counts: both exported from the same random checkpoint with capacity = tasks, ONNX Runtime CPU,
interleaved, medians.

    python benchmarks/bench_iterative.py --work /tmp/bench-iter --tasks 5,20,60
"""

from __future__ import annotations

import argparse
from pathlib import Path

from care_export.checkpoint.format import save_checkpoint
from care_export.checkpoint.synth import synth_model, task_sizes
from care_export.export.parity import ort_session, random_images
from care_export.export.writer import export_artifact
from care_export.model.config import MoEConfig, backbone_config
from runtime.layout import INPUT, LOGITS, SCORES
from runtime.preprocess import Preprocessing
from runtime.timing import median_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tasks", default="5,20,60")
    ap.add_argument("--backbone", default="vit_tiny_patch16_224")
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    counts = [int(t) for t in args.tasks.split(",")]
    cfg = backbone_config(args.backbone, img_size=args.img, patch_size=16, depth=args.depth)
    ckpt = args.work / "ckpt"
    if not (ckpt / "manifest.json").exists():
        model = synth_model(cfg, MoEConfig(), task_sizes(10, 3, max(counts)), seed=0)
        save_checkpoint(model, ckpt, preprocessing=Preprocessing.for_input(args.img, (0.5,) * 3, (0.5,) * 3))
    x = random_images(args.batch, args.img)
    print(
        f"{args.backbone} {args.img}px depth {args.depth}, batch {args.batch}, ONNX Runtime CPU, "
        f"median of {args.rounds} interleaved runs"
    )
    print(f"{'tasks':>5} {'single ms':>10} {'iterative ms':>13} {'ratio':>7}")
    for t in counts:
        arts = {}
        for predict in ("single", "iterative"):
            out = args.work / f"{predict}-{t}"
            if not (out / "manifest.json").exists():
                export_artifact(ckpt, out, t, tasks=t, predict=predict)
            arts[predict] = out
        single, iterative = (ort_session(arts[p] / "model.onnx") for p in ("single", "iterative"))
        times = median_times(
            {
                "single": lambda: single.run([LOGITS], {INPUT: x}),
                "iterative": lambda: iterative.run([SCORES], {INPUT: x}),
            },
            args.rounds,
            warmup=2,
        )
        print(
            f"{t:>5} {1000 * times['single']:>10.2f} {1000 * times['iterative']:>13.2f} "
            f"{times['iterative'] / times['single']:>6.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
