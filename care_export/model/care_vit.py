"""CaRE on a timm ViT: frozen backbone, a BR-MoE in parallel to the MLP of every block, and a
cosine classifier that grows by one weight block per task."""

from __future__ import annotations

import itertools
import operator
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.checkpoint_files import check_state
from runtime.errors import CareError
from runtime.numerics import NORM_EPS

from . import cpu_linear
from .brmoe import BRMoE, Routing
from .config import BackboneConfig, MoEConfig

FORWARD_MODES = ("reference", "sparse")


class CosineHead(nn.Module):
    """Cosine classifier, no bias: ``logit_c = cos(f, w_c)``; one ``C_t x d`` block per task.

    The blocks are rows of one ``(C, d)`` parameter, ``weight``, that grows by a copy at each
    task: a training step then reads, differentiates and updates one tensor, not hundreds of
    blocks concatenated (which made a step grow with the task count). ``blocks`` are views of it,
    and the state dict keeps one entry per task (``blocks.{t}``), as checkpoints store the head.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.sizes: list[int] = []
        self.weight = nn.Parameter(torch.empty(0, dim))

    def add_task(self, num_classes: int) -> None:
        w = torch.empty(num_classes, self.dim)
        nn.init.trunc_normal_(w, std=0.02)
        with torch.no_grad():
            grown = torch.cat([self.weight, w.to(self.weight.device)])
        self.weight = nn.Parameter(grown)
        self.sizes.append(num_classes)

    @property
    def blocks(self) -> tuple[torch.Tensor, ...]:
        """Each task's rows of ``weight`` (views)."""
        return self.weight.split(self.sizes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return cosine_logits(f, self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for t, block in enumerate(self.blocks):
            destination[f"{prefix}blocks.{t}"] = block if keep_vars else block.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        keys = [f"{prefix}blocks.{t}" for t in range(len(self.sizes))]
        missing += [k for k in keys if k not in state_dict]
        unexpected += [k for k in state_dict if k.startswith(prefix) and k not in keys]  # no submodules
        for k, block in zip(keys, self.blocks):
            if k not in state_dict:
                continue
            value = state_dict[k]
            if value.shape != block.shape:
                errors.append(f"size mismatch for {k}: {tuple(value.shape)} given, {tuple(block.shape)} in the model")
                continue
            with torch.no_grad():
                block.copy_(value)


def cosine_logits(f: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos(f, w_c)`` for every row ``w_c`` of ``weight``."""
    return F.linear(F.normalize(f, dim=-1, eps=NORM_EPS), F.normalize(weight, dim=-1, eps=NORM_EPS))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False when offline mode is set)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TIMM_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except OSError:
        return False
    return True


def go_offline() -> None:
    """Make huggingface_hub use its local cache only, in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HUB_OFFLINE = True


def build_backbone(cfg: BackboneConfig, weights: str | Path | None = None) -> nn.Module:
    """A timm VisionTransformer without classifier, frozen.

    ``weights``: None (random init), ``"hub"`` (timm's pretrained weights, needs network), or a
    local file (safetensors, a timm/PyTorch checkpoint, or a ``.npz`` of the original JAX ViT).
    """
    import timm

    pretrained = weights == "hub"
    if pretrained and not hub_reachable():
        go_offline()  # weights already in the local cache still load; others fail at once, not after retries
    try:
        vit = timm.create_model(cfg.name, pretrained=pretrained, **cfg.timm_kwargs())
    except Exception as exc:  # noqa: BLE001 - timm raises many kinds here; the user needs one line
        if pretrained:
            raise CareError(
                f"cannot fetch pretrained weights for {cfg.name} from the hub ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); pass --backbone-weights FILE"
            ) from None
        raise
    if weights is not None and not pretrained:
        load_backbone_weights(vit, weights)
    vit.requires_grad_(False)
    cpu_linear.use_for(vit)  # frozen weights: oneDNN on CPU, forward and the input's gradient
    return vit


def load_backbone_weights(vit: nn.Module, path: str | Path) -> None:
    """Load ViT weights from a local file into a timm VisionTransformer (classifier keys ignored)."""
    path = Path(path)
    if not path.is_file():
        raise CareError(f"backbone weights not found: {path}")
    if path.suffix == ".npz":
        from timm.models.vision_transformer import _load_weights

        _load_weights(vit, str(path))
        return
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CareError(f"cannot read backbone weights {path}: {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    own = vit.state_dict()
    check_state(state, {k: v.shape for k, v in own.items()}, f"backbone weights {path}", allow_extra=True)
    vit.load_state_dict({k: state[k] for k in own})


class CareViT(nn.Module):
    """The continual learner. ``forward(x)`` is the single-pass inference (task id unknown)."""

    def __init__(self, backbone: BackboneConfig, moe: MoEConfig, weights: str | Path | None = None):
        super().__init__()
        self.backbone_cfg = backbone
        self.moe_cfg = moe
        self.vit = build_backbone(backbone, weights)
        self.moe = nn.ModuleList(BRMoE(backbone.embed_dim, moe) for _ in range(backbone.depth))
        self.head = CosineHead(backbone.embed_dim)
        self.task_classes: list[int] = []
        self._walks: dict = {}  # see _walk

    # ------------------------------------------------------------------ mode and freezing
    # nn.Module's train() and requires_grad_() walk the module tree through chains of generators,
    # a few microseconds a module: at hundreds of tasks (tens of thousands of per-task modules) a
    # task's mode switches and freezes took a tenth of a second. The same effects over a flat list
    # of the modules, kept until a module or parameter is registered anywhere (see _walk).
    def train(self, mode: bool = True) -> CareViT:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        plain, own = _walk(self, own_train_stops=True)
        self.training = mode
        for m in plain:
            m.__dict__["training"] = mode  # where nn.Module.train stores it
        for m in own:
            m.train(mode)  # a module with its own rule applies it to its subtree
        return self

    def requires_grad_(self, requires_grad: bool = True) -> CareViT:
        params = _walk(self, own_train_stops=None)
        # The parameters to switch, picked in C: at tens of thousands, most of them already as
        # asked, a Python test of each took most of the time.
        flag = operator.attrgetter("requires_grad")
        for p in list(itertools.filterfalse(flag, params) if requires_grad else filter(flag, params)):
            p.requires_grad_(requires_grad)
        return self

    def _apply(self, fn, recurse=True):
        self._walks.clear()  # a conversion may give modules new parameters without registering them
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return {**super().__getstate__(), "_walks": {}}  # a copy or a pickle carries no cached walk

    # ------------------------------------------------------------------ growth
    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def num_classes(self) -> int:
        return sum(self.task_classes)

    def add_task(self, num_classes: int, init_from_older: bool = True) -> None:
        if num_classes < 1:
            raise CareError(f"a task needs at least one class, got {num_classes}")
        for m in self.moe:
            m.add_task(num_classes, init_from_older)
        self.head.add_task(num_classes)
        self.task_classes.append(int(num_classes))

    def task_parameters(self, task: int) -> dict[str, nn.Parameter]:
        """The parameters that belong to ``task`` alone (expert, router, perceptor per block)."""
        out = {}
        for i, m in enumerate(self.moe):
            for part in ("experts", "routers", "perceptors"):
                for name, p in getattr(m, part)[task].named_parameters():
                    out[f"blocks.{i}.{part}.{name}"] = p
        return out

    # ------------------------------------------------------------------ forwards
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))

    def _blocks(self, x: torch.Tensor, moe_fn) -> torch.Tensor:
        for blk, moe in zip(self.vit.blocks, self.moe):
            xa = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
            x = xa + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xa)))) + moe_fn(moe, xa)
        return x

    def forward_features(self, x: torch.Tensor, mode: str = "reference", routing: list | None = None):
        """CLS features ``LN_final(z)[:, 0]`` with the single-pass inference routing.

        ``mode``: ``"reference"`` (every expert on every token) or ``"sparse"`` (same decisions,
        only selected experts on the full sequence). Routing decisions are appended to
        ``routing`` (one :class:`Routing` per block) when a list is given.
        """
        if self.num_tasks == 0:
            raise CareError("the model has no task yet")
        if mode not in FORWARD_MODES:
            raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")

        def moe_fn(moe: BRMoE, xa):
            fwd = moe.forward_reference if mode == "reference" else moe.forward_sparse
            out, r = fwd(xa, want_routing=routing is not None)
            if routing is not None:
                routing.append(r)
            return out

        return self.vit.norm(self._blocks(self._embed(x), moe_fn))[:, 0]

    def forward(self, x: torch.Tensor, mode: str = "reference") -> torch.Tensor:
        """Cosine logits over every learned class."""
        return self.head(self.forward_features(x, mode))

    def forward_with_routing(self, x: torch.Tensor, mode: str = "reference") -> tuple[torch.Tensor, list[Routing]]:
        routing: list[Routing] = []
        logits = self.head(self.forward_features(x, mode, routing))
        return logits, routing

    def forward_train(self, x: torch.Tensor, task: int, mode: str = "sparse") -> dict:
        """The forward used while learning ``task``: features, head logits over all learned
        classes, and the per-block perceptor logits of ``task``.

        ``mode``: ``"sparse"`` (:meth:`BRMoE.forward_train_sparse`, what the trainer uses: a step
        costs about the same at any ``task``) or ``"reference"`` (every expert over every token,
        the tested reference): the same loss and gradients to float rounding.
        """
        if mode not in FORWARD_MODES:
            raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")
        latents = []

        def moe_fn(moe: BRMoE, xa):
            fwd = moe.forward_train if mode == "reference" else moe.forward_train_sparse
            out, latent = fwd(xa, task)
            latents.append(latent)
            return out

        feats = self.vit.norm(self._blocks(self._embed(x), moe_fn))[:, 0]
        return {"features": feats, "logits": self.head(feats), "latents": latents}

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """CLS features of the plain backbone (no BR-MoE)."""
        return self.vit.norm(self.vit.blocks(self._embed(x)))[:, 0]


