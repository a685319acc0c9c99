"""The reference implementation's configuration files (``exps/<dataset>/*.json``) and presets.

A configuration is read into :class:`ReferenceSettings`: the values ``care-export train`` and
``import-official`` take from it, named after their command-line options. Every key is either
mapped, known to have no effect here (bookkeeping of the reference's runner), or refused; a value
this project cannot reproduce (another optimizer, dropout, no shuffling) is refused too, all named
in one line. The reference's own files ship in ``reference_configs/`` as presets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import CareError
from runtime.numerics import COS_SCALE

PRESET_DIR = Path(__file__).with_name("reference_configs")

# The reference's backbone names -> timm's.
BACKBONES = {"vit_base_patch16_224_in21k_brmoe": "vit_base_patch16_224.augreg_in21k"}

# Per dataset name: input normalisation (mean = std) and training transform (datasets.INPUT_SETS).
# CIFAR-224, ImageNet-A and VTAB normalise with 0.5; the others feed [0, 1] pixels.
DATASETS = {
    "cifar224": ((0.5, 0.5), "cifar224"),
    "imageneta": ((0.5, 0.5), "imageneta"),
    "vtab": ((0.5, 0.5), "vtab"),
    "imagenetr": ((0.0, 1.0), "common"),
    "objectnet": ((0.0, 1.0), "common"),
    "omnibenchmark": ((0.0, 1.0), "common"),
    "omnibenchmark1k": ((0.0, 1.0), "common"),
}

# Keys of the reference's runner that change nothing the model learns here.
_NO_EFFECT = (
    "prefix",
    "device",
    "memory_per_class",
    "fixed_memory",
    "ca_storage_efficient_method_choices",
    "pretrained",
    "init_milestones",
    "init_lr_decay",
    "r",
    "reg",
    "reinit_optimizer",
    "use_orth",
)
# Keys whose only supported value is the reference's CaRE one.
_REQUIRED_VALUES = {
    "model_name": "care",
    "optimizer": "sgd",
    "scheduler": "cosine",
    "memory_size": 0,
    "shuffle": True,
    "drop": 0,
    "drop_path": 0,
}
_MAPPED = (
    "dataset",
    "init_cls",
    "increment",
    "seed",
    "backbone_type",
    "tuned_epoch",
    "init_lr",
    "batch_size",
    "weight_decay",
    "min_lr",
    "crct_epochs",
    "ca_lr",
    "ca_storage_efficient_method",
    "decay",
    "scale",
    "m",
    "expert_dim",
    "adapter_dim",
    "topk_experts",
    "topk_routers",
    "amp",
    "iter_pred",
    "aux_cos_loss",
    "self_dist_loss",
)
_REQUIRED = (
    "dataset",
    "init_cls",
    "increment",
    "tuned_epoch",
    "init_lr",
    "batch_size",
    "crct_epochs",
    "ca_lr",
    "ca_storage_efficient_method",
)


@dataclass(frozen=True)
class ReferenceSettings:
    """A reference configuration in this project's terms; ``options`` maps ``care-export train``
    option names (Python spelling) to values."""

    name: str
    dataset: str
    options: dict

    def import_options(self) -> dict:
        """The subset ``import-official`` takes: M, K, input normalisation, class-order seed."""
        return {k: self.options[k] for k in IMPORT_KEYS}


IMPORT_KEYS = ("topk_routers", "topk_experts", "mean", "std", "seed")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CareError(f"configuration not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CareError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CareError(f"{path}: expected a JSON object of settings")
    return raw


def load_preset(name: str) -> ReferenceSettings:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise CareError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return parse(read_json(path), name)


def load_config(path: str | Path) -> ReferenceSettings:
    return parse(read_json(path), str(path))


def parse(raw: dict, where: str) -> ReferenceSettings:
    """Map a reference configuration; one CareError names every problem."""
    problems = []
    unknown = sorted(k for k in raw if k not in _MAPPED + _NO_EFFECT + tuple(_REQUIRED_VALUES))
    if unknown:
        problems.append(f"unknown keys {', '.join(unknown)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        problems.append(f"missing keys {', '.join(missing)}")
    bad = [f"{k}={raw[k]!r} (only {v!r})" for k, v in _REQUIRED_VALUES.items() if k in raw and raw[k] != v]
    dataset = raw.get("dataset")
    if dataset is not None and dataset not in DATASETS:
        bad.append(f"dataset={dataset!r} (supported: {', '.join(DATASETS)})")
    backbone = raw.get("backbone_type", "vit_base_patch16_224_in21k_brmoe")
    if backbone not in BACKBONES:
        bad.append(f"backbone_type={backbone!r} (supported: {', '.join(BACKBONES)})")
    seeds = raw.get("seed", [1993])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if len(seeds) != 1 or not isinstance(seeds[0], int):
        bad.append(f"seed={raw.get('seed')!r} (one integer seed per run)")
    if bad:
        problems.append(f"unsupported values {', '.join(bad)}")
    if problems:
        raise CareError(f"{where}: {'; '.join(problems)}")

    (mean, std), input_set = DATASETS[dataset]
    options = dict(
        init_cls=int(raw["init_cls"]),
        increment=int(raw["increment"]),
        seed=int(seeds[0]),
        backbone=BACKBONES[backbone],
        epochs=int(raw["tuned_epoch"]),
        lr=float(raw["init_lr"]),
        batch_size=int(raw["batch_size"]),
        weight_decay=float(raw.get("weight_decay", 5e-4)),
        min_lr=float(raw.get("min_lr", 1e-8)),
        ca_epochs=int(raw["crct_epochs"]),
        ca_lr=float(raw["ca_lr"]),
        ca_method=str(raw["ca_storage_efficient_method"]),
        align_decay="reference" if raw.get("decay", False) else "off",
        scale=float(raw.get("scale", COS_SCALE)),
        margin=float(raw.get("m", 0.0)),
        expert_dim=int(raw.get("expert_dim", 16)),
        shared_dim=int(raw.get("adapter_dim", 64)),
        topk_experts=int(raw.get("topk_experts", 3)),
        topk_routers=int(raw.get("topk_routers", 2)),
        amp=bool(raw.get("amp", False)),
        # The reference evaluates iteratively unless the configuration says iter_pred: false.
        eval_mode="iterative" if raw.get("iter_pred", True) else "single",
        aux_cos_loss=bool(raw.get("aux_cos_loss", True)),
        self_dist_loss=bool(raw.get("self_dist_loss", True)),
        mean=(mean,) * 3,
        std=(std,) * 3,
        input_set=input_set,
    )
    return ReferenceSettings(where, dataset, options)
