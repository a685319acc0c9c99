"""Configuration of a CaRE model: the frozen ViT backbone and the BR-MoE settings."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class BackboneConfig:
    """A timm VisionTransformer: a registered name plus the sizes that may be overridden."""

    name: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2 + 1

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.create_model`` (no classifier, CLS-token pooling)."""
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            num_classes=0,
            global_pool="token",
            class_token=True,
            qkv_bias=True,
        )

    @classmethod
    def for_model(cls, name: str, **overrides) -> BackboneConfig:
        """The sizes of a registered timm ViT, with ``overrides`` applied."""
        import timm

        if name not in timm.list_models():
            raise ValueError(f"unknown timm model {name!r}")
        model = timm.create_model(name, pretrained=False, num_classes=0)
        blk = model.blocks[0]
        sizes = dict(
            img_size=model.patch_embed.img_size[0],
            patch_size=model.patch_embed.patch_size[0],
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=blk.attn.num_heads,
            mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        )
        sizes.update({k: v for k, v in overrides.items() if v is not None})
        return cls(name=name, **sizes)


# The sizes of the backbones a user names most often, so that no timm model is built to read them.
_KNOWN = {
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_224.augreg_in21k": dict(embed_dim=768, depth=12, num_heads=12),
}


def backbone_config(name: str, **overrides) -> BackboneConfig:
    """Backbone sizes for ``name`` with ``overrides`` (None values ignored)."""
    base = name.split(".")[0]
    if base in _KNOWN or name in _KNOWN:
        sizes = dict(_KNOWN.get(name, _KNOWN.get(base)))
        sizes.update({k: v for k, v in overrides.items() if v is not None})
        return BackboneConfig(name=name, **sizes)
    return BackboneConfig.for_model(name, **overrides)


@dataclass(frozen=True)
class MoEConfig:
    """BR-MoE settings (docs/MODEL.md notation: M, K, r, r_s)."""

    topk_routers: int = 2  # M
    topk_experts: int = 3  # K
    expert_dim: int = 16  # r
    shared_dim: int = 64  # r_s
    dropout: float = 0.1

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "dropout" and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {v!r}")


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
