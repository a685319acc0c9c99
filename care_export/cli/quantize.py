"""``care-export quantize``: an FP32 artifact -> FP16 or INT8 (calibration/), with a report.

Imports no PyTorch: the built-in dataset is drawn with numpy and PIL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .log import hint, say

log = logging.getLogger(__name__)

BUILTIN = "builtin"


def _pool(data: str, art, split: str):
    from calibration.calib_data import folder_pool

    names = art.manifest["classes"]["names"]
    if data == BUILTIN:
        from ..data.builtin import builtin_pool

        return builtin_pool(names, art.dims.img_size, split), f"builtin ({split} images)"
    return folder_pool(data, names), str(Path(data))


@click.command("quantize")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Directory of the new artifact."
)
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True, help="Target precision.")
@click.option(
    "--calib-data",
    default=None,
    metavar="DIR|builtin",
    help="Calibration images: a folder with one sub-folder per class (named as the artifact's classes), "
    "or 'builtin'. Needed for int8; also the default source of held-out images.",
)
@click.option(
    "--method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="percentile",
    show_default=True,
    help="INT8 activation range calibration.",
)
@click.option(
    "--per-task", type=click.IntRange(min=1), default=8, show_default=True, help="Calibration images per learned task."
)
@click.option("--seed", type=int, default=1993, show_default=True, help="Seed of the image sampling.")
@click.option(
    "--routing",
    type=click.Choice(["fp32", "reduced"]),
    default="fp32",
    show_default=True,
    help="fp32: the routing path (perceptors, entropies, routers, TopKs) computes in float32; "
    "reduced: in the target precision too, for comparison.",
)
@click.option(
    "--fallback-target",
    type=click.FloatRange(min=0),
    default=None,
    help="INT8: the most routing-sensitive layers fall back to weight-only int8 until the calibration "
    "images' routing flips per block are at most this share of images (all of them if the int8 "
    "weights alone flip more); 1 keeps every layer W8A8.  [default: 0.005]",
)
@click.option(
    "--fallback-flips",
    type=click.Choice(["raw", "margin"]),
    default="margin",
    show_default=True,
    help="INT8: which flips the fallback target counts: only those where FP32's deciding gap exceeds "
    "--flip-margin (flips between near ties do not count), or every one.",
)
@click.option(
    "--flip-margin",
    type=click.FloatRange(min=0),
    default=1e-3,
    show_default=True,
    help="Deciding gap (perceptor entropy or router logit) beyond which a routing flip is counted in the "
    "margin-aware flip rate.",
)
@click.option(
    "--tradeoff",
    is_flag=True,
    help="INT8: also measure and report the fallback's trade-off curve (calibration flips, agreement and "
    "latency against FP32 with the k most sensitive layers weight-only, for a few k).",
)
@click.option(
    "--rounding",
    type=click.Choice(["gptq", "nearest"]),
    default="gptq",
    show_default=True,
    help="INT8 weights: gptq rounds each row against the calibration images' layer inputs "
    "(error-compensated, same scales); nearest rounds each weight to nearest.",
)
@click.option(
    "--eval-data",
    default=None,
    metavar="DIR|builtin",
    help="Held-out labelled images for the report [default: --calib-data, other images].",
)
@click.option(
    "--eval-samples",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Held-out images in the report, spread over the tasks.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Intra-op threads of every ONNX Runtime session it runs (0: all cores).",
)
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT artifact.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema in docs/CLI.md) instead of the table.")
def quantize_command(
    artifact,
    out,
    precision,
    calib_data,
    method,
    per_task,
    seed,
    routing,
    fallback_target,
    fallback_flips,
    flip_margin,
    tradeoff,
    rounding,
    eval_data,
    eval_samples,
    threads,
    force,
    as_json,
):
    """Rewrite an FP32 artifact to FP16 or INT8, keeping its routing decisions in float32.

    The result is an artifact of the same format (runtime.Session and `care-export run` load it)
    with calibration_report.json: accuracy and top-1 agreement with FP32 on held-out images,
    routing flips per block (raw and margin-aware), max |dlogit|, size and CPU latency against FP32. The source artifact
    is only read. INT8 artifacts cannot take new tasks: add them to the FP32 artifact and
    quantize again; FP16 artifacts take them with `care-export add-task`.

    \b
    Example:
      care-export quantize model/ -o model-int8/ --precision int8 --calib-data builtin
      care-export quantize model/ -o model-fp16/ --precision fp16 --eval-data photos/
    """
    from tqdm import tqdm

    from calibration.quantize import check_quantize_output, draw_images, open_source_artifact, quantize_artifact
    from calibration.report import REPORT_FILE, slower_note, table

    if precision == "int8" and calib_data is None:
        raise click.UsageError("--precision int8 needs --calib-data DIR|builtin")
    if calib_data is None and eval_data is None:
        raise click.UsageError("give --eval-data (or --calib-data) for the report's held-out images")
    src = open_source_artifact(artifact)
    check_quantize_output(src, out, precision, force)
    calib_pool, calib_name = _pool(calib_data, src, "train") if calib_data else _pool(eval_data, src, "test")
    if eval_data is None or eval_data == calib_data:
        eval_pool, eval_name = _pool(BUILTIN, src, "test") if calib_data == BUILTIN else (calib_pool, calib_name)
    else:
        eval_pool, eval_name = _pool(eval_data, src, "test")
    calib, held_out = draw_images(src, calib_pool, eval_pool, per_task, eval_samples, seed, calib_name, eval_name)
    bar = tqdm(
        total=len(calib.labels),
        desc="calibrating",
        unit="image",
        leave=False,
        disable=None if precision == "int8" else True,
    )
    try:
        manifest, report = quantize_artifact(
            src,
            out,
            precision,
            calib,
            held_out,
            routing=routing,
            method=method,
            seed=seed,
            force=force,
            progress=bar.update,
            rounding=rounding,
            flip_eps=flip_margin,
            tradeoff=tradeoff,
            threads=threads or None,
            fallback_eps=flip_margin if fallback_flips == "margin" else None,
            **({} if fallback_target is None else {"fallback_target": fallback_target}),
        )
    finally:
        bar.close()
    q = manifest["quantization"]
    if as_json:
        import json

        click.echo(
            json.dumps(
                {
                    "artifact": str(artifact),
                    "output": str(out),
                    "precision": precision,
                    "report_file": str(out / REPORT_FILE),
                    "quantization": q,
                    "report": report,
                }
            )
        )
        return
    how = f"routing {routing}" + (
        f", {method} on {q['calibration']['samples']} images of "
        f"{q['calibration']['tasks_covered']}/{q['calibration']['tasks']} tasks"
        f", {rounding} rounding"
        if precision == "int8"
        else ""
    )
    if q.get("fallback") is not None:
        fb = q["fallback"]
        alone = "" if fb["floor"] is None else f", int8 weights alone {100 * fb['floor']:.2f}%"
        how += (
            f"; {len(fb['weight_only'])} layer(s) weight-only int8 (calibration flips "
            f"{100 * fb['calibration_flips']:.2f}%{alone})"
        )
    say(f"wrote {out}: {precision.upper()} ({how}); report in {out / REPORT_FILE}")
    say(table(report, precision))
    note = slower_note(report)
    if note:
        log.warning(note)
    hint(f"care-export eval {out} DATA   (accuracy on your labelled images; care-export info {out})")
