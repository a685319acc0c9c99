"""Import a state dict saved by the reference CaRE implementation (LMMMEng/CaRE).

That code saves ``CaRENet.state_dict()``: the ViT under ``backbone.`` with timm's fused ``qkv``
split into ``q_proj/k_proj/v_proj`` and ``mlp.fc1/fc2`` renamed ``fc1/fc2``; per block
``backbone.adapter.adapter_layer{i}.`` holding ``adapter.{t}`` (experts), ``router.{t}``,
``latent_head.{t}`` (perceptors: ``.0`` LayerNorm, ``.1`` Linear) and ``shared_adapter``; and the
cosine head's blocks as ``fc.heads.{t}.0.weight``. M and K are not in the weights.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from runtime.checkpoint_files import check_state, require_finite
from runtime.errors import CheckpointError

from ..model.care_vit import CareViT, empty_model
from ..model.config import BackboneConfig, MoEConfig

_ADAPTER = re.compile(r"^backbone\.adapter\.adapter_layer(\d+)\.(.+)$")
_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.(.+)$")
_HEAD = re.compile(r"^fc\.heads\.(\d+)\.0\.weight$")

# Reference expert parameter names -> ours.
_EXPERT_KEYS = {
    "adapter_layer_norm_before.weight": "norm.weight",
    "adapter_layer_norm_before.bias": "norm.bias",
    "down_proj.weight": "down.weight",
    "down_proj.bias": "down.bias",
    "up_proj.weight": "up.weight",
    "up_proj.bias": "up.bias",
    "scale": "scale",
}
_PERCEPTOR_KEYS = {"0.weight": "norm.weight", "0.bias": "norm.bias", "1.weight": "fc.weight", "1.bias": "fc.bias"}
_BLOCK_KEYS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "fc1.weight": "mlp.fc1.weight",
    "fc1.bias": "mlp.fc1.bias",
    "fc2.weight": "mlp.fc2.weight",
    "fc2.bias": "mlp.fc2.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
}
_TOP_KEYS = {
    "backbone.cls_token": "cls_token",
    "backbone.pos_embed": "pos_embed",
    "backbone.patch_embed.proj.weight": "patch_embed.proj.weight",
    "backbone.patch_embed.proj.bias": "patch_embed.proj.bias",
    "backbone.norm.weight": "norm.weight",
    "backbone.norm.bias": "norm.bias",
}
_IGNORED = ("backbone.head.", "backbone.head_dist.", "backbone.pre_logits.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load`` (weights only) of a reference checkpoint, bare or in a wrapper dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of every kind mean the same to a user
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and unsafe:
            raise CheckpointError(
                f"{path}: holds a Python object ({unsafe.group(1)}), not only tensors; refused "
                f"(weights-only loading: re-save its state_dict() alone)"
            ) from None
        why = (
            "a pickle this loader refuses"
            if isinstance(exc, pickle.UnpicklingError)
            else (str(exc).strip().splitlines() or [""])[0][:200]
        )
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {why})") from None
    # The reference's save_checkpoint writes {"tasks": ..., "model_state_dict": ...}.
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    require_finite(state, str(path))
    return strip_data_parallel(state)


def strip_data_parallel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the ``module.`` prefix nn.DataParallel puts on every key (also where
    only the wrapped sub-module's keys carry it, as in ``backbone.module.``)."""
    return {
        k.replace("module.", "", 1)
        if k.startswith("module.")
        else k.replace(".module.", ".", 1)
        if ".module." in k
        else k: v
        for k, v in state.items()
    }


