"""The wrapper's overhead: ``Session.predict`` against a bare ``onnxruntime.InferenceSession.run``
on the same artifact, interleaved in one run, medians.

Columns: ``predict`` on float32 NCHW input (preprocessing excluded: the session's own cost plus
that of holding the growth tensors as inputs), ``predict`` on uint8 HWC images (preprocessing
included), and ``logits``. The bare session is the artifact's model.onnx as written, weights as
constants, fed with numpy and asked for the logits only.

    python benchmarks/bench_session.py                    # builds a small artifact first
    python benchmarks/bench_session.py model/ --batch 1 8 --threads 2
    python benchmarks/bench_session.py model/ --device cuda --providers cuda
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from runtime.timing import median_times

# Idle time before each timed call: the two sessions' ONNX Runtime thread pools would otherwise
# still spin into each other's calls (runtime.timing.median_times).
PAUSE_S = 0.05


def build_artifact(directory: Path, tasks: int, capacity: int) -> Path:
    """A random ViT-Ti/16 (224 px, 12 blocks) checkpoint of ``tasks`` tasks, exported for ``capacity``."""
    ckpt, art = directory / "ckpt", directory / "art"
    cli = [sys.executable, "-m", "care_export"]
    subprocess.run(
        cli
        + [
            "synth-ckpt",
            "-o",
            str(ckpt),
            "--backbone",
            "vit_tiny_patch16_224",
            "--init-cls",
            "10",
            "--increment",
            "3",
            "--tasks",
            str(tasks),
        ],
        check=True,
        capture_output=True,
    )
    from care_export.export.writer import export_artifact

    export_artifact(ckpt, art, capacity)
    return art


def bare_session(art: Path, providers: list[str], threads: int | None):
    import onnxruntime as ort

    from runtime.backends.onnxrt import session_options

    opts = session_options(threads)
    options = [{"use_tf32": 0} if p == "CUDAExecutionProvider" else {} for p in providers]
    return ort.InferenceSession(str(art / "model.onnx"), opts, providers=providers, provider_options=options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path, help="artifact directory (default: build a small one)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds per batch size")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads (default: all cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--providers", nargs="+", default=None, help="ONNX Runtime providers (short names)")
    ap.add_argument("--tasks", type=int, default=10, help="tasks of the built artifact")
    ap.add_argument("--capacity", type=int, default=301, help="capacity of the built artifact")
    args = ap.parse_args()

    from runtime import Session

    with tempfile.TemporaryDirectory() as tmp:
        art = args.artifact or build_artifact(Path(tmp), args.tasks, args.capacity)
        session = Session(art, device=args.device, threads=args.threads, providers=args.providers)
        bare = bare_session(art, session.providers, args.threads)
        size = session.preprocessing.input_size
        print(
            f"artifact {art}: {session.num_tasks}/{session.capacity} tasks, {size} px; "
            f"{session.backend} {session.providers[0]}, threads {args.threads or 'all'}"
        )
        rng = np.random.default_rng(0)
        print(
            f"{'batch':>5} {'bare run ms':>12} {'predict ms':>11} {'ratio':>6} {'predict uint8 ms':>17} "
            f"{'ratio':>6} {'logits ms':>10} {'ratio':>6}"
        )
        for batch in args.batch:
            x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            images = rng.integers(0, 256, (batch, size + size // 7, size + size // 5, 3), dtype=np.uint8)
            calls = {
                "bare": lambda: bare.run(["logits"], {"images": x}),
                "predict": lambda: session.predict(x),
                "predict_uint8": lambda: session.predict(images),
                "logits": lambda: session.logits(x),
            }
            med = {k: t * 1e3 for k, t in median_times(calls, args.repeats, pause_s=PAUSE_S).items()}
            b = med["bare"]
            print(
                f"{batch:>5} {b:>12.2f} {med['predict']:>11.2f} {med['predict'] / b:>6.3f} "
                f"{med['predict_uint8']:>17.2f} {med['predict_uint8'] / b:>6.3f} {med['logits']:>10.2f} "
                f"{med['logits'] / b:>6.3f}"
            )


if __name__ == "__main__":
    main()
