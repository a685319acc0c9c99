"""Training step time with and without mixed precision (``care-export train --amp``), measured
side by side: the same model, batch and task, one SGD step of the training forward per call,
interleaved, medians.

    python benchmarks/bench_amp.py                      # a small ViT on CPU (bfloat16 autocast)
    python benchmarks/bench_amp.py --depth 12 --width 384 --img 224 --batch 16 --device cuda
"""

from __future__ import annotations

import argparse
import copy

import torch

from care_export.model.care_vit import CareViT
from care_export.model.config import MoEConfig, backbone_config
from care_export.training.task import TrainConfig, angular_loss, autocast_context, perceptor_loss, set_trainable
from runtime.timing import median_times


def step_fn(model, x, y, task: int, amp: bool, device):
    cfg = TrainConfig()
    params = set_trainable(model, task)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    first = sum(model.task_classes[:task])

    def step():
        with autocast_context(device, amp):
            out = model.forward_train(x, task)
            cur = out["logits"][:, first:]
            loss = angular_loss(cur, y, cfg.scale) + perceptor_loss(out["latents"], cur, y, cfg.scale, 0.0)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=3, help="tasks learned; the step trains the last")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = backbone_config(
        "vit_tiny_patch16_224",
        img_size=args.img,
        patch_size=16,
        depth=args.depth,
        embed_dim=args.width,
        num_heads=max(1, args.width // 64),
    )
    base = CareViT(cfg, MoEConfig())
    for _ in range(args.tasks):
        base.add_task(10)
    base.train()
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    task = args.tasks - 1
    calls = {
        name: step_fn(copy.deepcopy(base).to(device), x, y, task, amp, device)
        for name, amp in (("float32", False), ("amp", True))
    }
    t = median_times(calls, args.rounds, warmup=2)
    print(
        f"{device.type}: ViT width {args.width}, depth {args.depth}, {args.img}px, batch {args.batch}, "
        f"task {task}; median of {args.rounds} interleaved steps"
    )
    for name, s in t.items():
        print(f"  {name:8s} {1000 * s:8.1f} ms/step")
    print(f"  amp / float32 = {t['amp'] / t['float32']:.2f}")


if __name__ == "__main__":
    main()
