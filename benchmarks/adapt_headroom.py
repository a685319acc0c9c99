"""How much any adaptation of the built-in backbone can gain on the first task of a built-in
sequence at a step budget: the cosine head trained alone on the frozen backbone, against the whole
backbone fine-tuned with it (the upper bound of what an adapter, a BR-MoE or a shared one, can
change in the features), with the same SGD steps, batch, augmentation and cosine loss as the
trainer. Test top-1 on the task's classes.

    python benchmarks/adapt_headroom.py --data builtin-shift --steps 100 1000
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from care_export.data import DEFAULT_SEED
from care_export.data.builtin import BuiltinSource
from care_export.data.shift import ShiftedSource
from care_export.data.sources import LabelledImages, TaskSequence, eval_transform, train_transform
from care_export.model.config import MoEConfig
from care_export.training.continual import build_care_vit
from care_export.training.pretrain import BUILTIN_BACKBONE
from care_export.training.task import COS_SCALE, TrainConfig


def features(vit, x):
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


def cosine(f, head):
    return F.normalize(f, dim=1) @ F.normalize(head, dim=1).T


def top1(vit, train, test, *, fine_tune: bool, steps: int, cfg: TrainConfig, classes: int) -> float:
    torch.manual_seed(0)
    vit = copy.deepcopy(vit).requires_grad_(fine_tune)
    head = torch.nn.Parameter(torch.randn(classes, vit.embed_dim) * 0.02)
    params = [head] + (list(vit.parameters()) if fine_tune else [])
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    done = 0
    while done < steps:
        for x, y in DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True):
            vit.train()
            loss = F.cross_entropy(COS_SCALE * cosine(features(vit, x), head), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    vit.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=256):
            correct += int((cosine(features(vit, x), head).argmax(1) == y).sum())
    return 100 * correct / len(test)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["builtin", "builtin-shift"], default="builtin-shift")
    ap.add_argument("--classes", type=int, default=40, help="classes of the sequence (tasks of --task-classes)")
    ap.add_argument("--task-classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=40)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    model, _, prep = build_care_vit(BUILTIN_BACKBONE, "builtin-pretrained", MoEConfig(), progress=False, data=args.data)
    n, k = args.classes, args.task_classes
    if args.data == "builtin":
        source = BuiltinSource(n, train_per_class=args.train_per_class)
    else:
        source = ShiftedSource(n, init_cls=k, increment=k, train_per_class=args.train_per_class)
    seq = TaskSequence.build(n, k, k, DEFAULT_SEED)
    order = {g: seq.order[g] for g in seq.classes(0)}
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size)
    train = LabelledImages(source, "train", order, seq.classes(0), train_transform(prep, cfg.crop_scale, cfg.input_set))
    test = LabelledImages(source, "test", order, seq.classes(0), eval_transform(prep))
    print(f"{args.data}, task 0 ({k} classes, {args.train_per_class} training images each), lr {args.lr}")
    print(f"{'steps':>6} {'frozen + head':>14} {'fine-tuned':>11} {'s':>5}")
    for steps in args.steps:
        start = time.perf_counter()
        frozen = top1(model.vit, train, test, fine_tune=False, steps=steps, cfg=cfg, classes=k)
        tuned = top1(model.vit, train, test, fine_tune=True, steps=steps, cfg=cfg, classes=k)
        print(f"{steps:>6} {frozen:>13.1f}% {tuned:>10.1f}% {time.perf_counter() - start:>5.0f}")


if __name__ == "__main__":
    main()
