"""Parity: an exported artifact (ONNX Runtime, CPU, all graph optimisations) against the PyTorch
reference forward of its checkpoint, on the same random inputs (docs/DESIGN.md, "Parity").

Reports max and mean |dlogit| over the learned classes, top-1 agreement, and per block the
fraction of samples whose routing (selected tasks and their kept experts) is identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.artifact import Artifact
from runtime.errors import AtolError, InputError, RoutingError, ShapeError
from runtime.layout import INPUT, LOGITS, ROUTING_EXPERTS, ROUTING_TASKS, SCORES, score_output
from runtime.routing import canonical_routing, pad_routing, same_routing


def ort_session(model_path: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session with every graph optimisation on."""
    import onnxruntime as ort

    from runtime.backends.onnxrt import session_options

    return ort.InferenceSession(str(model_path), session_options(threads), providers=["CPUExecutionProvider"])


def run_artifact(
    session, images: np.ndarray, batch: int, fixed: bool = False, ranked: str = LOGITS
) -> tuple[np.ndarray, ...]:
    """``(logits, tasks, experts)`` for ``images`` in chunks of ``batch``; ``fixed``: the graph's
    batch size is ``batch``, so the last chunk is padded. ``ranked``: the first output's name
    (``scores`` for an iterative artifact)."""
    outs = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        n = len(chunk)
        if fixed and n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append([o[:n] for o in session.run([ranked, ROUTING_TASKS, ROUTING_EXPERTS], {INPUT: chunk})])
    return tuple(np.concatenate(parts) for parts in zip(*outs))


def run_reference(model, images: np.ndarray, batch: int, m: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits, tasks, experts)`` of the reference forward, routing padded to the graph's (M, K)."""
    import torch

    logits, tasks, experts = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out, routing = model.forward_with_routing(torch.from_numpy(images[i : i + batch]), mode="reference")
            logits.append(out.numpy())
            padded = [pad_routing(r.tasks.numpy(), r.experts.numpy(), m, k) for r in routing]
            tasks.append(np.stack([t for t, _ in padded], 1))
            experts.append(np.stack([e for _, e in padded], 1))
    return np.concatenate(logits), np.concatenate(tasks), np.concatenate(experts)


@dataclass
class ParityReport:
    samples: int
    classes: int
    max_abs: float
    mean_abs: float
    top1: float  # fraction of samples with the same argmax
    routing: list[float]  # per block: fraction of samples with identical tasks and experts
    atol: float
    same_checkpoint: bool
    mismatched: list[int] = field(default_factory=list)  # sample indices whose routing differs
    # max |dlogit| over the samples whose routing agrees in every block (None: no such sample)
    max_abs_agreeing: float | None = None

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol and self.top1 == 1.0 and all(r == 1.0 for r in self.routing)

    def lines(self) -> list[str]:
        out = [
            f"samples        {self.samples} ({self.classes} classes)",
            f"|dlogit|       max {self.max_abs:.3g}, mean {self.mean_abs:.3g} (atol {self.atol:g})",
            f"top-1 agree    {self.top1:.4f}",
            "routing agree  " + " ".join(f"{r:.3f}" for r in self.routing) + "  (per block)",
        ]
        if not self.same_checkpoint:
            out.append("note           the artifact was exported from a different checkpoint digest")
        return out

    def check(self, min_agree: float = 1.0) -> None:
        """Raise RoutingError or AtolError when outside tolerance (routing first: it is the cause).
        ``min_agree``: the least share of samples whose routing and top-1 must agree; every
        sample's logits are held to atol (``max_abs_agreeing`` tells a flip's part apart)."""
        if any(r < min_agree for r in self.routing):
            worst = min(range(len(self.routing)), key=lambda i: self.routing[i])
            raise RoutingError(
                f"routing differs in block {worst} for {1 - self.routing[worst]:.2%} of samples "
                f"(e.g. sample {self.mismatched[0]})"
            )
        if self.top1 < min_agree:
            raise AtolError(f"top-1 differs on {1 - self.top1:.2%} of samples")
        if self.max_abs > self.atol:
            raise AtolError(f"max |dlogit| {self.max_abs:.3g} exceeds atol {self.atol:g}")


def compare(ref: tuple, got: tuple, atol: float, same_checkpoint: bool = True) -> ParityReport:
    """Compare ``(logits, tasks, experts)`` of the reference and of the artifact."""
    (rl, rt, re), (gl, gt, ge) = ref, got
    if gl.shape != rl.shape or gt.shape != rt.shape or ge.shape != re.shape:
        raise ShapeError(
            f"shapes differ: logits {rl.shape} vs {gl.shape}, routing {rt.shape}/{re.shape} vs {gt.shape}/{ge.shape}"
        )
    classes = rl.shape[1]
    diff = np.abs(gl.astype(np.float64) - rl)
    rt, re = canonical_routing(rt, re)
    gt, ge = canonical_routing(gt, ge)
    same = same_routing((rt, re), (gt, ge))  # (B, L)
    return ParityReport(
        samples=len(rl),
        classes=classes,
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        top1=float((gl.argmax(1) == rl.argmax(1)).mean()),
        routing=same.mean(0).tolist(),
        atol=atol,
        same_checkpoint=same_checkpoint,
        mismatched=np.flatnonzero(~same.all(1)).tolist(),
        max_abs_agreeing=float(diff[same.all(1)].max()) if same.all(1).any() else None,
    )