def _submodules(root: nn.Module, own_train_stops: bool = True) -> tuple[list[nn.Module], list[nn.Module]]:
    """``root`` and its submodules (a shared one once per path), a level at a time: ``(plain,
    own)``. With ``own_train_stops``, a module other than ``root`` that has its own ``train`` is
    in ``own`` and its submodules in neither; otherwise every module is in ``plain``."""
    plain, own, level = [], [], [root]
    while level:
        if own_train_stops:
            own += [m for m in level if m is not root and type(m).train is not nn.Module.train]
            level = [m for m in level if m is root or type(m).train is nn.Module.train]
        plain += level
        level = [c for m in level for c in m._modules.values() if c is not None]
    return plain, own


# Torch calls these hooks whenever any module registers a submodule or a parameter (assignment,
# add_module, ModuleList.append, load_state_dict(assign=True)). They empty the cached walks of
# every live model, so that a walk never misses a module or parameter registered since, and never
# keeps a replaced one alive: a frozen stack replaces parameters at every task (brmoe._freeze_rows),
# and a kept list of the replaced ones held a second copy of every frozen expert (0.4 GB in a
# ViT-B/16 training step at T = 301). A parameter's registration empties the parameter walk
# alone: the module walks stay valid.
_cached_roots: weakref.WeakSet = weakref.WeakSet()  # models holding a walk (weakly: no leak)


