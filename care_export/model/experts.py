"""The per-task parts of a BR-MoE module: expert (bottleneck adapter), router, class perceptor."""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.numerics import ENTROPY_EPS, PART_LN_EPS


class Expert(nn.Module):
    """``scale * (ReLU(LN(x) @ W_down + b_down) @ W_up + b_up)``, dropout after the ReLU."""

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=PART_LN_EPS)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = nn.Parameter(torch.zeros(dim))
        for lin in (self.down, self.up):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.down(self.norm(x))))
        return self.up(h) * self.scale


def new_router(dim: int, num_experts: int) -> nn.Linear:
    """Router of a task: scores the experts that exist when the task is learned."""
    router = nn.Linear(dim, num_experts)
    nn.init.trunc_normal_(router.weight, std=0.02)
    nn.init.zeros_(router.bias)
    return router


class Perceptor(nn.Module):
    """Class perceptor of a task: ``Linear(LN(c))`` over the task's classes."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=PART_LN_EPS)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.norm.weight, std=0.02)
        nn.init.zeros_(self.norm.bias)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(c))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last axis, with the reference's guard."""
    # On CPU a softmax over the last axis runs a row at a time: over a task's few classes (three
    # in B100-Inc3) and hundreds of tasks, 30x slower than the same softmax over a leading axis.
    p = torch.softmax(logits.movedim(-1, 0), dim=0)
    return -(p * torch.log(p + ENTROPY_EPS)).sum(0)
