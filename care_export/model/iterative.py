"""Iterative prediction: the reference's default evaluation after tasks 1..60 (docs/MODEL.md).

After task ``T`` (0-based), each input runs ``T + 1`` training-time forwards, pass ``i`` being
``CareViT.forward_train(x, i)`` in eval mode (experts ``0..i``, router ``i`` forced), and one
ordinary single pass. The pass whose ``softmax(scale * cos)`` has the lowest entropy is added
to the single pass's: ``scores = p_single + p_{argmin_i H_i}``. Task 0, and tasks past 60, fall
back to the single pass, as the reference does.
"""

from __future__ import annotations

import torch

from runtime.numerics import COS_SCALE, ENTROPY_EPS

MAX_ITERATIVE_TASK = 60  # the reference's cut-off (cost grows with the tasks learned)


def iterative_applies(task: int) -> bool:
    """Whether the reference predicts iteratively after ``task`` (0-based)."""
    return 1 <= task <= MAX_ITERATIVE_TASK


@torch.no_grad()
def iterative_scores(model, x: torch.Tensor, scale: float = COS_SCALE) -> torch.Tensor:
    """(B, classes) scores ``p_single + p_iter`` of the iterative prediction (``model`` in eval
    mode; it is put there)."""
    _eval(model)
    logits = torch.stack([scale * model.forward_train(x, i)["logits"] for i in range(model.num_tasks)])
    probs = torch.softmax(logits, -1)  # (T+1, B, C)
    ent = -(probs * torch.log(probs + ENTROPY_EPS)).sum(-1)  # (T+1, B)
    best = ent.argmin(0)
    p_iter = probs[best, torch.arange(x.shape[0], device=x.device)]
    return torch.softmax(scale * model(x, mode="sparse"), -1) + p_iter


@torch.no_grad()
def prediction_scores(model, x: torch.Tensor, mode: str = "single", scale: float = COS_SCALE) -> torch.Tensor:
    """Scores to rank classes by: ``mode`` ``"single"`` (cosine logits of the single pass) or
    ``"iterative"`` (:func:`iterative_scores` where the reference uses it, else single). The
    single pass runs in its sparse form: the reference form's decisions, only the kept experts
    over all tokens (the reference form, every expert over every token, made evaluating after
    a few hundred tasks cost minutes)."""
    if mode == "iterative" and iterative_applies(model.num_tasks - 1):
        return iterative_scores(model, x, scale)
    _eval(model)
    return model(x, mode="sparse")


def _eval(model) -> None:
    if model.training:  # eval() walks every module: a cost per batch at hundreds of tasks
        model.eval()