def _module_registered(*_) -> None:
    for root in _cached_roots:
        root._walks.clear()


def _parameter_registered(*_) -> None:
    for root in _cached_roots:
        root._walks.pop(None, None)


nn.modules.module.register_module_module_registration_hook(_module_registered)
nn.modules.module.register_module_parameter_registration_hook(_parameter_registered)


def _walk(root: CareViT, own_train_stops: bool | None):
    """:func:`_submodules` of ``root`` but ``root`` itself (``own_train_stops=None``: the parameters
    of every module, in one list), cached in ``root._walks`` until the next registration of a
    module (or, for the parameters, of a parameter) anywhere. (Without ``root``, the cache holds
    no cycle through it.)"""
    found = root._walks.get(own_train_stops)
    if found is None:
        if own_train_stops is None:
            plain, _ = _submodules(root, own_train_stops=False)
            found = [p for m in plain for p in m._parameters.values() if p is not None]
        else:
            plain, own = _submodules(root, own_train_stops)
            found = ([m for m in plain if m is not root], own)
        root._walks[own_train_stops] = found
        _cached_roots.add(root)
    return found


def empty_model(backbone: BackboneConfig, moe: MoEConfig, task_classes: list[int]) -> CareViT:
    """A model with the given tasks and uninitialised weights, for loaders that fill every
    tensor from files (random initialisation of a 301-task model costs seconds)."""
    with torch.device("meta"):
        model = CareViT(backbone, moe)
        for c in task_classes:
            model.add_task(c, init_from_older=False)
    return model.to_empty(device="cpu")
