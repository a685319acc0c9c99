"""What one extra node costs ONNX Runtime on CPU: a chain of N small nodes (the size of a BR-MoE
routing tensor at batch 1) timed as one graph, in microseconds per node, per op type and
thread count, the op types interleaved. It says how much of the artifact's time over the plain backbone its extra nodes
(about 90 per block) can explain, against what they read and compute.

    python benchmarks/bench_node_overhead.py --nodes 1000 --shape 1 10 20
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from runtime.backends.onnxrt import session_options
from runtime.timing import median_times

OPS = ("Add", "Relu", "Log", "Softmax")  # Add takes a constant, the others one input
PAUSE_S = 0.0


def chain(nodes: int, op: str, shape: list[int]) -> bytes:
    """``nodes`` nodes of ``op`` in a chain; ``Add`` adds a constant, the others take one input."""
    graph_nodes, prev = [], "x"
    for i in range(nodes):
        inputs = [prev, "c"] if op == "Add" else [prev]
        graph_nodes.append(helper.make_node(op, inputs, [f"y{i}"]))
        prev = f"y{i}"
    inits = [onnx.numpy_helper.from_array(np.full(shape, 1e-3, np.float32), "c")] if op == "Add" else []
    graph = helper.make_graph(
        graph_nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 10, 20])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    x = np.ones(args.shape, np.float32)
    print(f"ORT {ort.__version__}, a chain of {args.nodes} nodes on {args.shape}, median of {args.rounds}")
    print(f"{'threads':>7} {'op':8} {'us per node':>11}")
    for threads in args.threads:
        opts = session_options(threads, quiet=True)
        # No fusion or folding: every node of the chain runs.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        calls = {}
        for op in OPS:
            sess = ort.InferenceSession(chain(args.nodes, op, args.shape), opts, providers=["CPUExecutionProvider"])
            calls[op] = lambda sess=sess: sess.run(None, {"x": x})
        # Calls back to back, as a graph's nodes run: an idle pause before each call (the other
        # benchmarks' guard against spinning thread pools) adds a wake-up of 0.3-0.5 ms per call here,
        # which would read as per-node cost.
        for op, seconds in median_times(calls, args.rounds, warmup=1).items():
            print(f"{threads:>7} {op:8} {seconds * 1e6 / args.nodes:>11.2f}")


if __name__ == "__main__":
    main()
