"""What a task trains under each method: CaRE, or one of the baselines it is compared against.

The baselines are CaRE models in which only some parts ever train, so that they use the same
data, schedule, cosine head, classifier alignment, checkpoint, export and runtime:

* ``frozen``: the cosine head alone on the frozen backbone. Experts and the shared expert keep
  their zero output scale, so the BR-MoE adds exactly nothing.
* ``shared-adapter``: the shared expert of every block (one adapter of rank ``r_s``) and the head,
  fine-tuned through all tasks without the pull back to a snapshot; task experts stay at zero.
* ``care``: the task's expert, router and perceptor in every block, the shared expert (pulled back
  after task 0), the head, and the layer-wise perceptor loss.
"""

from __future__ import annotations

from torch import nn

METHODS = ("care", "frozen", "shared-adapter")


def trainable_parts(model, task: int, method: str) -> list[nn.Module]:
    """The modules that learn ``task`` under ``method``."""
    parts = [model.head]
    if method == "shared-adapter":
        parts += [m.shared for m in model.moe]
    elif method == "care":
        for m in model.moe:
            parts += [m.experts[task], m.routers[task], m.perceptors[task], m.shared]
    return parts


def uses_routing(method: str) -> bool:
    """Whether ``method`` trains the BR-MoE's task parts (perceptor loss, shared-expert pull)."""
    return method == "care"
