"""Seconds per training step, dense (``forward_train(mode="reference")``, every expert over
every token) against sparse (``mode="sparse"``, what the trainer uses), while learning task T of a
synthetic checkpoint: every (T, form) timed interleaved in one run, medians, with the ratios to
the first T and dense/sparse, and the peak memory of one step of each in a child process of its
own.

A step is what the trainer does per batch minus the optimizer update: the training forward, the
loss, the backward. Task T's model holds T+1 tasks (tasks 0..T), of 10 then 3 classes (B100-Inc3).
Its tensors are drawn directly (``synth_model``'s module-by-module build of a 301-task ViT-B/16
takes minutes).

    python benchmarks/bench_train.py                                  # built-in ViT, T = 1 10 100 301
    python benchmarks/bench_train.py --backbone vit_base_patch16_224 --batch 4 --dense-max-task 10
    python benchmarks/bench_train.py --forms sparse --no-memory       # the trainer's form only
    python benchmarks/bench_train.py --linear onednn blas             # the backbone's products both ways

The dense form's memory grows with T (ViT-B/16 at T = 300 with batch 4 needed more than 23 GB):
``--dense-max-task`` skips it above a task.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from care_export.checkpoint.synth import EXPERT_SCALE_STD, randomize_task, task_sizes
from care_export.model import cpu_linear
from care_export.model.care_vit import CareViT, empty_model
from care_export.model.config import MoEConfig, backbone_config
from care_export.training.pretrain import BUILTIN_BACKBONE
from care_export.training.task import TrainConfig, set_trainable, task_loss
from runtime.timing import median_times

MODES = {"dense": "reference", "sparse": "sparse"}
ONEDNN = cpu_linear.ONEDNN_AVAILABLE


def backbone(name: str):
    return BUILTIN_BACKBONE if name == "builtin" else backbone_config(name)


def learner(name: str, task: int):
    """The model learning ``task`` (tasks 0..task, random non-degenerate parts) and its trainable
    parameters, every tensor drawn directly."""
    cfg, moe = backbone(name), MoEConfig()
    torch.manual_seed(0)
    fresh = CareViT(cfg, moe)  # backbone and shared experts, no task yet
    model = empty_model(cfg, moe, task_sizes(10, 3, task + 1))
    model.vit.load_state_dict(fresh.vit.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m, f in zip(model.moe, fresh.moe):
            m.shared.load_state_dict(f.shared.state_dict())
            m.shared.scale.normal_(0, EXPERT_SCALE_STD, generator=gen)
        for w in model.head.blocks:
            w.normal_(0, 0.02, generator=gen)
        for t in range(task + 1):
            randomize_task(model, t, gen)
    params = set_trainable(model, task)
    for m in model.moe:
        m.anchor_shared(task > 0)
    return model.train(), params


def step_fn(model, params, task: int, form: str, batch: int, linear: str = "onednn"):
    """One step; ``linear``: the frozen backbone's products through oneDNN (what the trainer does
    on CPU, care_export/model/cpu_linear.py) or PyTorch's BLAS."""
    cfg = model.backbone_cfg
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=gen)
    first = sum(model.task_classes[:task])
    y = first + torch.randint(0, model.task_classes[task], (batch,), generator=gen)

    def step():
        cpu_linear.ONEDNN_AVAILABLE = ONEDNN and linear == "onednn"
        for p in params:
            p.grad = None
        loss, _ = task_loss(model.forward_train(x, task, mode=MODES[form]), y, first, TrainConfig())
        loss.backward()

    return step


def peak_rss_gib(name: str, task: int, form: str, batch: int, linear: str) -> float:
    """Peak resident memory of a child process that builds the model and runs two steps: its
    own VmHWM (``ru_maxrss`` of a child would include this process's memory at the fork)."""
    code = (
        "import sys; sys.argv = sys.argv[:1]; from benchmarks.bench_train import learner, step_fn; "
        f"m, p = learner({name!r}, {task}); s = step_fn(m, p, {task}, {form!r}, {batch}, {linear!r}); s(); s(); "
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.getcwd()), capture_output=True, text=True
    )
    if proc.returncode != 0:
        return float("nan")
    return int(proc.stdout.split()[-1]) / 2**20  # kB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="builtin", help="'builtin' (the built-in ViT) or a timm ViT name")
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 100, 301], help="tasks T being learned")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--forms", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--dense-max-task", type=int, default=None, help="no dense step above this T")
    ap.add_argument(
        "--linear", nargs="+", choices=["onednn", "blas"], default=["onednn"], help="the backbone's products"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "onednn" in args.linear and not ONEDNN:
        raise SystemExit("this PyTorch has no oneDNN linear operator: use --linear blas")
    rows = []
    print(
        f"backbone {args.backbone}, batch {args.batch}, {torch.get_num_threads()} threads, medians of "
        f"{args.rounds}, every (T, form) interleaved"
    )
    calls, held = {}, []
    for task in args.tasks:
        model, params = learner(args.backbone, task)
        held.append(model)
        for f in args.forms:
            if not (f == "dense" and args.dense_max_task is not None and task > args.dense_max_task):
                for lin in args.linear:
                    calls[task, f, lin] = step_fn(model, params, task, f, args.batch, lin)
    times = median_times(calls, args.rounds, warmup=args.warmup)
    del calls, held
    first = {}
    print(
        f"{'T':>5} {'form':>7} {'linear':>7} {'s/step':>8} {'vs T=' + str(args.tasks[0]):>8} {'dense/sparse':>13} "
        f"{'blas/onednn':>12} {'peak GiB':>9}"
    )
    for (task, f, lin), sec in times.items():
        first.setdefault((f, lin), sec)
        peak = float("nan") if args.no_memory else peak_rss_gib(args.backbone, task, f, args.batch, lin)
        dense_sparse = (task, "dense", lin), (task, "sparse", lin)
        ratio = f"{times[dense_sparse[0]] / times[dense_sparse[1]]:.2f}x" if set(dense_sparse) <= set(times) else "-"
        both = (task, f, "blas"), (task, f, "onednn")
        speedup = f"{times[both[0]] / times[both[1]]:.2f}x" if set(both) <= set(times) else "-"
        rows.append(dict(task=task, form=f, linear=lin, seconds=sec, vs_first=sec / first[f, lin], peak_gib=peak))
        print(
            f"{task:>5} {f:>7} {lin:>7} {sec:>8.3f} {sec / first[f, lin]:>7.2f}x {ratio:>13} {speedup:>12} {peak:>9.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
