"""Per-task time and accuracy of a `care-export train` run against the task index, from the lines
the trainer prints ("task N (...): ... top-1 over ... seen classes A% ... in S s"): a PNG, and a
summary (total time, A-bar, A_B, time per task near two task indices and their ratio).

    python benchmarks/plot_run.py run.log -o run.png --near 10 300
"""

from __future__ import annotations

import argparse
import re
import statistics

LINE = re.compile(r"^task (\d+) \(.*top-1 over \d+ seen classes ([\d.]+)% .* in ([\d.]+) s$")


def parse(paths) -> dict[int, tuple[float, float]]:
    """task index -> (top-1 %, seconds); a task logged twice (a resumed run) keeps its last line."""
    tasks = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                m = LINE.match(line.strip())
                if m:
                    tasks[int(m[1])] = (float(m[2]), float(m[3]))
    return dict(sorted(tasks.items()))


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
    idx, acc, sec = list(tasks), [a for a, _ in tasks.values()], [s for _, s in tasks.values()]
    print(
        f"{len(idx)} tasks (0..{idx[-1]}), total {sum(sec) / 3600:.2f} h; A-bar {statistics.mean(acc):.2f}%, "
        f"A_B {acc[-1]:.2f}% (after task {idx[-1]})"
    )
    near = {}
    for n in args.near:
        window = [tasks[t][1] for t in range(max(1, n - args.window), n + args.window + 1) if t in tasks]
        if window:
            near[n] = statistics.median(window)
            print(f"median s/task near T={n} (T>=1, +-{args.window}): {near[n]:.1f} s")
    if len(near) == 2:
        a, b = args.near
        print(f"ratio T={b} / T={a}: {near[b] / near[a]:.2f}x")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax1.plot(idx[1:], sec[1:], ".", ms=3)
    ax1.set_ylabel("seconds per task")
    ax1.set_title(f"time per task (task 0: {sec[0]:.0f} s, not shown)")
    ax2.plot(idx, acc, "-")
    ax2.set_ylabel("top-1 over seen classes (%)")
    ax2.set_xlabel("task index")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
