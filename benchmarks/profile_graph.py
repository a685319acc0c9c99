"""Where an exported graph spends its time: ONNX Runtime's profiler, per-node times summed by
op type and by routing stage (the BR-MoE's node names carry their stage, ``block{i}/moe/<stage>/``;
everything else is ``backbone``), medians over runs, for the artifact and the plain backbone.

    python benchmarks/profile_graph.py --ckpt ckpt/ --capacity 301 --tasks 10 --batch 1 8

Prints, per batch size and graph, the node count (after ORT's graph optimisations), the total
node time per run and the two tables. The graphs' runs alternate in one process, so all see the same machine load.
``--compare old/model.onnx`` adds another artifact graph for the same data (e.g. an earlier
exporter's ``model.onnx`` in a copy of the artifact directory) to the interleaving. Each row shows
the median over runs and the minimum (on a loaded machine the minimum is the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from runtime.layout import INPUT

PAUSE_S = 0.05  # lets the other session's thread pool stop spinning (runtime/timing.py)
_STAGE = re.compile(r"block\d+/moe/([a-z_]+)/")


def stage_of(node_name: str) -> str:
    m = _STAGE.search(node_name)
    return m.group(1) if m else "backbone"


def _session(model: Path, threads: int, prefix: Path):
    import onnxruntime as ort

    from runtime.backends.onnxrt import session_options

    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def summarize(events: list[dict], warmup: int) -> tuple[int, dict, dict, dict, tuple[float, float]]:
    """``(nodes per run, ms per op type, ms per stage, ms per BR-MoE stage and op type, ms per run)``
    of a profile, each ``(median, min)`` over runs."""
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    per_run = [defaultdict(list) for _ in run_starts]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            j = int(np.searchsorted(run_starts, e["ts"], side="right")) - 1
            per_run[j][e["name"][: -len("_kernel_time")]].append((e["args"].get("op_name", "?"), e["dur"]))
    per_run = per_run[warmup:]
    by_op, by_stage, by_both, totals = defaultdict(list), defaultdict(list), defaultdict(list), []
    for r in per_run:
        ops, stages, both = defaultdict(float), defaultdict(float), defaultdict(float)
        for name, items in r.items():
            for op, dur in items:
                ops[op] += dur / 1e3
                stages[stage_of(name)] += dur / 1e3
                both[f"{stage_of(name)}/{op}"] += dur / 1e3
        for acc, new in ((by_op, ops), (by_stage, stages), (by_both, both)):
            for k, v in new.items():
                acc[k].append(v)
        totals.append(sum(ops.values()))

    def med(d):  # (median, min) over runs, 0 in the runs without the key
        return {k: (float(np.median(v + [0.0] * (len(totals) - len(v)))), float(min(v))) for k, v in d.items()}

    return len(per_run[0]), med(by_op), med(by_stage), med(by_both), (float(np.median(totals)), float(min(totals)))


def profile(
    models: dict[str, Path], batch: int, runs: int, threads: int, img: int, work: Path, warmup: int = 2
) -> dict:
    """Per model: :func:`summarize` of ``runs`` runs, the models' runs interleaved (profiles
    written under ``work``)."""
    sessions = {
        name: _session(path, threads, work / f"profile-b{batch}-{i}") for i, (name, path) in enumerate(models.items())
    }
    x = np.random.default_rng(0).standard_normal((batch, 3, img, img), dtype=np.float32)
    for _ in range(warmup + runs):
        for sess in sessions.values():
            time.sleep(PAUSE_S)
            sess.run(None, {INPUT: x})
    return {name: summarize(json.load(open(sess.end_profiling())), warmup) for name, sess in sessions.items()}


def table(title: str, rows: dict[str, tuple[float, float]], total: tuple[float, float], top: int) -> list[str]:
    out = [f"  {title:32} {'median ms':>10} {'share':>6} {'min ms':>8} {'share':>6}"]
    for k, (v, lo) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        out.append(f"  {k:32} {v:10.2f} {v / total[0]:6.1%} {lo:8.2f} {lo / total[1]:6.1%}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--capacity", type=int, default=0, help="artifact capacity (0: --tasks)")
    ap.add_argument("--tasks", type=int, default=None, help="tasks exported (default: all)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=14, help="op types shown")
    ap.add_argument("--detail", type=int, default=0, help="also show this many BR-MoE (stage, op type) rows")
    ap.add_argument("--compare", type=Path, help="another artifact model.onnx (same data) to profile alongside")
    args = ap.parse_args()

    from runtime.checkpoint_files import read_checkpoint_manifest

    tasks = args.tasks or len(read_checkpoint_manifest(args.ckpt)["tasks"])
    # Exports and profiles (about a gigabyte at capacity 301) go when the run ends.
    with tempfile.TemporaryDirectory(prefix="care-profile-") as tmp:
        _run(args, tasks, Path(tmp))


def _run(args, tasks: int, work: Path) -> None:
    import onnx

    from care_export.export.writer import export_artifact, export_backbone

    export_artifact(args.ckpt, work / "art", args.capacity or tasks, tasks=tasks, force=True)
    backbone = export_backbone(args.ckpt, work / "backbone")
    img = onnx.load(str(backbone), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[2].dim_value
    models = {"artifact": work / "art" / "model.onnx", "backbone": backbone}
    if args.compare:
        models = {"artifact": models["artifact"], f"artifact ({args.compare})": args.compare, "backbone": backbone}
    for batch in args.batch:
        results = profile(models, batch, args.runs, args.threads, img, work)
        for name, (n, ops, stages, both, total) in results.items():
            print(
                f"\n{name}, T={tasks}, capacity {args.capacity or tasks}, batch {batch}: {n} nodes run, "
                f"{total[0]:.1f} ms of node time per run (median of {args.runs}, interleaved; min {total[1]:.1f})"
            )
            print("\n".join(table("op type", ops, total, args.top)))
            if name.startswith("artifact"):
                print("\n".join(table("stage", stages, total, 20)))
                if args.detail:
                    moe = {k: v for k, v in both.items() if not k.startswith("backbone/")}
                    print("\n".join(table("stage/op type", moe, total, args.detail)))


if __name__ == "__main__":
    main()
