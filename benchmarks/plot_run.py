"""Per-task time and accuracy of a `care-export train` run against the task index, from the lines
the trainer prints ("task N (...): ... in S s (training A s, evaluation B s, saving C s)", with
"top-1 over ... seen classes P%" where the task was evaluated): a PNG, and a summary (total time,
A-bar, A_B, time per task near two task indices and their ratio, in all and for training alone).

    python benchmarks/plot_run.py run.log -o run.png --near 10 300
"""

from __future__ import annotations

import argparse
import re
import statistics

LINE = re.compile(
    r"(?:^|: )task (\d+) \(.*?: classes [\d-]+, (.*) in ([\d.]+) s(?: \(training ([\d.]+) s, evaluation ([\d.]+) s)?"
)
TOP1 = re.compile(r"top-1 over \d+ seen classes ([\d.]+)%")


def parse(paths) -> dict[int, dict]:
    """task index -> {"top1": % or None, "total": s, "train": s or None}; a task logged twice (a
    resumed run) keeps its last line."""
    tasks = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                m = LINE.search(line.strip())
                if m:
                    acc = TOP1.search(m[2])
                    tasks[int(m[1])] = {
                        "top1": float(acc[1]) if acc else None,
                        "total": float(m[3]),
                        "train": float(m[4]) if m[4] else None,
                    }
    return dict(sorted(tasks.items()))


def _near(tasks: dict, key: str, n: int, window: int) -> float | None:
    values = [tasks[t][key] for t in range(max(1, n - window), n + window + 1) if t in tasks]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("-o", "--output", required=True, help="PNG to write")
    ap.add_argument("--near", type=int, nargs=2, default=(10, 300), help="compare time per task around these")
    ap.add_argument("--window", type=int, default=5, help="tasks on each side of --near to take the median of")
    args = ap.parse_args(argv)
    tasks = parse(args.logs)
    if not tasks:
        raise SystemExit("error: no per-task line in the logs")
    idx = list(tasks)
    sec = [r["total"] for r in tasks.values()]
    evaluated = [(t, r["top1"]) for t, r in tasks.items() if r["top1"] is not None]
    acc = [a for _, a in evaluated]
    print(
        f"{len(idx)} tasks (0..{idx[-1]}), total {sum(sec) / 3600:.2f} h; {len(acc)} evaluated: "
        f"A-bar {statistics.mean(acc):.2f}%, A_B {acc[-1]:.2f}% (after task {evaluated[-1][0]})"
        if acc
        else f"{len(idx)} tasks, total {sum(sec) / 3600:.2f} h; none evaluated"
    )
    for key, what in (("total", "s/task"), ("train", "training s/task")):
        near = {n: _near(tasks, key, n, args.window) for n in args.near}
        for n, v in near.items():
            if v is not None:
                print(f"median {what} near T={n} (T>=1, +-{args.window}): {v:.1f} s")
        a, b = args.near
        if near[a] and near[b]:
            print(f"ratio T={b} / T={a} ({what}): {near[b] / near[a]:.2f}x")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax1.plot(idx[1:], sec[1:], ".", ms=3, label="whole task")
    train = [(t, r["train"]) for t, r in tasks.items() if t >= 1 and r["train"] is not None]
    if train:
        ax1.plot([t for t, _ in train], [s for _, s in train], ".", ms=3, label="training")
        ax1.legend()
    ax1.set_ylabel("seconds per task")
    ax1.set_title(f"time per task (task 0: {sec[0]:.0f} s, not shown)")
    ax2.plot([t for t, _ in evaluated], acc, "-o", ms=2)
    ax2.set_ylabel("top-1 over seen classes (%)")
    ax2.set_xlabel("task index")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
