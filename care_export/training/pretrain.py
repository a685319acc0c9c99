"""Pre-training a small ViT on built-in classes, the stand-in for ImageNet pre-training.

CaRE assumes a backbone whose frozen features already separate images well. For the built-in
demo such a backbone is trained here, on built-in classes that no continual sequence uses
(ids from ``PRETRAIN_FIRST_CLASS`` on), and cached on disk under a name derived from every
setting that changes its weights, so the next run loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from runtime.atomic import replacing
from runtime.cache import default_cache_dir
from runtime.preprocess import Preprocessing

from ..data.builtin import PRETRAIN_FIRST_CLASS, BuiltinSource
from ..data.sources import LabelledImages, train_transform
from ..model.config import BackboneConfig, backbone_config

log = logging.getLogger(__name__)

# Bump when the built-in images or the recipe below change, so that stale caches are not reused.
RECIPE_VERSION = 1

# The demo's backbone: ViT-Tiny width on 32 px images with 8 px patches (17 tokens), 6 blocks.
BUILTIN_BACKBONE = backbone_config("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=6)


def builtin_preprocessing(img_size: int) -> Preprocessing:
    """The input of a backbone pre-trained here: the built-in images at its size, scaled to [-1, 1]."""
    return Preprocessing.for_input(img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class PretrainConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BUILTIN_BACKBONE)
    classes: int = 150
    images_per_class: int = 48
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.35, 1.0)
    data_seed: int = 0
    seed: int = 0
    # Weight of a loss that pulls the features of two random hue turns of each image together
    # (each batch is seen turned by a random hue, then by a second one): 0 trains on the images as
    # drawn. A backbone trained with it tells shapes and textures apart but ignores hue.
    hue_invariance: float = 0.0
    # After training, every write into the residual stream (patch and position embeddings, CLS
    # token, attention and MLP outputs) is multiplied by this. Each block reads the stream through a
    # LayerNorm, so the backbone computes the same features (up to LayerNorm's epsilon); but an
    # adapter's output, added to the stream, then weighs 1 / residual_scale times more.
    residual_scale: float = 1.0

    def key(self) -> str:
        """A digest of every setting that changes the weights (settings added later count only
        when they differ from their default, so that earlier backbones keep their key)."""
        d = asdict(self)
        for f in fields(self):
            if f.name in _LATER_SETTINGS and d[f.name] == f.default:
                del d[f.name]
        blob = json.dumps(dict(d, recipe=RECIPE_VERSION), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_LATER_SETTINGS = ("hue_invariance", "residual_scale")

# The backbone of the shifted sequence (``--data builtin-shift``, ``data/shift.py``), whose classes
# differ only in hue within a task. Hue-invariant, its frozen features hardly tell those classes
# apart, which the BR-MoE's adapters, reading the early tokens, can. Its residual stream is scaled
# down 20 times: an adapter's output scale starts at zero (the reference's initialisation) and at
# full residual scale grows too slowly to matter in the demo's ~100 SGD steps per task (measured:
# the adapters gain nothing there); at 1/20 they learn the task in that budget.
SHIFT_PRETRAIN = PretrainConfig(hue_invariance=1.0, residual_scale=0.05)


def pretrain_config(data: str, backbone: BackboneConfig) -> PretrainConfig:
    """The pre-training of the built-in backbone that a built-in sequence ``data`` uses."""
    return replace(SHIFT_PRETRAIN if str(data) == "builtin-shift" else PretrainConfig(), backbone=backbone)


def pretrained_backbone(
    cfg: PretrainConfig = PretrainConfig(), cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """Path of the pre-trained backbone weights (safetensors), trained now if not cached."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "pretrained" / f"{cfg.backbone.name}-{cfg.backbone.img_size}px-{cfg.key()}.safetensors"
    if path.is_file():
        log.debug(f"pre-trained backbone from the cache: {path}")
        return path
    what = " (hue-invariant, for builtin-shift)" if cfg.hue_invariance else ""
    log.info(f"pre-training the built-in backbone{what} ({cfg.epochs} epochs; cached afterwards as {path})")
    vit = pretrain(cfg, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in vit.state_dict().items()},
            str(tmp),
            metadata={"pretrain": json.dumps(asdict(cfg))},
        )
    return path


def pretrain(cfg: PretrainConfig, progress: bool = True) -> nn.Module:
    """Train a ViT with a linear classifier on the pre-training classes; return the ViT."""
    import timm

    torch.manual_seed(cfg.seed)
    vit = timm.create_model(cfg.backbone.name, pretrained=False, **cfg.backbone.timm_kwargs())
    head = nn.Linear(cfg.backbone.embed_dim, cfg.classes)
    source = BuiltinSource(
        cfg.classes,
        first_class=PRETRAIN_FIRST_CLASS,
        train_per_class=cfg.images_per_class,
        test_per_class=1,
        image_size=cfg.backbone.img_size,
        seed=cfg.data_seed,
    )
    labels = list(range(cfg.classes))
    pre = builtin_preprocessing(cfg.backbone.img_size)
    data = LabelledImages(source, "train", labels, labels, train_transform(pre, cfg.crop_scale))
    loader = DataLoader(
        data, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed)
    )
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(loader)
    warmup = max(1, int(cfg.warmup_epochs * len(loader)))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    hue_gen = torch.Generator().manual_seed(cfg.seed + 1)
    vit.train()
    bar = tqdm(range(cfg.epochs), desc="pre-training backbone", unit="epoch", disable=None if progress else True)
    for epoch in bar:
        correct = seen = 0
        for x, y in loader:
            if cfg.hue_invariance:  # the batch under two random hue turns
                f, other = vit(torch.cat([turn_hue(x, hue_gen), turn_hue(x, hue_gen)])).chunk(2)
            else:
                f = vit(x)
            logits = head(f)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if cfg.hue_invariance:
                loss = loss + cfg.hue_invariance * (_unit(f) - _unit(other)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        bar.set_postfix(loss=f"{loss.item():.3f}", train_acc=f"{100 * correct / seen:.1f}%")
        log.debug(
            "pre-training epoch %d/%d: loss %.3f, train accuracy %.1f%%",
            epoch + 1,
            cfg.epochs,
            loss.item(),
            100 * correct / seen,
        )
    vit.requires_grad_(False)
    if cfg.residual_scale != 1.0:
        scale_residual_stream(vit, cfg.residual_scale)
    return vit.eval()


def _unit(f: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(f, f.shape[1:])


def turn_hue(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of a batch (normalised to [-1, 1], grey at 0) turned by its own random hue."""
    from ..data.shift import hue_rotation

    angles = torch.rand(len(x), generator=generator, dtype=torch.float64) * 2 * math.pi
    turns = torch.stack([torch.from_numpy(hue_rotation(float(a))) for a in angles]).to(x.dtype)
    return torch.einsum("bij,bjhw->bihw", turns, x).clamp(-1, 1)


@torch.no_grad()
def scale_residual_stream(vit: nn.Module, factor: float) -> None:
    """Multiply every write into a timm ViT's residual stream by ``factor`` (see
    ``PretrainConfig.residual_scale``)."""
    writes = [vit.patch_embed.proj, *(m for blk in vit.blocks for m in (blk.attn.proj, blk.mlp.fc2))]
    for p in [vit.cls_token, vit.pos_embed, *(p for m in writes for p in m.parameters())]:
        p.mul_(factor)
