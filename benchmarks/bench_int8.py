"""What makes ONNX Runtime's INT8 path fast on this CPU: W8A8 variants of one artifact's graph
against its FP32 graph, interleaved in one run, medians at batch 1 and 8.

Variants (every backbone MatMul / Gemm / Conv outside the routing path, growth tensors int8 as
``care-export quantize`` stores them, per-channel symmetric int8 weights, min-max ranges from a
few random images):

- ``growth-int8``: only the growth tensors int8, the backbone float32 (what every weight-only
  backbone layer computes);
- ``s8-in``: int8 activations, Q/DQ on the layer inputs only (what ``care-export quantize``
  writes);
- ``s8-inout``: also the layer outputs (ONNX Runtime's default placement);
- ``u8-in`` / ``u8-inout``: uint8 activations (asymmetric) instead.

For each it prints the ops ONNX Runtime's optimised graph runs (``MatMulIntegerToFloat``: the
DQ -> MatMul pattern with float output fused into an int8 GEMM; ``QLinearMatMul``: with a Q
after it too), latency over FP32, max |dlogit| on the timing batch, and the process's peak RSS.
An INT8 artifact already written can be timed against its source too (``--artifact-int8``; its
ratio is over the bare FP32 graph's, ``artifact-fp32`` gives the source's through ``runtime.Session``).

    python benchmarks/bench_int8.py FP32_ART [--variants s8-in,u8-in] [--artifact-int8 INT8_ART] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import resource
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from calibration.graph import load_artifact_model, save_model
from calibration.int8 import QUANTIZED_OPS, ListReader, routing_fp16, store_growth_int8, weight_nodes
from calibration.routing_nodes import routing_nodes
from runtime.artifact import Artifact
from runtime.backends.onnxrt import session_options
from runtime.layout import INPUT, LOGITS
from runtime.timing import median_times

VARIANTS = ("s8-in", "s8-inout", "u8-in", "u8-inout")
PAUSE_S = 0.05  # ORT's thread pools spin after a call (runtime.timing.median_times)


def quantize_variant(src: Path, dst: Path, targets: set[str], variant: str, x: np.ndarray) -> None:
    u8, inputs_only = variant.startswith("u8"), variant.endswith("-in")
    extra = {"ActivationSymmetric": not u8, "WeightSymmetric": True}
    if inputs_only:
        extra["OpTypesToExcludeOutputQuantization"] = list(QUANTIZED_OPS)
    quantize_static(
        str(src),
        str(dst),
        ListReader(INPUT, [x[i : i + 1] for i in range(len(x))]),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_quantize=sorted(targets),
        per_channel=True,
        activation_type=QuantType.QUInt8 if u8 else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options=extra,
    )


def fused_ops(optimized: Path) -> dict[str, int]:
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    return {k: c for k, c in sorted(ops.items()) if any(w in k for w in ("MatMul", "Conv", "Gemm", "Quant"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path, help="an FP32 artifact")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--artifact-int8", dest="int8", type=Path, help="an INT8 artifact of it to time too")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    art = Artifact(args.artifact)
    rng = np.random.default_rng(0)
    s = art.dims.img_size
    batch = rng.normal(size=(8, 3, s, s)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        tmp = Path(tmp)
        model = load_artifact_model(art)
        growth = {n for n, t in art.tensors.items() if t.role != "backbone"}
        targets = weight_nodes(model, growth) - routing_nodes(model)
        save_model(model, tmp / "fp32.onnx")
        store_growth_int8(model, growth, routing_fp16(growth), {})
        save_model(model, tmp / "growth-int8.onnx")
        del model
        names = ["fp32", "growth-int8"]
        for v in [v for v in args.variants.split(",") if v]:
            if v not in VARIANTS:
                raise SystemExit(f"error: unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
            quantize_variant(tmp / "growth-int8.onnx", tmp / f"{v}.onnx", targets, v, batch[:4])
            names.append(v)
        sessions = {}
        for n in names:
            opts = session_options(args.threads, quiet=True)
            opts.optimized_model_filepath = str(tmp / f"{n}.opt.onnx")
            sessions[n] = ort.InferenceSession(str(tmp / f"{n}.onnx"), opts, providers=["CPUExecutionProvider"])
            print(f"{n:12s} runs {fused_ops(tmp / f'{n}.opt.onnx')}")
        runs = {n: (lambda x, se=se: se.run([LOGITS], {INPUT: x})[0]) for n, se in sessions.items()}
        if args.int8:
            from runtime import Session

            for n, d in (("artifact-fp32", args.artifact), ("artifact-int8", args.int8)):
                runs[n] = Session(d, device="cpu", threads=args.threads).logits
        for b in (1, 8):
            t = median_times(
                {n: (lambda f=f: f(batch[:b])) for n, f in runs.items()}, args.runs, warmup=1, pause_s=PAUSE_S
            )
            print(f"batch {b}: " + "  ".join(f"{n} {1e3 * v:.0f} ms ({v / t['fp32']:.3f})" for n, v in t.items()))
        ref = runs["fp32"](batch)
        learned = np.isfinite(ref)
        for n in names[1:]:
            print(f"{n:12s} max |dlogit| {np.abs(runs[n](batch) - ref)[learned].max():.3g}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
