"""What one extra node costs ONNX Runtime on CPU: a chain of N small nodes (the size of a BR-MoE
routing tensor at batch 1) timed as one graph, in microseconds per node, per op type and
thread count. It says how much of the artifact's time over the plain backbone its extra nodes
(about 90 per block) can explain, against what they read and compute.

    python benchmarks/bench_node_overhead.py --nodes 1000 --shape 1 10 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

UNARY = ("Relu", "Log", "Softmax")


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
        for op in ("Add",) + UNARY:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.log_severity_level = 3
            # No fusion or folding: every node of the chain runs.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(chain(args.nodes, op, args.shape), opts, providers=["CPUExecutionProvider"])
            sess.run(None, {"x": x})
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            print(f"{threads:>7} {op:8} {statistics.median(times) * 1e6 / args.nodes:>11.2f}")


if __name__ == "__main__":
    main()
