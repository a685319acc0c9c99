"""benchmarks/bench_floor.py: the floor graph is the plain backbone plus the BR-MoE's unavoidable
arithmetic, and the script times it beside the backbone and the artifact."""

import json
import subprocess
import sys
from pathlib import Path

from tiny_artifact import DATA

ROOT = Path(__file__).resolve().parents[2]


def test_floor_graph_adds_only_the_cls_projection_and_the_token_path():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_floor import floor_model
    finally:
        sys.path.pop(0)
    from care_export.export.graph import build_model, routing_widths
    from runtime.layout import Dims, layout

    dims = Dims.from_dict(json.loads((DATA / "artifact" / "manifest.json").read_text())["dims"])
    floor, plain = floor_model(dims), build_model(dims, layout(dims), moe=False)
    ops = lambda m, prefix: [n.op_type for n in m.graph.node if n.name.startswith(prefix)]  # noqa: E731
    # Per block: the CLS token's Gather, Gemm and the two nodes that consume it, the token path's
    # two MatMuls, its ReLU, the Add of the CLS term, and the Add joining the residual stream.
    assert len(floor.graph.node) - len(plain.graph.node) == dims.depth * 9
    assert sorted(ops(floor, "block0/moe/cls")) == ["Gather", "Gemm", "ReduceSum", "Unsqueeze"]
    assert sorted(ops(floor, "block0/moe/experts")) == ["Add", "MatMul", "MatMul", "Relu"]
    m, k = routing_widths(dims)
    hidden = [
        i
        for i in floor.graph.initializer
        if list(i.dims) == [dims.embed_dim, m * k * dims.expert_dim + dims.shared_dim]
    ]
    assert len(hidden) == dims.depth
    # The CLS projection reads the artifact's own expert weights (external data, every slot).
    gemm = next(n for n in floor.graph.node if n.name.startswith("block0/moe/cls/Gemm"))
    assert gemm.input[1] == "moe.0.experts.down"


def test_script_prints_both_ratios_per_batch():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_floor.py"),
            str(DATA / "artifact"),
            "--rounds",
            "1",
            "--batch",
            "1",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    rows = [line.split() for line in out if line.split() and line.split()[0] in ("1", "2")]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(len(r) == 6 and min(map(float, r[1:])) > 0 for r in rows)
    assert out[0].startswith("capacity 6,") and out[-1].startswith("peak resident memory")
