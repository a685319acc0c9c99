"""GPU latency of the exported artifact against the plain backbone and the eager PyTorch model.

Interleaved in one run on the same inputs, medians: the artifact and the plain backbone (exported
the same way) in ONNX Runtime's CUDA EP with I/O bound on the device, ``runtime.Session`` on the
same artifact (the wrapper's cost), and the PyTorch model on the GPU (reference forward, every
expert on every token, and the sparse eager forward). Needs a CUDA GPU, onnxruntime-gpu and
PyTorch with CUDA; builds a random ViT-B/16 B100-Inc3 checkpoint when none is given.

    python benchmarks/bench_gpu.py --work /tmp/gpu --tasks 301 --batch 1 8 32
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime.timing import median_times


def synth(ckpt: Path, tasks: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "care_export",
            "synth-ckpt",
            "-o",
            str(ckpt),
            "--backbone",
            "vit_base_patch16_224",
            "--init-cls",
            "100",
            "--increment",
            "3",
            "--tasks",
            str(tasks),
        ],
        check=True,
        capture_output=True,
    )


class BoundOrt:
    """A CUDA EP session whose input and output live on the GPU (no host copies per call)."""

    def __init__(self, path: Path, output: str):
        import onnxruntime as ort

        from runtime.backends.onnxrt import session_options

        self.sess = ort.InferenceSession(str(path), session_options(), providers=["CUDAExecutionProvider"])
        if self.sess.get_providers()[0] != "CUDAExecutionProvider":
            raise SystemExit("onnxruntime has no CUDA EP here")
        self.output = output

    def bind(self, x: np.ndarray) -> None:
        import onnxruntime as ort

        self.binding = self.sess.io_binding()
        self.x = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        self.binding.bind_ortvalue_input(self.sess.get_inputs()[0].name, self.x)
        self.binding.bind_output(self.output, "cuda", 0)

    def __call__(self) -> None:
        self.sess.run_with_iobinding(self.binding)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, help="an existing checkpoint (default: a random ViT-B/16 one)")
    ap.add_argument("--tasks", type=int, default=301)
    ap.add_argument("--capacity", type=int, default=301)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--eager-max-batch", type=int, default=8, help="largest batch for the eager PyTorch runs")
    args = ap.parse_args()

    import torch

    from care_export.checkpoint.format import load_checkpoint
    from care_export.export.writer import export_artifact, export_backbone
    from runtime import Session

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt or args.work / "ckpt"
    t0 = time.perf_counter()
    if not (ckpt / "manifest.json").exists():
        synth(ckpt, args.tasks)
    t1 = time.perf_counter()
    art, bb = args.work / "art", args.work / "backbone"
    if not (art / "manifest.json").exists():
        export_artifact(ckpt, art, args.capacity)
    t2 = time.perf_counter()
    bb_model = export_backbone(ckpt, bb)
    print(f"synth {t1 - t0:.1f} s, export {t2 - t1:.1f} s ({torch.cuda.get_device_name(0)})")

    engines = {
        "artifact (ORT CUDA EP)": BoundOrt(art / "model.onnx", "logits"),
        "backbone (ORT CUDA EP)": BoundOrt(bb_model, "features"),
    }
    session = Session(art, device="cuda", backend="onnxruntime", providers=["cuda"])
    model, _ = load_checkpoint(ckpt, verify=False)
    model = model.cuda().eval()

    print(f"{'batch':>5} {'engine':<28} {'median ms':>10} {'img/s':>8} {'/ backbone':>10}")
    for b in args.batch:
        x = np.random.default_rng(b).standard_normal((b, 3, 224, 224), dtype=np.float32)
        xt = torch.from_numpy(x).cuda()
        runs = {}
        for name, eng in engines.items():
            eng.bind(x)
            runs[name] = eng
        runs["runtime.Session.logits"] = lambda: session.logits(x)
        if b <= args.eager_max_batch:

            def eager(mode):
                def run():
                    with torch.no_grad():
                        model(xt, mode=mode)
                    torch.cuda.synchronize()

                return run

            runs["PyTorch eager, sparse"] = eager("sparse")
            runs["PyTorch eager, reference"] = eager("reference")
        med = median_times(runs, args.rounds)
        base = med["backbone (ORT CUDA EP)"]
        for name, t in med.items():
            print(f"{b:>5} {name:<28} {1e3 * t:>10.2f} {b / t:>8.0f} {t / base:>10.3f}")


if __name__ == "__main__":
    main()
