"""Commands that make checkpoints: ``synth-ckpt``, ``import-official`` (``info`` describes them)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from runtime.errors import CareError
from runtime.outdir import CHECKPOINT, output_dir
from runtime.preprocess import Preprocessing

from ..model.config import MoEConfig, backbone_config
from .log import hint, say

POSITIVE = click.IntRange(min=1)


def _backbone(name: str, **overrides):
    """``backbone_config`` with an unknown name or impossible sizes as a one-line error."""
    try:
        return backbone_config(name, **overrides)
    except (ValueError, RuntimeError) as exc:
        raise CareError(f"--backbone {name}: {exc}") from None


def moe_options(f):
    """The BR-MoE options shared by the commands that create a model."""
    for opt in reversed(
        [
            click.option(
                "--topk-routers",
                "-M",
                default=2,
                show_default=True,
                type=POSITIVE,
                help="Routers selected per sample (M).",
            ),
            click.option(
                "--topk-experts", "-K", default=3, show_default=True, type=POSITIVE, help="Experts kept per router (K)."
            ),
            click.option("--expert-dim", default=16, show_default=True, type=POSITIVE, help="Expert bottleneck r."),
            click.option(
                "--shared-dim", default=64, show_default=True, type=POSITIVE, help="Shared expert bottleneck r_s."
            ),
        ]
    ):
        f = opt(f)
    return f


def reference_options(keys: tuple[str, ...] | None = None):
    """``--config FILE`` / ``--preset NAME``: a reference configuration whose values become the
    defaults of the command's options (those in ``keys``; all when None), so that options given
    on the command line override it."""

    def load(ctx, param, value):
        from ..training.reference_config import load_config, load_preset

        if value is None:
            return None
        if ctx.meta.get("care_reference"):
            raise click.UsageError("give --config or --preset, not both")
        settings = load_preset(value) if param.name == "preset" else load_config(value)
        ctx.meta["care_reference"] = settings
        values = settings.options if keys is None else {k: settings.options[k] for k in keys}
        ctx.default_map = dict(ctx.default_map or {}, **values)
        return value

    def decorate(f):
        f = click.option(
            "--preset",
            default=None,
            is_eager=True,
            expose_value=False,
            callback=load,
            help="A reference configuration by name (care-export presets lists them).",
        )(f)
        return click.option(
            "--config",
            default=None,
            is_eager=True,
            expose_value=False,
            callback=load,
            type=click.Path(dir_okay=False, path_type=Path),
            help="A configuration file in the reference's JSON format (exps/<dataset>/*.json); "
            "options given override it.",
        )(f)

    return decorate


def backbone_options(f):
    """Backbone name and size overrides (custom ViT sizes)."""
    for opt in reversed(
        [
            click.option("--backbone", default="vit_base_patch16_224", show_default=True, help="timm ViT name."),
            click.option("--img-size", type=POSITIVE, default=None, help="Override the input size."),
            click.option("--patch-size", type=POSITIVE, default=None, help="Override the patch size."),
            click.option("--embed-dim", type=POSITIVE, default=None, help="Override the embedding width."),
            click.option("--depth", type=POSITIVE, default=None, help="Override the number of blocks."),
            click.option("--num-heads", type=POSITIVE, default=None, help="Override the number of attention heads."),
        ]
    ):
        f = opt(f)
    return f


@click.command("synth-ckpt")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Checkpoint directory.")
@backbone_options
@moe_options
@click.option("--init-cls", default=10, show_default=True, type=POSITIVE, help="Classes of the first task.")
@click.option("--increment", default=10, show_default=True, type=POSITIVE, help="Classes of every later task.")
@click.option("--tasks", default=10, show_default=True, type=POSITIVE, help="Number of tasks.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing checkpoint.")
def synth_ckpt_command(
    out,
    backbone,
    img_size,
    patch_size,
    embed_dim,
    depth,
    num_heads,
    topk_routers,
    topk_experts,
    expert_dim,
    shared_dim,
    init_cls,
    increment,
    tasks,
    seed,
    force,
):
    """Write a random-weight checkpoint of any size (no training), for export and benchmarks.

    \b
    Example (the 301-task OmniBenchmark-1K shape, B100-Inc3):
      care-export synth-ckpt -o ckpt/ --backbone vit_base_patch16_224 \\
          --init-cls 100 --increment 3 --tasks 301
    """
    from ..checkpoint.format import save_checkpoint
    from ..checkpoint.synth import synth_model, task_sizes

    with output_dir(out, CHECKPOINT, force=force) as tmp:
        cfg = _backbone(
            backbone, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads
        )
        moe = MoEConfig(topk_routers, topk_experts, expert_dim, shared_dim)
        t0 = time.perf_counter()
        model = synth_model(cfg, moe, task_sizes(init_cls, increment, tasks), seed=seed, progress=True)
        t1 = time.perf_counter()
        manifest = save_checkpoint(
            model,
            tmp,
            preprocessing=Preprocessing.for_input(cfg.img_size, (0.5,) * 3, (0.5,) * 3),
            extra={"sequence": {"init_cls": init_cls, "increment": increment, "seed": seed, "synthetic": True}},
        )
        t2 = time.perf_counter()
    nbytes = sum(e["bytes"] for e in [manifest["backbone"], manifest["shared"], manifest["head"], *manifest["tasks"]])
    params = sum(p.numel() for p in model.parameters())
    say(
        f"wrote {out}: {tasks} tasks, {model.num_classes} classes, {params / 1e6:.1f} M parameters, "
        f"{nbytes / 2**20:.1f} MiB (build {t1 - t0:.1f} s, write {t2 - t1:.1f} s)"
    )
    hint(f"care-export onnx {out} --tasks CAPACITY -o ARTIFACT")


@click.command("import-official")
@reference_options(("topk_routers", "topk_experts", "mean", "std", "seed"))
@click.argument("state_dict_path", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Checkpoint directory.")
@click.option(
    "--topk-routers", "-M", default=2, show_default=True, type=POSITIVE, help="M, from the reference's JSON config."
)
@click.option(
    "--topk-experts", "-K", default=3, show_default=True, type=POSITIVE, help="K, from the reference's JSON config."
)
@click.option("--backbone", default="vit_base_patch16_224", show_default=True, help="timm name recorded for the ViT.")
@click.option("--num-heads", type=POSITIVE, default=None, help="Attention heads (default: width / 64).")
@click.option(
    "--mean", nargs=3, type=float, default=(0.0, 0.0, 0.0), show_default=True, help="Input normalisation mean."
)
@click.option("--std", nargs=3, type=float, default=(1.0, 1.0, 1.0), show_default=True, help="Input normalisation std.")
@click.option(
    "--class-names",
    type=click.Path(exists=True, path_type=Path),
    help="Text file, one class name a line "
    "(in learning order; with --seed, in the dataset's order, e.g. its sorted class folders).",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Put --class-names in the reference's learning order: its data "
    "manager permutes the dataset's classes with the run's seed [default: a configuration's seed].",
)
@click.option("--force", is_flag=True, help="Replace an existing checkpoint.")
def import_official_command(
    state_dict_path, out, topk_routers, topk_experts, backbone, num_heads, mean, std, class_names, seed, force
):
    """Convert a checkpoint saved by the reference CaRE code into a checkpoint directory.

    Reads the network state dict that the reference's inference.py loads (bare, or inside a
    'state_dict' / 'model' entry) with torch.load(weights_only=True).

    The reference's save_checkpoint wrapper {"tasks", "model_state_dict"} and DataParallel's
    'module.' prefixes are unwrapped. --preset/--config take M, K, the input normalisation and
    the class-order seed from a reference configuration.

    \b
    Example (301-task OmniBenchmark-1K run; M and K from its JSON config):
      care-export import-official care_ob1k_b100inc3.pth -o ckpt/ -M 2 -K 3
      care-export import-official care_301.pkl -o ckpt/ --preset ob1k_b100inc3 --class-names classes.txt
    """
    from ..checkpoint.format import save_checkpoint
    from ..checkpoint.official import convert_state_dict, read_state_dict
    from ..data.sources import class_order

    with output_dir(out, CHECKPOINT, force=force, inputs=[state_dict_path]) as tmp:
        model = convert_state_dict(
            read_state_dict(state_dict_path),
            topk_routers=topk_routers,
            topk_experts=topk_experts,
            backbone_name=backbone,
            num_heads=num_heads,
        )
        names = class_names.read_text().splitlines() if class_names else None
        extra = {"source": {"kind": "reference-state-dict", "path": str(state_dict_path)}}
        if names is not None and seed is not None:
            if len(names) < model.num_classes:
                raise click.UsageError(
                    f"--class-names lists {len(names)} classes, the checkpoint has {model.num_classes}"
                )
            order = class_order(len(names), seed)
            names = [names[c] for c in order][: model.num_classes]
            extra["reference_class_order"] = {"seed": seed, "order": order}
        save_checkpoint(
            model,
            tmp,
            class_names=names,
            preprocessing=Preprocessing.for_input(model.backbone_cfg.img_size, mean, std),
            extra=extra,
        )
    say(
        f"wrote {out}: {model.num_tasks} tasks, {model.num_classes} classes, depth {model.backbone_cfg.depth}, "
        f"width {model.backbone_cfg.embed_dim}"
    )
    hint(f"care-export onnx {out} --tasks CAPACITY -o ARTIFACT")