def random_images(n: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Network inputs (already normalised): standard normal."""
    return np.random.default_rng(seed).standard_normal((n, channels, size, size), dtype=np.float32)


def image_inputs(directory: str | Path, art: Artifact, samples: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``samples`` image files found under ``directory`` (sorted), preprocessed as the
    artifact's manifest says, and their paths."""
    from runtime.preprocess import IMAGE_SUFFIXES, Preprocessing, to_input

    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:samples]
    if not files:
        raise InputError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return to_input(files, Preprocessing.from_dict(art.manifest["preprocessing"])), [str(f) for f in files]


def run_parity(
    ckpt_dir: str | Path,
    artifact_dir: str | Path,
    samples: int = 256,
    batch: int = 32,
    atol: float = 1e-4,
    seed: int = 0,
    images_dir: str | Path | None = None,
    golden: str | Path | None = None,
) -> ParityReport:
    """Run checkpoint and artifact on ``samples`` random inputs (or the images under
    ``images_dir``) and compare them; ``golden``: also write the golden record there."""
    from runtime.checkpoint_files import checkpoint_digest, read_checkpoint_manifest

    from ..checkpoint.format import load_checkpoint
    from .graph import routing_widths

    art = Artifact(artifact_dir, verify=True)  # never vouch for a corrupt artifact
    ckpt = read_checkpoint_manifest(ckpt_dir)
    if len(ckpt["tasks"]) != art.num_tasks:
        raise ShapeError(f"the checkpoint has {len(ckpt['tasks'])} tasks, the artifact {art.num_tasks}")
    model, _ = load_checkpoint(ckpt_dir)
    m, k = routing_widths(art.dims)
    if images_dir is None:
        images, files = random_images(samples, art.dims.img_size, seed, art.dims.in_chans), []
    else:
        images, files = image_inputs(images_dir, art, samples)
    fixed = art.manifest["batch"] != "dynamic"
    ranked = score_output(art.manifest)
    got = run_artifact(
        ort_session(art.model_path), images, int(art.manifest["batch"]) if fixed else batch, fixed, ranked
    )
    got = (got[0][:, : art.num_classes], got[1], got[2])  # the runtime's slice: learned classes only
    ref = run_reference(model, images, batch, m, k)
    if ranked == SCORES:  # iterative artifact: its scores against PyTorch's, routing of the single pass
        import torch

        from ..model.iterative import iterative_scores

        with torch.no_grad():
            scores = [
                iterative_scores(model, torch.from_numpy(images[i : i + batch]), float(art.manifest["scale"]))
                for i in range(0, len(images), batch)
            ]
        ref = (torch.cat(scores).numpy(), ref[1], ref[2])
    same = checkpoint_digest(ckpt) == art.manifest["source"]["checkpoint_digest"]
    report = compare(ref, got, atol, same)
    if golden is not None:
        report.check()  # a record is only written for an artifact that matches its checkpoint
        save_golden(golden, art, images, ref, files)
    return report


# ---------------------------------------------------------------------- golden records
# Per precision: max |dlogit| against the PyTorch reference, and the least share of samples whose
# top-1 and routing must agree (FP16/INT8 may flip a near-tie; see docs/CALIBRATION.md).
GOLDEN_TOLERANCE = {"fp32": (1e-3, 1.0), "fp16": (5e-2, 0.99), "int8": (0.5, 0.95)}


def artifact_identity(art: Artifact) -> dict:
    from runtime.checkpoint_files import sha256_file

    return {
        "manifest_sha256": sha256_file(art.dir / "manifest.json"),
        "tasks": art.num_tasks,
        "classes": art.num_classes,
        "precision": art.manifest["precision"],
        "checkpoint_digest": art.manifest["source"]["checkpoint_digest"],
    }


def save_golden(path: str | Path, art: Artifact, images: np.ndarray, ref: tuple, files: list[str]) -> None:
    """The golden record (one .npz, numpy only): the network inputs, the reference logits and
    routing, the image files they came from (if any) and the artifact's identity."""
    import io
    import json

    from runtime.atomic import write_atomic

    logits, tasks, experts = ref
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        inputs=images,
        logits=logits.astype(np.float32),
        tasks=tasks,
        experts=experts,
        identity=np.array(json.dumps(dict(artifact_identity(art), files=files))),
    )
    write_atomic(path, buf.getvalue())


def check_golden(
    artifact_dir: str | Path, golden: str | Path, device: str = "cpu", batch: int = 32, atol: float | None = None
) -> tuple[ParityReport, dict, str]:
    """Run the artifact (runtime only, on ``device``) on a golden record's inputs and compare.
    Returns the report, the record's identity and the backend; raises MismatchError when the
    artifact is not the one the record was made for. Check with ``report.check(min_agree)``."""
    import json

    from runtime import Session
    from runtime.errors import MismatchError

    try:
        with np.load(golden) as z:
            rec = {k: z[k] for k in z.files}
        identity = json.loads(str(rec["identity"]))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{golden}: not a golden record ({exc})") from None
    session = Session(artifact_dir, device=device)
    mine = artifact_identity(session._artifact)
    if mine["manifest_sha256"] != identity["manifest_sha256"]:
        what = [k for k in ("tasks", "precision", "checkpoint_digest") if mine[k] != identity[k]]
        raise MismatchError(
            f"{artifact_dir} is not the artifact {golden} was recorded for (manifest differs"
            + (f"; {', '.join(what)} differ)" if what else ")")
        )
    parts = [
        session.predict(rec["inputs"][i : i + batch], return_routing=True) for i in range(0, len(rec["inputs"]), batch)
    ]
    got = tuple(np.concatenate([getattr(p, k) for p in parts]) for k in ("logits", "tasks", "experts"))
    default_atol, _ = GOLDEN_TOLERANCE[identity["precision"]]
    report = compare((rec["logits"], rec["tasks"], rec["experts"]), got, default_atol if atol is None else atol)
    return report, identity, f"{session.backend} on {session.device}"
