"""Random-weight checkpoints of any size, for export and benchmark work without training.

The weights are drawn so that the model is not degenerate: expert scales are non-zero (experts
change the features), perceptor logits are spread so that entropies differ between tasks and
inputs, and router logits are spread so that the top-K choice differs between inputs.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..model.care_vit import CareViT
from ..model.config import BackboneConfig, MoEConfig

# Standard deviations that keep routing decisions input-dependent (measured on random ViTs).
EXPERT_SCALE_STD = 0.5
PERCEPTOR_STD = 0.15
PERCEPTOR_NORM_STD = 1.0
ROUTER_STD = 0.1


def task_sizes(init_cls: int, increment: int, tasks: int) -> list[int]:
    """Class counts of the first ``tasks`` tasks of an ``init_cls`` / ``increment`` sequence."""
    if init_cls < 1 or increment < 1 or tasks < 1:
        raise ValueError("init_cls, increment and tasks must be positive")
    return [init_cls] + [increment] * (tasks - 1)


@torch.no_grad()
def randomize_task(model: CareViT, task: int, gen: torch.Generator) -> None:
    """Draw non-degenerate weights for every part of ``task``."""

    def fill(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=gen) * std + mean)

    for m in model.moe:
        e, r, p = m.experts[task], m.routers[task], m.perceptors[task]
        fill(e.norm.weight, 0.1, 1.0)
        fill(e.norm.bias, 0.1)
        fill(e.down.weight, e.down.in_features**-0.5)
        fill(e.down.bias, 0.1)
        fill(e.up.weight, e.up.in_features**-0.5)
        fill(e.up.bias, 0.1)
        fill(e.scale, EXPERT_SCALE_STD)
        fill(r.weight, ROUTER_STD)
        fill(r.bias, ROUTER_STD)
        fill(p.norm.weight, PERCEPTOR_NORM_STD)
        fill(p.norm.bias, 0.1)
        fill(p.fc.weight, PERCEPTOR_STD)
        fill(p.fc.bias, 0.1)
    fill(model.head.blocks[task], 1.0)


def synth_model(
    backbone: BackboneConfig,
    moe: MoEConfig,
    task_classes: list[int],
    seed: int = 0,
    progress: bool = False,
) -> CareViT:
    """A CaRE model with random backbone and random, non-degenerate task parts."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CareViT(backbone, moe)
    with torch.no_grad():
        for m in model.moe:
            m.shared.scale.copy_(torch.randn(m.shared.scale.shape, generator=gen) * EXPERT_SCALE_STD)
    for t, c in enumerate(tqdm(task_classes, desc="tasks", unit="task", disable=None if progress else True)):
        model.add_task(c, init_from_older=False)
        randomize_task(model, t, gen)
    model.requires_grad_(False)
    return model.eval()
