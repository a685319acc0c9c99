"""Accuracy after every task: top-1 over all classes seen so far with the single-pass inference
forward (task id unknown) or the iterative prediction, the per-task accuracy matrix, A-bar, A_B
and forgetting."""

from __future__ import annotations

from pathlib import Path

import torch

METRICS_FILE = "metrics.json"


@torch.no_grad()
def accuracy_by_task(model, loader, task_sizes: list[int], device, predict=None) -> tuple[float, list[float]]:
    """Top-1 (%) over the whole ``loader`` and on each task's classes, predicting among every
    learned class with ``predict(x)`` scores (default: the single-pass inference in its sparse
    form, the reference form's decisions with only the selected experts over all tokens; see
    ``iterative.prediction_scores``)."""
    model.eval()
    predict = predict or (lambda x: model(x, mode="sparse"))
    bounds = torch.tensor(task_sizes).cumsum(0)
    correct = torch.zeros(len(task_sizes))
    total = torch.zeros(len(task_sizes))
    for x, y in loader:
        pred = predict(x.to(device)).argmax(1).cpu()
        task = torch.bucketize(y, bounds, right=True)
        correct += torch.bincount(task, weights=(pred == y).double(), minlength=len(task_sizes)).float()
        total += torch.bincount(task, minlength=len(task_sizes)).float()
    per_task = (100 * correct / total.clamp(min=1)).tolist()
    return float(100 * correct.sum() / total.sum().clamp(min=1)), per_task


class Metrics:
    """Accuracy history of a sequence: ``top1[i]`` after task ``i`` over all seen classes,
    ``matrix[i][j]`` on task ``j``'s classes after task ``i`` (j <= i). An entry is None where
    the task's recorded data could not be read at that time (see ``continual.evaluate_recorded``)."""

    def __init__(self, top1: list[float] | None = None, matrix: list[list[float]] | None = None):
        self.top1 = list(top1 or [])
        self.matrix = [list(r) for r in (matrix or [])]

    def add(self, top1: float | None, per_task: list[float | None]) -> None:
        self.top1.append(_round(top1))
        self.matrix.append([_round(a) for a in per_task])

    @property
    def a_bar(self) -> float | None:
        """Mean over tasks of the accuracy after that task."""
        known = [a for a in self.top1 if a is not None]
        return sum(known) / len(known) if known else None

    @property
    def a_last(self) -> float:
        return self.top1[-1]

    @property
    def forgetting(self) -> float:
        """Mean over earlier tasks of (best accuracy ever on it - accuracy on it now), as the
        reference's trainer reports; 0 with a single task."""
        n = len(self.matrix)
        if n < 2:
            return 0.0
        drops = [
            max(a for i in range(j, n) if (a := self.matrix[i][j]) is not None) - self.matrix[-1][j]
            for j in range(n - 1)
            if self.matrix[-1][j] is not None
        ]
        return sum(drops) / len(drops) if drops else 0.0

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "matrix": self.matrix,
            "a_bar": _round(self.a_bar),
            "a_last": self.a_last,
            "forgetting": round(self.forgetting, 4),
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> Metrics:
        return cls(d["top1"], d["matrix"]) if d else cls()

    def table(self, max_columns: int = 10) -> str:
        """After-task accuracy (all seen classes) and, for short sequences, on each task."""
        n = len(self.top1)
        per_task = n <= max_columns
        head = f"{'task':>5} {'all seen':>9}" + ("".join(f" {'T' + str(j):>6}" for j in range(n)) if per_task else "")
        lines = [head]
        for i in range(n):
            row = f"{i:>5} {_pct(self.top1[i], 8, 2)}%"
            if per_task:
                row += "".join(f" {_pct(a, 6, 1)}" for a in self.matrix[i])
            lines.append(row)
        lines.append(
            f"A-bar {_pct(self.a_bar, 0, 2)}%  A_B {_pct(self.a_last, 0, 2)}%  forgetting {self.forgetting:.2f}"
        )
        return "\n".join(lines)


def _round(a: float | None) -> float | None:
    return None if a is None else round(a, 4)


def _pct(a: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if a is None else f"{a:>{width}.{digits}f}"


def write_metrics(directory: str | Path, metrics: Metrics, extra: dict | None = None) -> Path:
    from runtime.atomic import write_json_atomic

    path = Path(directory) / METRICS_FILE
    write_json_atomic(path, dict(metrics.to_dict(), **(extra or {})))
    return path
