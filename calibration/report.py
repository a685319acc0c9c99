"""How a reduced-precision artifact compares with its FP32 source, measured with ``runtime.Session``.

On held-out labelled images: top-1 accuracy of both, top-1 agreement, the routing flip rate per
block (share of images whose selected tasks or kept experts differ, compared in
``runtime.routing.canonical_routing`` form), max |dlogit| over the learned classes; then the
artifact sizes (bytes of their files) and CPU latency (median of interleaved runs on the same
batch, so that both see the same machine load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.artifact import MANIFEST, read_manifest
from runtime.routing import same_routing
from runtime.timing import median_times

REPORT_FILE = "calibration_report.json"


def artifact_bytes(directory: str | Path) -> int:
    """Bytes of an artifact's files (the manifest's ``files`` and the manifest itself)."""
    directory = Path(directory)
    files = read_manifest(directory)["files"]
    return sum(int(e["bytes"]) for e in files.values()) + (directory / MANIFEST).stat().st_size


def _outputs(session, x: np.ndarray):
    pred = session.predict(x, return_routing=True)
    return pred.logits.astype(np.float64), pred.tasks, pred.experts


def compare(reference_dir: str | Path, candidate_dir: str | Path, x: np.ndarray, labels: np.ndarray, *,
            latency_runs: int = 7, latency_batch: int = 8, threads: int | None = None) -> dict:
    """The report (a JSON-ready dict) of ``candidate_dir`` against ``reference_dir`` on ``x``
    (preprocessed float32 NCHW) with global class ``labels``."""
    from runtime import Session

    ref = Session(reference_dir, device="cpu", threads=threads)
    cand = Session(candidate_dir, device="cpu", threads=threads)
    rl, rt, re = _outputs(ref, x)
    cl, ct, ce = _outputs(cand, x)
    same = same_routing((rt, re), (ct, ce))  # (N, depth)
    r_top, c_top = rl.argmax(1), cl.argmax(1)

    batch = x[:latency_batch]
    times = median_times({"ref": lambda: ref.logits(batch), "cand": lambda: cand.logits(batch)}, latency_runs,
                         warmup=1)
    ref.close()
    cand.close()
    lat_ref, lat_cand = times["ref"], times["cand"]
    size_ref, size_cand = artifact_bytes(reference_dir), artifact_bytes(candidate_dir)
    return {
        "samples": int(len(x)),
        "classes": int(rl.shape[1]),
        "accuracy": {"fp32": float((r_top == labels).mean()), "quantized": float((c_top == labels).mean())},
        "top1_agreement": float((r_top == c_top).mean()),
        "routing_flip_rate": [float(v) for v in (~same).mean(0)],
        "max_abs_dlogit": float(np.abs(cl - rl).max()),
        "bytes": {"fp32": size_ref, "quantized": size_cand, "ratio": size_cand / size_ref},
        "latency_ms": {"batch": int(len(batch)), "runs": latency_runs, "fp32": 1e3 * lat_ref,
                       "quantized": 1e3 * lat_cand, "ratio": lat_cand / lat_ref},
    }


def table(report: dict, precision: str) -> str:
    """The report as a small text table."""
    q = precision.upper()
    acc, size, lat = report["accuracy"], report["bytes"], report["latency_ms"]
    flips = report["routing_flip_rate"]
    rows = [
        ("held-out images", f"{report['samples']} ({report['classes']} classes)"),
        ("top-1 accuracy", f"FP32 {100 * acc['fp32']:.2f}%  {q} {100 * acc['quantized']:.2f}%"),
        ("top-1 agreement", f"{100 * report['top1_agreement']:.2f}%"),
        ("routing flips", " ".join(f"{100 * f:.2f}%" for f in flips) + f"  (per block, max {100 * max(flips):.2f}%)"),
        ("max |dlogit|", f"{report['max_abs_dlogit']:.3g}"),
        ("size", f"FP32 {size['fp32'] / 2**20:.1f} MiB  {q} {size['quantized'] / 2**20:.1f} MiB  "
                 f"ratio {size['ratio']:.3f}"),
        ("CPU latency", f"FP32 {lat['fp32']:.1f} ms  {q} {lat['quantized']:.1f} ms  ratio {lat['ratio']:.2f}  "
                        f"(batch {lat['batch']}, median of {lat['runs']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
