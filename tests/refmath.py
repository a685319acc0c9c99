"""An independent re-computation of the reference CaRE network, straight from a state dict in
the reference implementation's key layout, with the routing written as a per-sample loop.

It shares no code with ``care_export``: the tests use it as the second opinion on what the
model computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def make_reference_state(
    *,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    patch: int = 8,
    img: int = 32,
    task_classes=(10, 3, 3),
    expert_dim: int = 4,
    shared_dim: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights in the reference's key layout (``CaRENet.state_dict()``), non-degenerate:
    non-zero expert scales and spread perceptor/router logits."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd: dict[str, torch.Tensor] = {}
    n = (img // patch) ** 2 + 1
    sd["backbone.cls_token"] = rnd(1, 1, dim, std=0.5)
    sd["backbone.pos_embed"] = rnd(1, n, dim, std=0.5)
    sd["backbone.patch_embed.proj.weight"] = rnd(dim, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    sd["backbone.patch_embed.proj.bias"] = rnd(dim, std=0.1)
    sd["backbone.norm.weight"] = rnd(dim, std=0.1, mean=1.0)
    sd["backbone.norm.bias"] = rnd(dim, std=0.1)
    sd["backbone.head.weight"] = rnd(7, dim)  # unused ViT head, present in real checkpoints
    sd["backbone.head.bias"] = rnd(7)
    hidden = 4 * dim
    for i in range(depth):
        b = f"backbone.blocks.{i}."
        for ln in ("norm1", "norm2"):
            sd[b + ln + ".weight"] = rnd(dim, std=0.1, mean=1.0)
            sd[b + ln + ".bias"] = rnd(dim, std=0.1)
        for q in ("q", "k", "v"):
            sd[b + f"attn.{q}_proj.weight"] = rnd(dim, dim, std=dim**-0.5)
            sd[b + f"attn.{q}_proj.bias"] = rnd(dim, std=0.1)
        sd[b + "attn.proj.weight"] = rnd(dim, dim, std=dim**-0.5)
        sd[b + "attn.proj.bias"] = rnd(dim, std=0.1)
        sd[b + "fc1.weight"] = rnd(hidden, dim, std=dim**-0.5)
        sd[b + "fc1.bias"] = rnd(hidden, std=0.1)
        sd[b + "fc2.weight"] = rnd(dim, hidden, std=hidden**-0.5)
        sd[b + "fc2.bias"] = rnd(dim, std=0.1)
        a = f"backbone.adapter.adapter_layer{i}."

        def adapter(prefix, r):
            sd[prefix + "adapter_layer_norm_before.weight"] = rnd(dim, std=0.1, mean=1.0)
            sd[prefix + "adapter_layer_norm_before.bias"] = rnd(dim, std=0.1)
            sd[prefix + "down_proj.weight"] = rnd(r, dim, std=dim**-0.5)
            sd[prefix + "down_proj.bias"] = rnd(r, std=0.1)
            sd[prefix + "up_proj.weight"] = rnd(dim, r, std=r**-0.5)
            sd[prefix + "up_proj.bias"] = rnd(dim, std=0.1)
            sd[prefix + "scale"] = rnd(dim, std=0.5)

        adapter(a + "shared_adapter.", shared_dim)
        for t, c in enumerate(task_classes):
            adapter(a + f"adapter.{t}.", expert_dim)
            sd[a + f"router.{t}.weight"] = rnd(t + 1, dim, std=0.3)
            sd[a + f"router.{t}.bias"] = rnd(t + 1, std=0.3)
            sd[a + f"latent_head.{t}.0.weight"] = rnd(dim, std=1.0)
            sd[a + f"latent_head.{t}.0.bias"] = rnd(dim, std=0.1)
            sd[a + f"latent_head.{t}.1.weight"] = rnd(c, dim, std=0.3)
            sd[a + f"latent_head.{t}.1.bias"] = rnd(c, std=0.1)
    for t, c in enumerate(task_classes):
        sd[f"fc.heads.{t}.0.weight"] = rnd(c, dim)
    return sd


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + "weight"], sd[prefix + "bias"], eps)


def _lin(x, sd, prefix):
    return x @ sd[prefix + "weight"].T + sd[prefix + "bias"]


def adapter(sd, prefix, x):
    h = torch.relu(_lin(_ln(x, sd, prefix + "adapter_layer_norm_before.", 1e-5), sd, prefix + "down_proj."))
    return _lin(h, sd, prefix + "up_proj.") * sd[prefix + "scale"]


def num_tasks(sd) -> int:
    return sum(1 for k in sd if k.startswith("fc.heads.") and k.endswith(".0.weight"))


def brmoe(sd, block: int, x: torch.Tensor, M: int, K: int):
    """BR-MoE output of ``block`` for ``x`` (B, N, d), and the per-sample routing
    ``[(sorted selected tasks, {task: sorted kept experts})]``."""
    a = f"backbone.adapter.adapter_layer{block}."
    T = num_tasks(sd)
    shared = adapter(sd, a + "shared_adapter.", x)
    outs = [adapter(sd, a + f"adapter.{t}.", x) for t in range(T)]
    if T == 1:
        return outs[0] + shared, [((0,), {0: (0,)})] * x.shape[0]
    result, routing = [], []
    for b in range(x.shape[0]):
        cls = [outs[t][b, 0] for t in range(T)]
        ent = []
        for t in range(T):
            z = _lin(_ln(cls[t], sd, a + f"latent_head.{t}.0.", 1e-5), sd, a + f"latent_head.{t}.1.")
            p = torch.softmax(z, -1)
            ent.append(float(-(p * torch.log(p + 1e-10)).sum()))
        chosen = sorted(range(T), key=lambda t: ent[t])[:M] if M < T else list(range(T))
        acc = shared[b].clone()
        kept_by = {}
        for t in chosen:
            logits = _lin(cls[t], sd, a + f"router.{t}.").tolist() + [NEG_INF] * (T - t - 1)
            if K < T:
                kept = sorted(range(T), key=lambda e: -logits[e])[:K]
                logits = [logits[e] if e in kept else -100.0 for e in range(T)]
            mx = max(logits)
            w = [math.exp(v - mx) for v in logits]
            s = sum(w)
            for e in range(T):
                acc = acc + (w[e] / s) * outs[e][b]
            kept_by[t] = tuple(e for e in range(T) if e <= t and logits[e] not in (-100.0, NEG_INF))
        result.append(acc)
        routing.append((tuple(sorted(chosen)), kept_by))
    return torch.stack(result), routing


def forward(sd, images: torch.Tensor, M: int, K: int, heads: int):
    """Cosine logits of the whole reference network, and the per-block routing."""
    dim = sd["backbone.cls_token"].shape[-1]
    patch = sd["backbone.patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(images, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["backbone.cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["backbone.pos_embed"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")})
    routing = []
    hd = dim // heads
    for i in range(depth):
        b = f"backbone.blocks.{i}."
        h = _ln(x, sd, b + "norm1.", 1e-6)
        B, N, _ = h.shape
        q, k, v = (_lin(h, sd, b + f"attn.{n}_proj.").view(B, N, heads, hd).transpose(1, 2) for n in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, -1) @ v
        xa = x + _lin(att.transpose(1, 2).reshape(B, N, dim), sd, b + "attn.proj.")
        mlp = _lin(F.gelu(_lin(_ln(xa, sd, b + "norm2.", 1e-6), sd, b + "fc1.")), sd, b + "fc2.")
        moe, r = brmoe(sd, i, xa, M, K)
        routing.append(r)
        x = xa + mlp + moe
    f = _ln(x, sd, "backbone.norm.", 1e-6)[:, 0]
    w = torch.cat([sd[f"fc.heads.{t}.0.weight"] for t in range(num_tasks(sd))])
    return F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).T, routing
