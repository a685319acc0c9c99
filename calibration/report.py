"""How a reduced-precision artifact compares with its FP32 source, measured with ``runtime.Session``.

On held-out labelled images: top-1 accuracy of both, top-1 agreement, the routing flip rate per
block (share of images whose selected tasks or kept experts differ, compared in
``runtime.routing.canonical_routing`` form) raw and margin-aware (``calibration.margins``), max
|dlogit| over the learned classes; then the
artifact sizes (bytes of their files) and CPU latency (median of interleaved runs on the same
batch, so that both see the same machine load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.layout import MANIFEST
from runtime.manifest import read_manifest
from runtime.routing import canonical_routing
from runtime.timing import median_times

from .margins import EPSILON, flip_rates

REPORT_FILE = "calibration_report.json"


def artifact_bytes(directory: str | Path) -> int:
    """Bytes of an artifact's files (the manifest's ``files`` and the manifest itself)."""
    directory = Path(directory)
    files = read_manifest(directory)["files"]
    return sum(int(e["bytes"]) for e in files.values()) + (directory / MANIFEST).stat().st_size


def compare(
    reference_dir: str | Path,
    candidate_dir: str | Path,
    reference,
    images,
    labels: np.ndarray,
    *,
    latency_runs: int = 7,
    latency_batch: int = 8,
    threads: int | None = None,
    eps: float = EPSILON,
) -> dict:
    """The report (a JSON-ready dict) of ``candidate_dir`` against ``reference_dir`` on ``images``
    (``calib_data.Chunks``) with global class ``labels``. ``reference``: the FP32 source graph's
    outputs and deciding gaps on those images (``calibration.margins.Reference``)."""
    from runtime import Session

    cand = Session(candidate_dir, device="cpu", threads=threads)
    parts = []
    for x in images:
        pred = cand.predict(x, return_routing=True)
        parts.append((pred.logits, pred.tasks, pred.experts))
    cl, ct, ce = (np.concatenate(p) for p in zip(*parts))
    cl = cl.astype(np.float64)
    rl = reference.logits[:, : cl.shape[1]]  # the graph's class slots beyond the learned ones
    raw, margin = flip_rates(reference, *canonical_routing(ct, ce), eps)
    near = (reference.task_gap <= eps) | (reference.expert_gap <= eps)
    r_top, c_top = rl.argmax(1), cl.argmax(1)

    ref = Session(reference_dir, device="cpu", threads=threads)
    batch = images.head(latency_batch)
    times = {
        b: median_times(
            {"ref": lambda b=b: ref.logits(batch[:b]), "cand": lambda b=b: cand.logits(batch[:b])},
            latency_runs,
            warmup=1,
        )
        for b in sorted({1, len(batch)})
    }
    ref.close()
    cand.close()
    lat = times[len(batch)]
    size_ref, size_cand = artifact_bytes(reference_dir), artifact_bytes(candidate_dir)
    return {
        "samples": int(len(cl)),
        "classes": int(rl.shape[1]),
        "accuracy": {"fp32": float((r_top == labels).mean()), "quantized": float((c_top == labels).mean())},
        "top1_agreement": float((r_top == c_top).mean()),
        "routing_flip_rate": [float(v) for v in raw],
        "routing_flip_rate_margin": {
            "eps": eps,
            "per_block": [float(v) for v in margin],
            "near_ties": [float(v) for v in near.mean(0)],
        },
        "max_abs_dlogit": float(np.abs(cl - rl).max()),
        "bytes": {"fp32": size_ref, "quantized": size_cand, "ratio": size_cand / size_ref},
        "latency_ms": {
            "batch": int(len(batch)),
            "runs": latency_runs,
            "fp32": 1e3 * lat["ref"],
            "quantized": 1e3 * lat["cand"],
            "ratio": lat["cand"] / lat["ref"],
            "batch1_ratio": times[1]["cand"] / times[1]["ref"],
        },
    }


def table(report: dict, precision: str) -> str:
    """The report as a small text table."""
    q = precision.upper()
    acc, size, lat = report["accuracy"], report["bytes"], report["latency_ms"]
    flips, margin = report["routing_flip_rate"], report["routing_flip_rate_margin"]
    rows = [
        ("held-out images", f"{report['samples']} ({report['classes']} classes)"),
        ("top-1 accuracy", f"FP32 {100 * acc['fp32']:.2f}%  {q} {100 * acc['quantized']:.2f}%"),
        ("top-1 agreement", f"{100 * report['top1_agreement']:.2f}%"),
        ("routing flips", " ".join(f"{100 * f:.2f}%" for f in flips) + f"  (per block, max {100 * max(flips):.2f}%)"),
        (
            f"  beyond gap {margin['eps']:g}",
            " ".join(f"{100 * f:.2f}%" for f in margin["per_block"])
            + f"  (near ties: {' '.join(f'{100 * f:.0f}%' for f in margin['near_ties'])})",
        ),
        ("max |dlogit|", f"{report['max_abs_dlogit']:.3g}"),
        (
            "size",
            f"FP32 {size['fp32'] / 2**20:.1f} MiB  {q} {size['quantized'] / 2**20:.1f} MiB  ratio {size['ratio']:.3f}",
        ),
        (
            "CPU latency",
            f"FP32 {lat['fp32']:.1f} ms  {q} {lat['quantized']:.1f} ms  ratio {lat['ratio']:.2f}  "
            f"(batch {lat['batch']}, median of {lat['runs']}; batch 1 ratio {lat['batch1_ratio']:.2f})",
        ),
    ]
    for point in report.get("tradeoff", ()):  # the fallback's trade-off curve (calibration images)
        lat = point["latency_ratio"]
        rows.append(
            (
                f"  {point['weight_only']} layer(s) weight-only",
                f"calibration flips {100 * point['calibration_flips']:.2f}%  agreement "
                f"{100 * point['top1_agreement']:.2f}%  latency ratio "
                + " ".join(f"{v:.2f} (batch {b})" for b, v in lat.items()),
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def slower_note(report: dict) -> str | None:
    """A warning when the rewrite runs slower than FP32 at both batch sizes measured, else None.

    Small models (the built-in ViT: 17 tokens of width 192) have GEMMs too small to pay for the
    quantize / dequantize of their activations."""
    lat = report["latency_ms"]
    if min(lat["ratio"], lat["batch1_ratio"]) <= 1:
        return None
    q = report["precision"].upper()
    return (
        f"the {q} artifact runs slower than FP32 on this CPU (latency ratio {lat['ratio']:.2f} at batch "
        f"{lat['batch']}, {lat['batch1_ratio']:.2f} at batch 1): it is smaller, but FP32 serves faster here"
    )
