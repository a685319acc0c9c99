"""Bi-level routing mixture of experts (BR-MoE), one module per ViT block (CARE_SPEC.md).

Three forwards:

* :meth:`BRMoE.forward_reference` -- the single-pass inference forward written for clarity: every
  expert over every token, exactly the reference semantics. It is the oracle of every parity check.
* :meth:`BRMoE.forward_sparse` -- the same decisions, but experts run on the CLS token for routing
  and only the selected ones over the full sequence.
* :meth:`BRMoE.forward_train` -- the "semi-dynamic" forward used while learning task ``T``
  (router ``T`` forced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MoEConfig
from .experts import Expert, Perceptor, entropy, new_router

# What the reference writes into router logits that lose the top-K selection.
MASKED_LOGIT = -100.0


@dataclass
class Routing:
    """Routing decisions of one block for a batch.

    ``tasks``: (B, m) selected routers (tasks), ascending; ``experts``: (B, m, k) experts kept by
    each selected router, ascending, ``-1`` where the router has fewer than ``k`` experts.
    """

    tasks: torch.Tensor
    experts: torch.Tensor


class BRMoE(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.dim = dim
        self.cfg = cfg
        self.experts = nn.ModuleList()
        self.routers = nn.ModuleList()
        self.perceptors = nn.ModuleList()
        self.shared = Expert(dim, cfg.shared_dim, cfg.dropout)
        self._anchor: list[torch.Tensor] | None = None  # shared-expert snapshot for the EMA pull
        self.ema_decay = 0.999

    @property
    def num_tasks(self) -> int:
        return len(self.experts)

    # ------------------------------------------------------------------ growth
    def add_task(self, num_classes: int, init_from_older: bool = True) -> None:
        """Append expert, router and perceptor of a new task.

        A new expert starts as the mean of all earlier experts but the most recent one (the
        reference's rule); with fewer than two earlier experts, or ``init_from_older=False``
        (weights about to be overwritten), it is freshly initialised.
        """
        expert = Expert(self.dim, self.cfg.expert_dim, self.cfg.dropout)
        if init_from_older and self.num_tasks > 1:
            older = self.experts[: self.num_tasks - 1]
            with torch.no_grad():
                for name, p in expert.named_parameters():
                    p.copy_(torch.stack([dict(e.named_parameters())[name] for e in older]).mean(0))
        device = self.shared.scale.device
        self.experts.append(expert.to(device))
        self.routers.append(new_router(self.dim, self.num_tasks).to(device))
        self.perceptors.append(Perceptor(self.dim, num_classes).to(device))

    # ------------------------------------------------------------------ shared expert EMA
    def anchor_shared(self, enabled: bool = True) -> None:
        """Snapshot the shared expert; training forwards then pull it towards the snapshot."""
        self._anchor = [p.detach().clone() for p in self.shared.parameters()] if enabled else None

    @torch.no_grad()
    def _pull_shared(self) -> None:
        # theta <- mu * snapshot + (1 - mu) * theta, as the reference does before each forward.
        for p, a in zip(self.shared.parameters(), self._anchor):
            p.mul_(1 - self.ema_decay).add_(a, alpha=self.ema_decay)

    # ------------------------------------------------------------------ routing
    def _route(self, ent: torch.Tensor, cls_logits: list[torch.Tensor], forced: int | None):
        """Router selection and expert weights.

        ``ent``: (T', B) entropies of the candidate routers; ``cls_logits``: per task t, (B, t+1)
        router logits. Returns ``(sel, weights, kept)``: ``sel`` (m, B) router indices,
        ``weights`` (m, B, E) softmax weights over the ``E`` experts in play, and ``kept``
        (m, B, E) the experts each selected router really uses (its top-K, existing ones only).
        """
        num_e = len(cls_logits)
        bsz = ent.shape[1]
        pad = [torch.cat([l, l.new_full((bsz, num_e - l.shape[1]), float("-inf"))], -1) for l in cls_logits]
        logits = torch.stack(pad)  # (E, B, E): router t, sample, expert
        m = self.cfg.topk_routers - (forced is not None)
        cand = ent.shape[0]
        if m >= cand:
            sel = torch.arange(cand, device=ent.device)[:, None].expand(cand, bsz)
        else:
            sel = ent.topk(m, dim=0, largest=False).indices  # (m, B) lowest entropy
        if forced is not None:
            sel = torch.cat([sel, sel.new_full((1, bsz), forced)])
        chosen = logits.gather(0, sel[..., None].expand(-1, -1, num_e))  # (m, B, E)
        kept = torch.isfinite(chosen)
        k = self.cfg.topk_experts
        if k < num_e:
            top = torch.zeros_like(kept)
            top.scatter_(-1, chosen.topk(k, dim=-1).indices, True)
            kept &= top
            chosen = chosen.masked_fill(~top, MASKED_LOGIT)
        return sel, torch.softmax(chosen, dim=-1), kept

    @staticmethod
    def _routing(sel: torch.Tensor, kept: torch.Tensor) -> Routing:
        order = sel.T.argsort(-1)
        tasks = sel.T.gather(1, order)
        kept = kept.permute(1, 0, 2)  # (B, m, E)
        kept = kept.gather(1, order[..., None].expand_as(kept))
        idx = torch.arange(kept.shape[-1], device=kept.device).expand_as(kept)
        # Kept experts first in ascending order, -1 after them.
        key = torch.where(kept, idx, idx + kept.shape[-1])
        width = int(kept.sum(-1).max())
        ordered = key.sort(-1).values[..., :width]
        return Routing(tasks, torch.where(ordered < kept.shape[-1], ordered, torch.full_like(ordered, -1)))

    @staticmethod
    def _single_task_routing(x: torch.Tensor) -> Routing:
        zeros = x.new_zeros((x.shape[0], 1), dtype=torch.long)
        return Routing(zeros, zeros[..., None])

    # ------------------------------------------------------------------ forwards
    def forward_reference(self, x: torch.Tensor, want_routing: bool = False):
        """Single-pass inference forward, every expert over every token (reference semantics)."""
        outs = [e(x) for e in self.experts]
        shared = self.shared(x)
        if self.num_tasks == 1:
            return outs[0] + shared, (self._single_task_routing(x) if want_routing else None)
        cls = [o[:, 0] for o in outs]
        ent = torch.stack([entropy(p(c)) for p, c in zip(self.perceptors, cls)])  # (T, B)
        sel, w, kept = self._route(ent, [r(c) for r, c in zip(self.routers, cls)], forced=None)
        mixed = torch.einsum("mbe,ebnd->bnd", w, torch.stack(outs))
        return mixed + shared, (self._routing(sel, kept) if want_routing else None)

    def forward_sparse(self, x: torch.Tensor, want_routing: bool = False):
        """Same decisions as :meth:`forward_reference`; only the kept experts see all tokens.

        An expert acts token-wise, so its output's CLS token is the expert applied to the input's
        CLS token: routing needs every expert on one token only. The weights of experts outside
        the top-K (``e^-100`` in the reference) are dropped.
        """
        shared = self.shared(x)
        if self.num_tasks == 1:
            return self.experts[0](x) + shared, (self._single_task_routing(x) if want_routing else None)
        cls = [e(x[:, 0]) for e in self.experts]
        ent = torch.stack([entropy(p(c)) for p, c in zip(self.perceptors, cls)])
        sel, w, kept = self._route(ent, [r(c) for r, c in zip(self.routers, cls)], forced=None)
        per_expert = (w * kept).sum(0)  # (B, E): total weight of each expert per sample
        out = shared.clone()
        for e in kept.any(0).any(0).nonzero()[:, 0].tolist():
            rows = per_expert[:, e].nonzero()[:, 0]
            if len(rows):
                out[rows] += per_expert[rows, e, None, None] * self.experts[e](x[rows])
        return out, (self._routing(sel, kept) if want_routing else None)

    def forward_train(self, x: torch.Tensor, task: int):
        """Forward while learning ``task``: experts ``0..task``, router ``task`` always selected
        plus the ``M-1`` lowest-entropy routers of earlier tasks. Returns the BR-MoE output and
        the perceptor logits of ``task`` (for the layer-wise loss)."""
        if self.training and self._anchor is not None:
            self._pull_shared()
        shared = self.shared(x)
        outs = [self.experts[i](x) for i in range(task + 1)]
        cls = [o[:, 0] for o in outs]
        latent = self.perceptors[task](cls[task])
        if task == 0:
            return outs[0] + shared, latent
        ent = torch.stack([entropy(self.perceptors[i](cls[i])) for i in range(task)])
        _, w, _ = self._route(ent, [self.routers[i](cls[i]) for i in range(task + 1)], forced=task)
        mixed = torch.einsum("mbe,ebnd->bnd", w, torch.stack(outs))
        return mixed + shared, latent