def convert_state_dict(
    state: dict[str, torch.Tensor],
    *,
    topk_routers: int = 2,
    topk_experts: int = 3,
    backbone_name: str = "vit_base_patch16_224",
    num_heads: int | None = None,
) -> CareViT:
    """Build a :class:`CareViT` holding the reference state dict's weights.

    Sizes (embedding width, depth, patch and image size, bottlenecks, task and class counts) are
    read from tensor shapes; ``num_heads`` defaults to width / 64, timm's ViT convention.
    """
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED)}
    for k in _TOP_KEYS:
        if k not in state:
            raise CheckpointError(f"not a reference CaRE state dict: missing {k}")
    dim = state["backbone.cls_token"].shape[-1]
    patch = state["backbone.patch_embed.proj.weight"].shape[-1]
    grid = round((state["backbone.pos_embed"].shape[1] - 1) ** 0.5)
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    depth = len(blocks)
    if blocks != list(range(depth)):
        raise CheckpointError(f"block indices are not contiguous: {blocks[:5]}...")
    heads = sorted({int(m.group(1)) for k in state if (m := _HEAD.match(k))})
    if not heads or heads != list(range(len(heads))):
        raise CheckpointError("no classifier blocks fc.heads.{t}.0.weight (or not contiguous)")
    task_classes = [state[f"fc.heads.{t}.0.weight"].shape[0] for t in heads]
    pre = "backbone.adapter.adapter_layer0."
    try:
        expert_dim = state[f"{pre}adapter.0.down_proj.weight"].shape[0]
        shared_dim = state[f"{pre}shared_adapter.down_proj.weight"].shape[0]
        mlp_hidden = state["backbone.blocks.0.fc1.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a reference CaRE state dict: missing {exc.args[0]}") from None

    backbone = BackboneConfig(
        name=backbone_name,
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads or max(1, dim // 64),
        mlp_ratio=mlp_hidden / dim,
    )
    moe = MoEConfig(topk_routers=topk_routers, topk_experts=topk_experts, expert_dim=expert_dim, shared_dim=shared_dim)
    model = empty_model(backbone, moe, task_classes)

    ours: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in _TOP_KEYS:
            ours[f"vit.{_TOP_KEYS[k]}"] = v
        elif m := _BLOCK.match(k):
            i, rest = m.groups()
            proj = re.match(r"attn\.([qkv])_proj\.(weight|bias)$", rest)
            if proj:
                continue  # fused below
            if rest not in _BLOCK_KEYS:
                raise CheckpointError(f"cannot map reference key {k}")
            ours[f"vit.blocks.{i}.{_BLOCK_KEYS[rest]}"] = v
        elif m := _ADAPTER.match(k):
            ours.update(_map_adapter_key(k, int(m.group(1)), m.group(2), v))
        elif m := _HEAD.match(k):
            ours[f"head.blocks.{m.group(1)}"] = v
        else:
            raise CheckpointError(f"cannot map reference key {k}")
    for i in range(depth):
        for kind in ("weight", "bias"):
            parts = [state.get(f"backbone.blocks.{i}.attn.{q}_proj.{kind}") for q in "qkv"]
            if any(p is None for p in parts):
                raise CheckpointError(f"block {i} lacks attn.q/k/v_proj.{kind}")
            ours[f"vit.blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)

    check_state(ours, {k: v.shape for k, v in model.state_dict().items()}, "reference state dict")
    model.load_state_dict(ours)
    model.requires_grad_(False)
    return model.eval()


def _map_adapter_key(key: str, block: int, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    out = f"moe.{block}."
    if rest.startswith(("ema_adapter.", "_shared_adapter.")):
        return {}  # training-time snapshot of the shared expert, not part of the model
    if m := re.match(r"^adapter\.(\d+)\.(.+)$", rest):
        t, name = m.groups()
        if name in _EXPERT_KEYS:
            return {f"{out}experts.{t}.{_EXPERT_KEYS[name]}": value}
    elif m := re.match(r"^router\.(\d+)\.(weight|bias)$", rest):
        return {f"{out}routers.{m.group(1)}.{m.group(2)}": value}
    elif m := re.match(r"^latent_head\.(\d+)\.(.+)$", rest):
        t, name = m.groups()
        if name in _PERCEPTOR_KEYS:
            return {f"{out}perceptors.{t}.{_PERCEPTOR_KEYS[name]}": value}
    elif m := re.match(r"^shared_adapter\.(.+)$", rest):
        if m.group(1) in _EXPERT_KEYS:
            return {f"{out}shared.{_EXPERT_KEYS[m.group(1)]}": value}
    raise CheckpointError(f"cannot map reference key {key}")
