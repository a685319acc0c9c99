"""Bi-level routing mixture of experts (BR-MoE), one module per ViT block (docs/MODEL.md).

Three forwards:

* :meth:`BRMoE.forward_reference` -- the single-pass inference forward written for clarity: every
  expert over every token, exactly the reference semantics. It is the oracle of every parity check.
* :meth:`BRMoE.forward_sparse` -- the same decisions, but experts run on the CLS token for routing
  and only the selected ones over the full sequence.
* :meth:`BRMoE.forward_train` -- the "semi-dynamic" forward used while learning task ``T``
  (router ``T`` forced), every expert ``0..T`` over every token: the tested reference.
* :meth:`BRMoE.forward_train_sparse` -- the same outputs and gradients with the work of
  ``forward_sparse``; the trainer uses it, so that a step costs about the same at any ``T``.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.numerics import MASKED_LOGIT, PART_LN_EPS

from .config import MoEConfig
from .experts import Expert, Perceptor, entropy, new_router

_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_VERSION = operator.attrgetter("_version")


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
        self._stack_cache: dict[str, dict] = {}  # frozen task parts stacked, see _stacks
        self.ema_decay = 0.999
        # A load may replace parameters (assign=True): the stacks would no longer hold them.
        self.register_load_state_dict_post_hook(_drop_stacks)

    def _apply(self, fn, recurse=True):
        # .to(), .half() and the like give every parameter new storage: the stacks are left behind.
        self._stack_cache.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # A copy builds its own stacks from its own parameters (a copied cache would be dead weight).
        return {**super().__getstate__(), "_stack_cache": {}}

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
            with torch.no_grad():
                older = self._older_experts()
                for name, p in expert.named_parameters():
                    p.copy_(older[name].mean(0))
        device = self.shared.scale.device
        self.experts.append(expert.to(device))
        self.routers.append(new_router(self.dim, self.num_tasks).to(device))
        self.perceptors.append(Perceptor(self.dim, num_classes).to(device))

    def _older_experts(self) -> dict[str, torch.Tensor]:
        """All experts but the most recent, stacked: rows of the frozen stack where it holds
        them all (stacking hundreds of experts anew at every task grew a task's time)."""
        older = list(self.experts)[: self.num_tasks - 1]  # (a ModuleList's slice is a new ModuleList)
        entry = self._stack_cache.get("experts")
        if (
            entry is not None
            and (entry["frozen"] or 0) >= len(older)
            and entry["ids"][: len(older)] == tuple(map(id, older))
        ):
            return {k: v[: len(older)] for k, v in entry["stack"].items()}
        return _stacked(older)

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
        pad = [torch.cat([lg, lg.new_full((bsz, num_e - lg.shape[1]), float("-inf"))], -1) for lg in cls_logits]
        logits = torch.stack(pad)  # (E, B, E): router t, sample, expert
        sel = self._select(ent, forced)
        chosen = logits.gather(0, sel[..., None].expand(-1, -1, num_e))  # (m, B, E)
        return (sel, *self._weights(chosen))

    def _select(self, ent: torch.Tensor, forced: int | None) -> torch.Tensor:
        """(m, B) selected routers: the lowest-entropy candidates, then ``forced`` if given."""
        m = self.cfg.topk_routers - (forced is not None)
        cand, bsz = ent.shape
        if m >= cand:
            sel = torch.arange(cand, device=ent.device)[:, None].expand(cand, bsz)
        else:
            sel = ent.topk(m, dim=0, largest=False).indices  # (m, B) lowest entropy
        if forced is not None:
            sel = torch.cat([sel, sel.new_full((1, bsz), forced)])
        return sel

    def _weights(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights and kept experts from the selected routers' logits (m, B, E), ``-inf``
        where a router has no such expert; logits outside the top-K become ``MASKED_LOGIT``."""
        kept = torch.isfinite(chosen)
        k = self.cfg.topk_experts
        if k < chosen.shape[-1]:
            top = torch.zeros_like(kept)
            top.scatter_(-1, chosen.topk(k, dim=-1).indices, True)
            kept &= top
            chosen = chosen.masked_fill(~top, MASKED_LOGIT)
        return torch.softmax(chosen, dim=-1), kept

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
        out, sel, kept, _ = self._sparse_mixture(x, self.num_tasks, forced=None)
        return out + shared, (self._routing(sel, kept) if want_routing else None)

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

    def forward_train_sparse(self, x: torch.Tensor, task: int):
        """:meth:`forward_train` with the work of :meth:`forward_sparse`: the same outputs,
        gradients and shared-expert pull, at a cost that does not grow with ``task``'s experts.

        Every expert ``0..task`` runs on the CLS token only, batched (all that the entropies, the
        router logits and the CLS token of the mixture read); the selected routers' logits are
        computed for the samples that select them; then only the experts some selected router
        keeps run over the other tokens (see :meth:`_sparse_mixture`). Dropout draws one mask per
        expert and token, as in the dense form. Experts outside the top-K
        (weight ``e^-100`` relative in the dense form) are dropped.
        """
        if self.training and self._anchor is not None:
            self._pull_shared()
        shared = self.shared(x)
        if task == 0:
            out = self.experts[0](x)
            return out + shared, self.perceptors[0](out[:, 0])
        out, _, _, cls = self._sparse_mixture(x, task + 1, forced=task)
        return out + shared, self.perceptors[task](cls)

    def _sparse_mixture(self, x: torch.Tensor, num_experts: int, forced: int | None):
        """The BR-MoE mixture of experts ``0..num_experts-1`` (shared expert excluded), routed by
        the routers of lowest entropy among the candidates (all but ``forced``) plus ``forced``.
        Returns ``(mixture, sel, kept, forced_cls)``, ``forced_cls`` (B, D) expert ``forced`` on
        the CLS token (``None`` without ``forced``).

        Every expert runs on the CLS token without autograd, for the entropies (selection only: no
        gradient flows through them). With autograd, each sample's selected routers read their own
        experts' output on its CLS token (one expert per router and sample), and each sample's
        kept experts run over all its tokens (:meth:`_mixed_tokens`), under the same dropout
        masks: the work on the gradient path follows the samples' own choices, not the union of
        every sample's (which grows with the task count up to M * K times the batch).
        """
        experts = list(self.experts)[:num_experts]
        cand = num_experts - (forced is not None)
        cls0 = x[:, 0]
        stacks = self._stacks(experts, "experts")
        with torch.no_grad():
            hidden, drop = self._routing_hidden(stacks, cls0, cand)
            sel = self._select(self._perceptor_entropies(stacks, hidden), forced)
        m, bsz = sel.shape
        samples = torch.arange(bsz, device=x.device).repeat(m)  # pair j * B + b is (router sel[j, b], sample b)
        cls = self._own_outputs(stacks, cls0.index_select(0, samples), sel.flatten(), drop, samples)  # (m*B, D)
        w, kept = self._weights(self._selected_logits(sel, cls, num_experts))
        per_expert = (w * kept).sum(0)  # (B, E): total weight of each expert per sample
        out = self._mixed_tokens(stacks, x, per_expert, kept.any(0), drop)
        forced_cls = None if forced is None else cls.view(m, bsz, -1)[-1]
        return out, sel, kept, forced_cls

    def _routing_hidden(self, stacks, x: torch.Tensor, count: int):
        """(count, B, r) the hidden activations (after ReLU and dropout) of the first ``count``
        experts of ``stacks`` on the tokens ``x`` (B, D), for the entropies only (no autograd;
        LayerNorm's affine folded into the projection, the frozen experts' from a cache), and the
        dropout masks of all of them as the CLS outputs on the gradient path apply them (scaled
        keep-masks, (E, B, r); ``None``: no dropout)."""
        xn = F.layer_norm(x, x.shape[-1:], eps=PART_LN_EPS)
        total = sum(len(st["scale"]) for st in stacks)
        hidden, start = [], 0
        for st in stacks:
            if start >= count:
                break
            f = self._folded("experts", "fold", (st,), lambda st=st: _fold_expert(st))
            h = torch.relu(F.linear(xn, f["down_w"], f["down_b"]))  # (B, E*r)
            hidden.append(h.reshape(len(x), -1, f["rank"]).transpose(0, 1))  # (E, B, r)
            start += len(st["scale"])
        h = (hidden[0] if len(hidden) == 1 else torch.cat(hidden))[:count]
        drop = None
        if self.training and self.cfg.dropout > 0:
            # What F.dropout multiplies by: kept with probability 1 - p, scaled by 1 / (1 - p);
            # drawn from uniforms, half the time of its Bernoulli draws over hundreds of experts.
            r, p = stacks[0]["down.weight"].shape[1], self.cfg.dropout
            drop = (torch.rand((total, len(x), r), device=x.device) >= p).to(x.dtype).div_(1 - p)
            h = h * drop[:count]
        return h, drop

    def _folded(self, kind: str, name: str, sources: tuple[dict, ...], fold):
        """``fold()`` (no autograd), cached under ``name`` in the stack cache of ``kind`` while
        ``sources`` are that cache's frozen stacks, unchanged (the same objects, every tensor at
        the same version: a frozen parameter changed in place changes its stack, see
        :meth:`_stacks`). ``sources`` that are not cached stacks are folded anew."""
        entry = self._stack_cache[kind]
        if not all(any(src is e.get("stack") for e in self._stack_cache.values()) for src in sources):
            return fold()
        versions = tuple(tuple(map(_VERSION, src.values())) for src in sources)
        hit = entry.get(name)
        if hit is None or hit[1] != versions or any(a is not b for a, b in zip(hit[0], sources)):
            with torch.inference_mode(False):  # cached: usable outside inference mode too
                hit = entry[name] = (sources, versions, fold())
        return hit[2]

    def _slot_params(self, stacks, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The experts ``ids`` (n,) of ``stacks`` (see :meth:`_stacks`), one row per id (repeats
        allowed), LayerNorm's affine folded into the down projection and the output scale into
        the up projection: ``down_w`` (n, r, D), ``down_b`` (n, r), ``up_w`` (n, r, D), ``up_b``
        (n, D). The frozen stack's down fold is the routing pass's (cached); the rest is gathered
        per id, so its cost follows the ids, not the stacks' size."""
        parts, order = [], []
        for st, mine, rows in _by_stack(stacks, ids):
            count = len(st["scale"])
            f = self._folded("experts", "fold", (st,), lambda st=st: _fold_expert(st))
            down_w = f["down_w"].view(count, f["rank"], -1)  # (E, r, D), a view of the fold
            scale = st["scale"].index_select(0, rows)  # (n, D)
            parts.append(
                {
                    "down_w": down_w.index_select(0, rows),
                    "down_b": f["down_b"].view(count, -1).index_select(0, rows),
                    "up_w": (st["up.weight"].index_select(0, rows) * scale[:, :, None]).transpose(1, 2),
                    "up_b": st["up.bias"].index_select(0, rows) * scale,
                }
            )
            order.append(mine)
        if len(parts) == 1:
            return parts[0]
        back = torch.cat(order).argsort()  # index_select: its backward sums in a fixed order
        return {k: torch.cat([part[k] for part in parts]).index_select(0, back) for k in parts[0]}

    def _own_outputs(self, stacks, x: torch.Tensor, ids: torch.Tensor, drop: torch.Tensor | None, samples):
        """(n, D) expert ``ids[i]`` of ``stacks`` on token ``x[i]`` (n, D) of sample ``samples[i]``,
        with that expert's dropout mask for that sample from :meth:`_routing_hidden` (``drop``,
        (E, B, r); ``None``: no dropout)."""
        f = self._slot_params(stacks, ids)
        xn = F.layer_norm(x, x.shape[-1:], eps=PART_LN_EPS)
        h = torch.relu(torch.baddbmm(f["down_b"][:, :, None], f["down_w"], xn[:, :, None]))  # (n, r, 1)
        if drop is not None:
            h = h * drop[ids, samples][:, :, None]
        return torch.baddbmm(f["up_b"][:, None], h.transpose(1, 2), f["up_w"])[:, 0]

    def _stacks(self, modules, kind: str) -> list[dict[str, torch.Tensor]]:
        """The parameters of ``modules`` stacked (see :func:`_stacked`) in at most two parts: the
        leading modules that train nothing, from a cache, and the others, stacked now.

        Re-stacking every frozen expert at every step, and the gradient of the whole stack that
        autograd forms when one of its members trains, made a step grow with the task count. Once
        stacked, the frozen modules' parameters are views of the stack (:func:`_freeze_rows`): a
        change to one in place (a load, a user's edit) is a change to the stack, seen by the next
        forward without a scan of every parameter's storage and version at every step. The stack
        keeps spare rows, so that a task's parts join it without moving the others (moving every
        frozen parameter at every task cost a tenth of a task's time at 300 tasks). Only which
        parameters train is read per call, and only where autograd runs: without it, the last
        split serves (the stacked parameters being views, the values are the same).
        """
        modules = list(modules)
        ids = tuple(map(id, modules))
        entry = self._stack_cache.get(kind)
        if entry is None or entry["ids"] != ids:  # other modules (a task added)
            entry = self._stack_cache[kind] = _carried(entry, modules, ids)
        if entry["frozen"] is None or torch.is_grad_enabled():
            # A module is frozen when none of its parameters train; map/attrgetter keep this
            # per-call scan cheap at hundreds of tasks.
            trains = list(map(_REQUIRES_GRAD, entry["flat"]))
            first = trains.index(True) if True in trains else len(trains)
            frozen = bisect.bisect_right(entry["ends"], first)
            if frozen != entry["frozen"]:
                _freeze_rows(entry, modules, frozen)
        frozen = entry["frozen"]
        stacks = [entry["stack"]] if frozen else []
        if frozen < len(modules):
            stacks.append(_stacked(modules[frozen:]))
        return stacks

    def _perceptor_entropies(self, expert_stacks, hidden: torch.Tensor) -> torch.Tensor:
        """(T', B) entropy of perceptor t on expert t's CLS output, from the expert's hidden
        activations ``hidden[t]`` (T', B, r) alone (no autograd); ``expert_stacks`` (see
        :meth:`_stacks`) hold the experts.

        An expert's output is affine in its r hidden activations, so the perceptor's LayerNorm
        statistics and projection are too (see :func:`_fold_routing`): the T' outputs of width D
        are never formed, which was most of a step's cost at hundreds of tasks. Batched over tasks
        of equal class count; the folds of frozen tasks are cached.
        """
        ent = hidden.new_empty(hidden.shape[:2])
        perceptors = list(self.perceptors)[: hidden.shape[0]]
        groups: dict[int, list[int]] = {}
        for t, classes in enumerate(self._class_counts(perceptors)):
            groups.setdefault(classes, []).append(t)
        for classes, tasks in groups.items():
            contiguous = tasks == list(range(tasks[0], tasks[0] + len(tasks)))
            rows = torch.tensor(tasks, device=hidden.device)
            idx = slice(tasks[0], tasks[0] + len(tasks)) if contiguous else rows
            kind = f"perceptors-{classes}"
            parts = self._stacks([perceptors[t] for t in tasks], kind)
            h = hidden[idx].split([len(pst["fc.bias"]) for pst in parts])
            logits, start = [], 0
            for pst, part in zip(parts, h):
                mine = rows[start : start + len(part)]

                def fold(pst=pst, mine=mine):
                    return _fold_routing(_gathered(expert_stacks, mine), pst)

                # Cached where this part's experts all lie in the first (the frozen) experts' stack.
                inside = tasks[start + len(part) - 1] < len(expert_stacks[0]["scale"])
                f = self._folded(kind, "fold", (expert_stacks[0], pst), fold) if inside else fold()
                logits.append(_perceptor_logits(f, part))
                start += len(part)
            ent[idx] = entropy(torch.cat(logits))
        return ent

    def _class_counts(self, perceptors: list[Perceptor]) -> list[int]:
        """Each perceptor's class count, looked up once per set of perceptors."""
        ids = tuple(map(id, perceptors))
        hit = self._stack_cache.get("class-counts")
        if hit is None or hit["ids"] != ids:
            hit = self._stack_cache["class-counts"] = {"ids": ids, "counts": [p.fc.out_features for p in perceptors]}
        return hit["counts"]

    def _selected_logits(self, sel: torch.Tensor, rows: torch.Tensor, num_e: int) -> torch.Tensor:
        """(m, B, num_e) logits of the selected routers, each computed only for the samples that
        select it; ``-inf`` beyond a router's experts. The pair ``(sel[j, b], b)`` reads
        ``rows[j * B + b]`` (its router's expert on the sample's CLS token)."""
        m, bsz = sel.shape
        # The pairs (router, sample) grouped by router (stably: each group in the order of the
        # pairs), each group through its router and padded, then put back in the pairs' order:
        # two operations per selected router, which the samples of a batch spread over up to
        # m * B routers at hundreds of tasks.
        pairs = sel.flatten()
        order = pairs.argsort(stable=True)
        routers, counts = pairs[order].unique_consecutive(return_counts=True)
        groups = rows.index_select(0, order).split(counts.tolist())
        padded = [
            F.pad(self.routers[r](part), (0, num_e - r - 1), value=float("-inf"))
            for r, part in zip(routers.tolist(), groups)
        ]
        return torch.cat(padded).index_select(0, order.argsort()).reshape(m, bsz, num_e)

    def _mixed_tokens(self, stacks, x: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, drop) -> torch.Tensor:
        """``sum_e weight[b, e] * expert_e(x[b])`` over the experts ``kept[b]`` of each sample,
        the experts' parameters taken from ``stacks`` (see :meth:`_stacks`); the CLS token
        (``x[:, 0]``) under the routing pass's dropout masks ``drop`` (E, B, r), the other tokens
        under masks drawn here (``None``: no dropout).

        The experts of a sample become ``S`` slots (padded with weight 0) with their parameters
        gathered per slot (:meth:`_slot_params`), so the mixture is two batched matrix products
        and no per-expert output over all tokens is ever stored.
        """
        bsz, num_e = kept.shape
        idx = torch.arange(num_e, device=x.device).expand(bsz, -1)
        key = torch.where(kept, idx, idx + num_e).sort(-1).values[:, : int(kept.sum(-1).max())]  # kept experts first
        valid = key < num_e
        expert = torch.where(valid, key, 0)  # (B, S)
        slot_w = weight.gather(1, expert) * valid  # (B, S)
        f = self._slot_params(stacks, expert.flatten())
        s, r = expert.shape[1], f["down_w"].shape[1]
        xn = F.layer_norm(x, x.shape[-1:], eps=PART_LN_EPS)
        h = torch.relu(
            torch.baddbmm(f["down_b"].reshape(bsz, 1, s * r), xn, f["down_w"].reshape(bsz, s * r, -1).transpose(1, 2))
        )
        if drop is not None:
            own = drop[expert, torch.arange(bsz, device=x.device)[:, None]].reshape(bsz, 1, s * r)
            h = torch.cat([h[:, :1] * own, F.dropout(h[:, 1:], self.cfg.dropout, True)], 1)
        h = h * slot_w.repeat_interleave(r, 1)[:, None]
        return (
            torch.bmm(h, f["up_w"].reshape(bsz, s * r, -1))
            + torch.einsum("bs,bsd->bd", slot_w, f["up_b"].reshape(bsz, s, -1))[:, None]
        )


def _by_stack(stacks, ids: torch.Tensor):
    """For each of ``stacks`` (see ``BRMoE._stacks``) that holds some of the modules ``ids``
    (indices over all the stacks, any order, repeats allowed): ``(stack, positions, rows)``, the
    positions in ``ids`` of those modules and their rows in that stack."""
    start = 0
    for st in stacks:
        count = len(st["scale"])
        mine = ((ids >= start) & (ids < start + count)).nonzero()[:, 0]
        if len(mine):
            yield st, mine, ids.index_select(0, mine) - start
        start += count


def _picked(stacks, rows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The modules ``rows`` (ascending) of ``stacks``: each stack's rows among them, by name, one
    dict per stack that holds some (ascending rows: each stack's follow the previous stack's)."""
    return [{name: t.index_select(0, mine) for name, t in st.items()} for st, _, mine in _by_stack(stacks, rows)]


def _drop_stacks(module: BRMoE, incompatible_keys) -> None:
    module._stack_cache.clear()


def _gathered(stacks, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The modules ``rows`` (ascending) of ``stacks`` as one stack, by name."""
    picked = _picked(stacks, rows)
    return picked[0] if len(picked) == 1 else {k: torch.cat([p[k] for p in picked]) for k in picked[0]}


def _stacked(modules) -> dict[str, torch.Tensor]:
    """The parameters of identical modules stacked along a new first axis, by name."""
    params = [dict(m.named_parameters()) for m in modules]
    if len(params) == 1:  # a view: no copy, and a backward that adds nothing
        return {name: p[None] for name, p in params[0].items()}
    return {name: torch.stack([p[name] for p in params]) for name in params[0]}


def _carried(old: dict | None, modules, ids: tuple) -> dict:
    """A stack-cache entry for ``modules`` (``ids`` theirs) that keeps what ``old`` held of the
    leading modules both share: their parameters, and the stack rows those are views of."""
    keep = 0
    if old is not None:
        for a, b in zip(old["ids"], ids):
            if a != b:
                break
            keep += 1
    entry = {"ids": ids, "frozen": None}
    entry["params"] = (old["params"][:keep] if keep else []) + [list(m.parameters()) for m in modules[keep:]]
    _index_parameters(entry)
    if keep and old.get("rows"):
        entry["buffer"], entry["rows"] = old["buffer"], min(old["rows"], keep)
    return entry


def _freeze_rows(entry: dict, modules, frozen: int) -> None:
    """Make ``entry["stack"]`` the parameters of ``modules[:frozen]`` (that train nothing) stacked,
    each parameter a view of its row: same values, one storage, and the stack's version counter
    (what ``BRMoE._folded`` reads to see a change).

    The rows live in ``entry["buffer"]``, one tensor per parameter name with spare rows at the
    end; ``entry["rows"]`` leading modules are views of it already, and a module joins by having
    its row written and its parameters replaced. A buffer too small is replaced by a larger one,
    every module moving to it.
    """
    buf, rows = entry.get("buffer"), entry.get("rows", 0)
    if not frozen:
        entry.pop("stack", None)
        entry["frozen"] = 0
        return
    if buf is None or frozen > len(next(iter(buf.values()))):
        buf, rows = None, 0
    if frozen > rows:
        joining = modules[rows:frozen]
        # Never an inference tensor (a first forward under torch.inference_mode would make the
        # parameters ones: no training or in-place load afterwards).
        with torch.inference_mode(False), torch.no_grad():
            part = _stacked(joining)
            if buf is None:
                spare = max(8, frozen // 8)
                buf = {k: v.new_empty((frozen + spare, *v.shape[1:])) for k, v in part.items()}
            for k, v in part.items():
                buf[k][rows:frozen].copy_(v)
        for i, m in enumerate(joining, start=rows):
            for name, t in buf.items():
                owner, _, leaf = name.rpartition(".")
                setattr(m.get_submodule(owner), leaf, nn.Parameter(t[i], requires_grad=False))
        entry["params"][rows:frozen] = [list(m.parameters()) for m in joining]
        _index_parameters(entry)  # the joining modules' parameters are new objects
        rows = frozen
    entry.update(buffer=buf, rows=rows, frozen=frozen, stack={k: v[:frozen] for k, v in buf.items()})


def _index_parameters(entry: dict) -> None:
    """``entry["flat"]``: the parameters of ``entry["params"]`` (one list per module) in one
    list, and ``entry["ends"]``, each module's end in it."""
    entry["flat"] = list(itertools.chain.from_iterable(entry["params"]))
    entry["ends"] = list(itertools.accumulate(map(len, entry["params"])))


def _fold_expert(st: dict) -> dict:
    """An expert stack's down projection with LayerNorm's affine folded in, as one (E*r, D) matrix
    over all experts (the routing pass reads nothing else: the up side is in :func:`_fold_routing`)."""
    w = st["down.weight"]  # (E, r, D)
    return {
        "rank": w.shape[1],
        "down_w": (w * st["norm.weight"][:, None]).reshape(-1, w.shape[-1]),
        "down_b": (st["down.bias"] + torch.einsum("erd,ed->er", w, st["norm.bias"])).reshape(-1),
    }


def _fold_routing(experts: dict, perceptors: dict) -> dict:
    """Perceptor t's logits on expert t's output ``y = U h + b`` (scale folded in) as functions of
    the expert's hidden activations ``h`` (r values), for stacks of experts and their perceptors:
    with ``Uc``, ``bc`` centred over the D outputs, LayerNorm's mean is removed by
    ``y - mean(y) = Uc h + bc``, its variance is ``(h' G h + 2 g' h + c) / D`` with
    ``G = Uc' Uc``, ``g = Uc' bc``, ``c = |bc|^2``, and the logits are ``(P h + p) / sigma + q``
    with LayerNorm's affine folded into ``P``, ``p``, ``q`` (the exported graph's perceptors use
    the same fold, runtime/packing.py)."""
    up_w = experts["up.weight"] * experts["scale"][:, :, None]  # (E, D, r)
    up_b = experts["up.bias"] * experts["scale"]  # (E, D)
    uc = up_w - up_w.mean(1, keepdim=True)
    bc = up_b - up_b.mean(1, keepdim=True)
    fc_w = perceptors["fc.weight"]  # (E, C, D)
    fc = (fc_w * perceptors["norm.weight"][:, None]).transpose(1, 2)  # (E, D, C)
    d = up_w.shape[1]
    return {
        "proj": torch.einsum("edr,edc->erc", uc, fc),
        "proj_b": torch.einsum("ed,edc->ec", bc, fc),
        "gram": torch.einsum("edr,eds->ers", uc, uc) / d,
        "cross": 2 * torch.einsum("edr,ed->er", uc, bc) / d,
        "const": (bc * bc).sum(1) / d,
        "fc_b": perceptors["fc.bias"] + torch.einsum("ecd,ed->ec", fc_w, perceptors["norm.bias"]),
    }


def _perceptor_logits(f: dict, h: torch.Tensor) -> torch.Tensor:
    """(E, B, C) the perceptors' logits of :func:`_fold_routing` ``f`` on hidden activations ``h``
    (E, B, r)."""
    var = (torch.baddbmm(f["cross"][:, None], h, f["gram"]) * h).sum(-1) + f["const"][:, None]
    inv = torch.rsqrt(var.clamp_min(0) + PART_LN_EPS)  # clamp: rounding may dip below a zero variance
    return torch.baddbmm(f["proj_b"][:, None], h, f["proj"]) * inv[..., None] + f["fc_b"][:, None]
