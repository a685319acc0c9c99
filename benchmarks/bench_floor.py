"""The floor under any exact float32 BR-MoE graph: the plain backbone plus the arithmetic the
BR-MoE cannot skip, with no routing at all, timed against the plain backbone and the artifact.

Per block the floor graph adds to the plain backbone only (1) every slot's expert down projection
on the CLS token (the artifact's own ``experts.down``, capacity * r * d weights read once per
call: the perceptors and routers of every task need it), and (2) the token path at its size, the
M*K selected experts and the shared expert (M*K*r + r_s hidden units for every token; fixed random
weights here), its ReLU and the one Add that joins the residual stream. No LayerNorm of the
experts, no biases, no perceptors, routers or TopK, no weight gather: what the artifact spends
above the floor is its routing, what the floor spends above the backbone no rewrite of the
routing removes.

    python benchmarks/bench_floor.py model/ --batch 1 8 --rounds 15

``model/``: an artifact directory (any capacity; the graphs are built in a temporary directory
beside hard links to its weight files, or copies). Prints per batch size the median of each graph (interleaved,
the order rotating), the ratios, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from care_export.export import graph as G
from runtime.backends.onnxrt import session_options
from runtime.layout import FEATURES, INPUT, Dims, layout
from runtime.timing import median_times

PAUSE_S = 0.05  # ORT's thread pool spins after a call (runtime/timing.py)


def floor_model(dims: Dims, seed: int = 0) -> onnx.ModelProto:
    """The plain backbone plus, per block, the CLS down projection over every slot and the token path."""
    rng = np.random.default_rng(seed)
    d = dims.embed_dim
    m, k = G.routing_widths(dims)
    hidden = m * k * dims.expert_dim + dims.shared_dim
    g = G.Builder(layout(dims))
    s = G._Shared(g, dims, moe=False)
    x = G.embed(g, dims, s, INPUT)
    for i in range(dims.depth):
        g.scope = f"block{i}"
        xa = G.attention(g, dims, i, x)
        g.scope = f"block{i}/moe/cls"
        cls = g.op("Gemm", g.op("Gather", xa, g.i64(0), axis=1), g.weight(f"moe.{i}.experts.down"), transB=1)
        # Consumed (else ORT drops it) by a (B, 1, 1) term in the token path's hidden units.
        cls = g.op("Unsqueeze", g.op("ReduceSum", cls, g.i64([-1]), keepdims=1), g.i64([1]))
        g.scope = f"block{i}/moe/experts"
        down = g.const(rng.standard_normal((d, hidden)) * 0.02)
        up = g.const(rng.standard_normal((hidden, d)) * 0.02)
        moe = g.op("MatMul", g.op("Relu", g.op("Add", g.op("MatMul", xa, down), cls)), up)
        g.scope = f"block{i}"
        x = g.op("Add", g.op("Add", xa, G.mlp(g, dims, i, xa, G.MIN_OPSET)), moe)
    g.nodes.append(helper.make_node("Identity", [G.features(g, x)], [FEATURES], name="head/features"))
    image = helper.make_tensor_value_info(
        INPUT, TensorProto.FLOAT, ["batch", dims.in_chans, dims.img_size, dims.img_size]
    )
    out = helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", d])
    return G.finish(g, "floor", [image], [out], G.MIN_OPSET)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import onnxruntime as ort

    if not (args.artifact / "manifest.json").is_file():
        raise SystemExit(f"error: {args.artifact} is not an artifact directory (no manifest.json)")
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    dims = Dims.from_dict(manifest["dims"])
    with tempfile.TemporaryDirectory(prefix="care-floor-") as tmp:
        work = Path(tmp)
        for f in args.artifact.iterdir():
            if f.suffix == ".bin":  # ORT refuses external data behind a symbolic link
                try:
                    os.link(f, work / f.name)
                except OSError:  # another file system
                    shutil.copyfile(f, work / f.name)
        graphs = {"backbone": G.build_model(dims, layout(dims), moe=False), "floor": floor_model(dims)}
        for name, model in graphs.items():
            onnx.save(model, work / f"{name}.onnx")
        paths = {**{n: work / f"{n}.onnx" for n in graphs}, "artifact": args.artifact / "model.onnx"}
        opts = session_options(args.threads, quiet=True)
        sessions = {n: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
    print(
        f"capacity {dims.capacity}, ORT {ort.__version__}, {args.threads} threads, median of {args.rounds} rounds, "
        "interleaved"
    )
    print(f"{'batch':>5} {'backbone ms':>11} {'floor ms':>9} {'artifact ms':>11} {'floor x':>8} {'artifact x':>10}")
    rng = np.random.default_rng(0)
    for batch in args.batch:
        x = rng.standard_normal((batch, dims.in_chans, dims.img_size, dims.img_size), dtype=np.float32)
        calls = {n: (lambda sess=sess: sess.run(None, {INPUT: x})) for n, sess in sessions.items()}
        t = median_times(calls, args.rounds, warmup=2, pause_s=PAUSE_S)
        b = t["backbone"]
        print(
            f"{batch:>5} {b * 1e3:>11.1f} {t['floor'] * 1e3:>9.1f} {t['artifact'] * 1e3:>11.1f} "
            f"{t['floor'] / b:>8.3f} {t['artifact'] / b:>10.3f}",
            flush=True,
        )
    print(
        f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (all three loaded)"
    )


if __name__ == "__main__":
    main()
