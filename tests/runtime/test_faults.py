"""Faults and bad input: nothing on disk is lost, no answer is silently wrong, every user error is
one line (``error: ...``, exit 1; usage errors exit 2), never a traceback.

Every case of issue 13, then seeded random mutations (byte flips in every file of a checkpoint
and of an artifact, truncations, JSON field deletions, wrong types and out-of-range numbers),
then growth while other processes open the artifact, and add-task under a file-size limit and
on a read-only directory. Each outcome is either a clean refusal with what existed before intact,
or answers exactly equal to the old or the new model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ROOT
from safetensors.numpy import load_file, save_file

from care_export.cli import main
from care_export.export.writer import export_artifact, first_tasks
from runtime import Session
from runtime.artifact import Artifact
from runtime.errors import CareError
from runtime.growth import add_tasks

TINY = [
    "--backbone",
    "vit_tiny_patch16_224",
    "--img-size",
    "32",
    "--patch-size",
    "8",
    "--depth",
    "2",
    "--init-cls",
    "10",
    "--increment",
    "3",
]
CAPACITY, FULL = 12, 12  # artifact slots; tasks of the longest checkpoint


# ---------------------------------------------------------------------- helpers
def cli(*args) -> CliRunner.Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(res, code: int = 1, match: str | None = None) -> None:
    """A clean refusal: exit ``code``, no traceback, the message on one line."""
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith(("error:", "Error:"))]
    assert errors, res.output
    if code == 1:
        assert res.output.rstrip("\n").splitlines()[-1].startswith("error:"), res.output
    if match is not None:
        assert match in errors[-1], res.output


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (or the file itself) by relative name -> sha256."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def prefix_checkpoint(src: Path, dst: Path, tasks: int) -> Path:
    """The checkpoint ``src`` as if it held its first ``tasks`` tasks (files hard-linked)."""
    dst.mkdir()
    m = json.loads((src / "manifest.json").read_text())
    for p in src.iterdir():
        if p.name != "manifest.json":
            os.link(p, dst / p.name)
    (dst / "manifest.json").write_text(json.dumps(first_tasks(m, tasks)))
    return dst


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def logits_of(art: Path, x: np.ndarray, verify: bool = True, threads: int | None = None) -> np.ndarray:
    with Session(art, device="cpu", verify=verify, threads=threads) as s:
        return s.logits(x)


def edit_json(path: Path, change) -> None:
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def rewrite_tensor(ckpt: Path, entry_key, change) -> None:
    """Change one safetensors file of a checkpoint and record its new digest in the manifest."""
    mpath = ckpt / "manifest.json"
    m = json.loads(mpath.read_text())
    entry = entry_key(m)
    path = ckpt / entry["file"]
    tensors = load_file(str(path))
    change(tensors)
    path.unlink()  # hard-linked: write a new file
    save_file(tensors, str(path))
    entry.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    mpath.write_text(json.dumps(m))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 12-task checkpoint, its 3- and 5-task prefixes, the 3-task artifact at capacity 12, and
    the logits of the old (3-task) and new (5-task) models on fixed inputs."""
    d = tmp_path_factory.mktemp("faults")
    res = cli("synth-ckpt", "-o", d / "ck12", *TINY, "--tasks", FULL, "--seed", 0)
    assert res.exit_code == 0, res.output
    ck3, ck5 = prefix_checkpoint(d / "ck12", d / "ck3", 3), prefix_checkpoint(d / "ck12", d / "ck5", 5)
    export_artifact(ck3, d / "art3", CAPACITY)
    export_artifact(ck5, d / "art5", CAPACITY)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    imgs = d / "imgs"
    imgs.mkdir()
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    return {
        "d": d,
        "ck12": d / "ck12",
        "ck3": ck3,
        "ck5": ck5,
        "art3": d / "art3",
        "art5": d / "art5",
        "x": x,
        "old": logits_of(d / "art3", x),
        "new": logits_of(d / "art5", x),
        "imgs": imgs,
    }


@pytest.fixture()
def art(world, tmp_path):
    """A private copy of the 3-task artifact."""
    return copy(world["art3"], tmp_path / "art")


# ---------------------------------------------------------------------- 1. --force never loses data
def test_force_keeps_a_foreign_directory_when_import_fails(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f").write_text("x")
    (tmp_path / "g.pth").write_text("junk")
    refused(cli("import-official", tmp_path / "g.pth", "-o", keep, "--force"), match="not a care-export checkpoint")
    assert (keep / "f").read_text() == "x"


def test_force_never_replaces_a_source_or_a_file(world, tmp_path):
    ck = copy(world["ck5"], tmp_path / "ck")
    before = snapshot(ck)
    refused(cli("onnx", ck, "--tasks", 6, "-o", ck, "--force"), match="overlaps the input")
    refused(cli("onnx", ck, "--tasks", 6, "-o", ck / "inside", "--force"), match="overlaps the input")
    refused(cli("onnx", ck, "--tasks", 6, "-o", tmp_path, "--force"), match="overlaps the input")
    (tmp_path / "a_file").write_text("keep me")
    refused(cli("synth-ckpt", "-o", tmp_path / "a_file", "--force", *TINY), match="not a directory")
    refused(cli("onnx", ck, "--tasks", 6, "-o", tmp_path / "a_file", "--force"), match="not a directory")
    refused(cli("synth-ckpt", "-o", world["art3"], "--force", *TINY), match="not a care-export checkpoint")
    assert (tmp_path / "a_file").read_text() == "keep me" and snapshot(ck) == before
    assert not list(tmp_path.glob(".*tmp-*"))


def test_force_keeps_the_old_artifact_until_the_new_one_is_complete(world, art):
    before = snapshot(art)
    refused(cli("onnx", world["ck5"], "--tasks", 6, "-o", art, "--force", "--opset", 99), match="opset 99")
    assert snapshot(art) == before
    res = cli("onnx", world["ck5"], "--tasks", 6, "-o", art, "--force")
    assert res.exit_code == 0, res.output
    assert Artifact(art).num_tasks == 5 and not list(art.parent.glob(f".{art.name}.*"))


def test_quantize_refuses_an_output_inside_its_source(world):
    refused(
        cli("quantize", world["art3"], "-o", world["art3"] / "q", "--precision", "fp16", "--calib-data", "builtin"),
        match="overlaps the input",
    )


# ---------------------------------------------------------------------- 2. one snapshot of manifest + state
def _mid_growth(art: Path, ckpt: Path) -> None:
    """Leave ``art`` as a growth that stopped between renaming the state and the manifest."""
    import runtime.growth as growth

    real = os.replace

    def stop_before_manifest(src, dst):
        if Path(dst).name == "manifest.json":
            raise KeyboardInterrupt
        real(src, dst)

    growth.os.replace = stop_before_manifest
    try:
        with pytest.raises(KeyboardInterrupt):
            add_tasks(art, ckpt)
    finally:
        growth.os.replace = real


def test_an_open_between_the_renames_sees_the_new_model(world, art):
    _mid_growth(art, world["ck5"])
    assert json.loads((art / "manifest.json").read_text())["tasks"].__len__() == 3  # old manifest, new state
    np.testing.assert_array_equal(logits_of(art, world["x"]), world["new"])
    assert not (art / "manifest.pending.json").exists()  # the reader completed the growth


def test_an_old_manifest_with_the_new_state_is_never_used(world, art, monkeypatch):
    """A reader that read the manifest just before the state was renamed reads both again."""
    import runtime.artifact as artifact

    real, calls = artifact.read_manifest, []

    def racing_read(directory):
        m = real(directory)
        calls.append(len(m["tasks"]))
        if len(calls) == 1:  # the growth renames the state right after this reader read the manifest
            monkeypatch.setattr(artifact, "read_manifest", real)
            _mid_growth(Path(directory), world["ck5"])
            monkeypatch.setattr(artifact, "read_manifest", racing_read)
        return m

    monkeypatch.setattr(artifact, "read_manifest", racing_read)
    with Session(art, device="cpu") as s:
        assert s.num_tasks == 5 and calls[0] == 3
        np.testing.assert_array_equal(s.logits(world["x"]), world["new"])


def _opener(art: str, x: np.ndarray, refs: dict, states: dict, stop, out) -> None:
    """Open ``art`` in a loop until ``stop``; count opens by task count; report any inconsistency.
    Every opening reads the artifact as a Session does (manifest, state, growth tensors) and
    checks the state against the fresh export of that many tasks; every fourth also runs the
    Session and compares its logits exactly."""
    from runtime.graph import load_graph

    counts, bad, i = {}, [], 0
    while not stop.is_set():
        i += 1
        where = os.path.realpath(art)  # this round's directory
        try:
            if i % 4:
                a = Artifact(where)
                g, k = load_graph(a), a.num_tasks
                state = {n: g.weights[n].tobytes() for n in sorted(g.weights) if a.tensors[n].file == "state.bin"}
                if int(g.weights["active_tasks"]) != k or state != states[k]:
                    bad.append(f"{k} tasks: the state read is not that of the {k}-task model")
            else:
                with Session(where, device="cpu", threads=1) as s:
                    got, k = s.logits(x), s.num_tasks
                    if got.shape[1] != s.num_classes or not np.array_equal(got, refs[k]):
                        bad.append(f"{k} tasks: logits differ from the {k}-task model")
            counts[k] = counts.get(k, 0) + 1
        except Exception as exc:  # noqa: BLE001 - any failure is a finding
            bad.append(f"{type(exc).__name__}: {exc}")
    out.put((counts, bad))


def test_sessions_opened_by_other_processes_while_add_task_grows(world, tmp_path):
    """Hundreds of opens while the directory grows task by task: each sees one whole model."""
    from runtime.graph import load_graph

    x = world["x"][:1]
    cks = {k: prefix_checkpoint(world["ck12"], tmp_path / f"ck{k}", k) for k in range(4, FULL + 1)}
    refs, states = {}, {}
    for k in range(3, FULL + 1):
        ref = world["art3"] if k == 3 else tmp_path / f"ref{k}"
        if k > 3:
            export_artifact(cks[k], ref, CAPACITY)
        refs[k] = logits_of(ref, x, threads=1)  # as the readers run: one image, one thread
        a = Artifact(ref)
        g = load_graph(a)
        states[k] = {n: g.weights[n].tobytes() for n in sorted(g.weights) if a.tensors[n].file == "state.bin"}
    ctx = mp.get_context("fork")
    stop, out = ctx.Event(), ctx.Queue()
    rounds = [copy(world["art3"], tmp_path / f"art{r}") for r in range(8)]
    current = tmp_path / "current"
    current.symlink_to(rounds[0])
    readers = [ctx.Process(target=_opener, args=(str(current), x, refs, states, stop, out)) for _ in range(2)]
    for p in readers:
        p.start()
    t0 = time.monotonic()
    for a in rounds:
        tmp = tmp_path / "current.new"
        tmp.symlink_to(a)
        os.replace(tmp, current)
        for k in range(4, FULL + 1):
            add_tasks(a, cks[k])
            time.sleep(0.05)
        if time.monotonic() - t0 > 20:
            break
    stop.set()
    results = [out.get(timeout=60) for _ in readers]
    for p in readers:
        p.join(timeout=30)
    counts = {k: sum(c.get(k, 0) for c, _ in results) for k in refs}
    bad = [b for _, bs in results for b in bs]
    assert not bad, bad[:5]
    assert sum(counts.values()) >= 200, counts
    assert len([k for k, n in counts.items() if n]) >= 5, counts  # opens landed all along the growth


# ---------------------------------------------------------------------- 3. same-size corruption is found
def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("where", ["backbone", "slot"])
def test_same_size_corruption_is_refused_by_run_verify_and_add_task(world, art, where):
    a = Artifact(art)
    spec = a.tensors["vit.blocks.0.attn.qkv" if where == "backbone" else "moe.1.experts.up"]
    _flip(art / spec.file, spec.offset + (spec.row_bytes + 8 if where == "slot" else 8))  # task 1's rows
    before = snapshot(art)
    refused(cli("run", art, world["imgs"]), match="corrupt")
    refused(cli("verify", art), match="corrupt")
    refused(cli("add-task", art, world["ck5"]), match="corrupt")
    assert snapshot(art) == before
    with pytest.raises(CareError, match="corrupt"):
        Session(art, verify=True)


def test_verify_accepts_a_good_artifact_and_checkpoint(world):
    res = cli("verify", world["art3"])
    assert res.exit_code == 0 and "every digest matches" in res.output, res.output
    res = cli("verify", world["ck5"])
    assert res.exit_code == 0 and "checkpoint, 5 tasks" in res.output, res.output


# ---------------------------------------------------------------------- 4. manifest against state
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["tasks"].pop(), "class names for"),
        (lambda m: (m["tasks"].pop(), m["classes"]["names"].__delitem__(slice(-3, None))), "state.bin holds 3"),
        (
            lambda m: (m["tasks"].append(m["tasks"][-1]), m["classes"]["names"].extend(["a", "b", "c"])),
            "state.bin holds 3",
        ),
        (lambda m: m["files"].pop("state.bin"), "'files' must name exactly"),
        (lambda m: m["files"]["state.bin"].pop("sha256"), "files.state.bin lacks its sha256"),
        (lambda m: m["classes"]["names"].pop(), "class names for"),
    ],
)
def test_manifest_is_held_against_the_state(art, change, message):
    edit_json(art / "manifest.json", change)
    with pytest.raises(CareError, match=message):
        Session(art)


# ---------------------------------------------------------------------- 5, 6. checkpoints refused at the door
def test_fewer_class_names_than_classes(world, art, tmp_path):
    ck = copy(world["ck5"], tmp_path / "ck")
    edit_json(ck / "manifest.json", lambda m: m["classes"]["names"].pop())
    before = snapshot(art)
    refused(cli("onnx", ck, "--tasks", 6, "-o", tmp_path / "o"), match="21 class names for 22 classes")
    refused(cli("add-task", art, ck), match="21 class names for 22 classes")
    assert snapshot(art) == before and not (tmp_path / "o").exists()


def test_nan_and_inf_weights_are_refused_naming_the_tensor(world, art, tmp_path):
    import torch

    ck = copy(world["ck5"], tmp_path / "ck")

    def poison(t):
        t["blocks.1.experts.down.weight"][0, 0] = np.nan

    rewrite_tensor(ck, lambda m: m["tasks"][4], poison)
    refused(cli("onnx", ck, "--tasks", 6, "-o", tmp_path / "o"), match="tensor blocks.1.experts.down.weight")
    refused(cli("add-task", art, ck), match="tensor blocks.1.experts.down.weight holds 1 NaN")
    ck2 = copy(world["ck3"], tmp_path / "ck2")
    rewrite_tensor(ck2, lambda m: m["backbone"], lambda t: t["norm.weight"].__setitem__(0, np.inf))
    refused(cli("onnx", ck2, "--tasks", 6, "-o", tmp_path / "o"), match="tensor norm.weight holds 1 NaN or Inf")
    torch.save({"backbone.cls_token": torch.full((1, 1, 4), float("nan"))}, tmp_path / "nan.pth")
    refused(cli("import-official", tmp_path / "nan.pth", "-o", tmp_path / "o"), match="backbone.cls_token")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- tracebacks -> one line
def test_add_task_on_a_missing_artifact(world, tmp_path):
    refused(cli("add-task", tmp_path / "nope", world["ck5"]), match="artifact not found")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["tasks"][1].pop("slot_sha256"), "task 1 lacks"),
        (lambda m: m.__setitem__("tasks", "abc"), "'tasks' is not a non-empty list"),
        (lambda m: m["files"]["backbone.bin"].__setitem__("bytes", "123"), "files.backbone.bin lacks a size"),
        (lambda m: m.pop("dims"), "lacks 'dims'"),
        (lambda m: m["dims"].pop("depth"), "dims.depth is missing"),
        (lambda m: m["dims"].__setitem__("embed_dim", "192"), "dims.embed_dim is missing or not a positive integer"),
        (lambda m: m["dims"].__setitem__("capacity", 2.5), "dims.capacity"),
        (lambda m: m.__setitem__("batch", "abc"), "'batch' must be"),
        (lambda m: m.__setitem__("batch", 7), "graph's batch differs"),
        (lambda m: m["preprocessing"].__setitem__("resize", 0), "sizes must be positive"),
        (lambda m: m["tasks"][0].__setitem__("classes", "10"), "task 0 lacks a positive 'classes'"),
        (lambda m: m.__setitem__("format_version", "1"), "format_version '1' is not an integer"),
    ],
)
def test_malformed_artifact_manifest_values(art, world, change, message):
    edit_json(art / "manifest.json", change)
    with pytest.raises(CareError, match=message):
        Session(art)
    refused(cli("run", art, world["imgs"]), match=message.strip("'"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["tasks"][1].pop("file"), "task 1 lacks its file"),
        (lambda m: m["tasks"][1].__setitem__("file", "../../x.safetensors"), "not a file of the checkpoint"),
        (lambda m: m["head"].__setitem__("file", "/etc/passwd"), "not a file of the checkpoint"),
        (lambda m: m["tasks"][1].__setitem__("bytes", "12"), "task 1 lacks its file"),
        (lambda m: m.__setitem__("tasks", "abc"), "has no task"),
        (lambda m: m["tasks"][2].__setitem__("classes", "3"), "task 2 'classes' is not a positive integer"),
        (lambda m: m.__setitem__("format_version", "1"), "format_version '1' is not an integer"),
        (lambda m: m["brmoe"].__setitem__("topk_routers", 0), "brmoe.topk_routers"),
    ],
)
def test_malformed_checkpoint_manifest_values(world, art, tmp_path, change, message):
    ck = copy(world["ck5"], tmp_path / "ck")
    edit_json(ck / "manifest.json", change)
    before = snapshot(art)
    refused(cli("add-task", art, ck), match=message)
    refused(cli("onnx", ck, "--tasks", 6, "-o", tmp_path / "o"), match=message)
    assert snapshot(art) == before


def test_usage_and_input_errors_are_one_line(world, tmp_path):
    refused(cli("onnx", world["ck5"], "--tasks", 6, "-o", tmp_path / "o", "--opset", 99), match="opset 99")
    refused(cli("synth-ckpt", "-o", tmp_path / "s", "--backbone", "no_such_model"), match="no_such_model")
    refused(cli("synth-ckpt", "-o", tmp_path / "s", *TINY, "-M", 0), code=2)
    refused(cli("synth-ckpt", "-o", tmp_path / "s", *TINY, "-K", 0), code=2)
    (tmp_path / "evil.pth").write_bytes(_unsafe_pickle())
    res = cli("import-official", tmp_path / "evil.pth", "-o", tmp_path / "o")
    refused(res, match="holds a Python object")
    assert res.output.count("\n") == 1
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()


def _unsafe_pickle() -> bytes:
    import io

    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("not run",))

    buf = io.BytesIO()
    torch.save({"a": Evil()}, buf)
    return buf.getvalue()


def test_zero_size_images_and_a_closed_session(world, tmp_path):
    from PIL import Image

    s = Session(world["art3"], device="cpu")
    for empty in (np.zeros((0, 5, 3), np.uint8), np.zeros((2, 4, 0, 3), np.uint8)):
        with pytest.raises(CareError, match="nothing to classify"):
            s.predict(empty)
    with pytest.raises(CareError, match="nothing to classify"):
        s.predict(Image.new("RGB", (0, 0)))
    s.close()
    for call in (lambda: s.predict(world["x"]), lambda: s.logits(world["x"]), lambda: s.add_task(world["ck5"])):
        with pytest.raises(CareError, match="closed"):
            call()


def test_run_reports_each_unreadable_image_and_goes_on(world, tmp_path):
    imgs = copy(world["imgs"], tmp_path / "imgs")
    (imgs / "bad.png").write_bytes(b"junk")
    res = cli("run", world["art3"], imgs)
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert sum(ln.startswith(str(imgs / "0.png")) for ln in lines) == 1
    assert sum(ln.startswith(str(imgs / "1.png")) for ln in lines) == 1
    assert any("bad.png" in ln and ln.startswith("error:") for ln in lines)
    assert lines[-1] == "error: 1 of 3 images could not be classified (see above)"


def test_predict_preprocesses_chunk_by_chunk(world, monkeypatch):
    import runtime.session as session

    seen, real = [], session.to_input
    monkeypatch.setattr(
        session, "to_input", lambda images, prep, first=0: seen.append(len(images)) or real(images, prep, first)
    )
    images = np.random.default_rng(0).integers(0, 255, (10, 40, 40, 3), dtype=np.uint8)
    with Session(world["art3"], device="cpu", max_batch=4) as s:
        whole = s.predict(images, top_k=2)
        assert seen == [4, 4, 2]
        seen.clear()
        parts = [s.predict(images[i : i + 4], top_k=2) for i in range(0, 10, 4)]  # same run sizes: exact
    np.testing.assert_array_equal(whole.logits, np.concatenate([p.logits for p in parts]))


def test_train_offline_fails_fast(tmp_path, monkeypatch):
    from care_export.model.care_vit import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.monotonic()
    assert not hub_reachable()
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------------- fault injection
_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["care-export", "add-task", sys.argv[2], sys.argv[3]]
from care_export.cli import main
main()
"""


def test_add_task_under_a_file_size_limit(world, art):
    """RLIMIT_FSIZE (``ulimit -f``) in a child process: writes past 4 KiB fail with EFBIG."""
    before = snapshot(art)
    res = subprocess.run(
        [sys.executable, "-c", _LIMITED, "4096", str(art), str(world["ck5"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: cannot add tasks"), res.stderr
    assert "File too large" in res.stderr and "still holds its old tasks" in res.stderr
    np.testing.assert_array_equal(logits_of(art, world["x"]), world["old"])
    assert {k: v for k, v in snapshot(art).items() if k != "slots.bin"} == {
        k: v for k, v in before.items() if k != "slots.bin"
    }  # slots.bin: only unused slots may change
    res = cli("add-task", art, world["ck5"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(logits_of(art, world["x"]), world["new"])


def test_add_task_on_a_read_only_directory(world, art, monkeypatch):
    """Non-root: the directory is made read-only (chmod). Root ignores permissions, so there every
    write the growth makes fails with EROFS, as on a read-only mount (monkeypatched os functions)."""
    before = snapshot(art)
    if os.geteuid() != 0:
        for p in [art, *art.iterdir()]:
            p.chmod(p.stat().st_mode & ~0o222)
    else:
        import builtins

        import runtime.atomic as atomic
        import runtime.tensor_files as tensor_files

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

        real_open = builtins.open

        def open_ro(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wa+x") and str(art) in str(file):
                raise OSError(errno.EROFS, "Read-only file system", str(file))
            return real_open(file, mode, *args, **kwargs)

        for writer in (atomic, tensor_files):  # the modules that open the artifact's files to write
            monkeypatch.setattr(writer, "open", open_ro, raising=False)
        monkeypatch.setattr(os, "replace", read_only)
        monkeypatch.setattr(os, "unlink", read_only)
    try:
        refused(
            cli("add-task", art, world["ck5"]),
            match="Read-only file system" if os.geteuid() == 0 else "Permission denied",
        )
    finally:
        monkeypatch.undo()
        for p in [art, *art.iterdir()]:
            p.chmod(p.stat().st_mode | 0o200)
    assert snapshot(art) == before
    res = cli("add-task", art, world["ck5"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(logits_of(art, world["x"]), world["new"])


# ---------------------------------------------------------------------- seeded random mutations
def _leaves(obj, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _leaves(v, (*path, k))


_WRONG = ["abc", -1, 0, 10**12, 2.5, None, [], {}, True]


def _mutate_json(path: Path, rng: random.Random) -> str:
    m = json.loads(path.read_text())
    spots = [p for p, _ in _leaves(m) if p]
    where = rng.choice(spots)
    parent = m
    for k in where[:-1]:
        parent = parent[k]
    if rng.random() < 0.3:
        del parent[where[-1]]
        how = "deleted"
    else:
        parent[where[-1]] = rng.choice(_WRONG)
        how = f"= {parent[where[-1]]!r}"
    path.write_text(json.dumps(m))
    return f"{'.'.join(map(str, where))} {how}"


def _mutate_bytes(directory: Path, rng: random.Random) -> str:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    f = rng.choice(files)
    size = f.stat().st_size
    if rng.random() < 0.25:
        cut = rng.randrange(size)
        with open(f, "r+b") as fh:
            fh.truncate(cut)
        return f"{f.name} truncated to {cut}"
    offset = rng.randrange(size)
    _flip(f, offset)
    return f"{f.name} byte {offset} flipped"


def _mutations(n: int, seed: int, json_share: float):
    rng = random.Random(seed)
    for _ in range(n):
        yield rng, rng.random() < json_share


def test_random_mutations_of_an_artifact(world, tmp_path):
    """Byte flips, truncations and JSON field mutations of the artifact: Session(verify=True) and
    care-export run refuse in one line or answer exactly as the old model."""
    outcomes = {"refused": 0, "same": 0}
    for i, (rng, as_json) in enumerate(_mutations(90, seed=13, json_share=0.4)):
        a = copy(world["art3"], tmp_path / f"a{i}")
        what = _mutate_json(a / "manifest.json", rng) if as_json else _mutate_bytes(a, rng)
        try:
            got = logits_of(a, world["x"])
        except CareError as exc:
            assert "\n" not in str(exc), what
            outcomes["refused"] += 1
        else:
            np.testing.assert_array_equal(got, world["old"], err_msg=what)
            outcomes["same"] += 1
        if i % 6 == 0:  # the CLI, on the same damage
            res = cli("run", a, world["imgs"], "--json")
            if res.exit_code:
                refused(res)
            else:
                assert [json.loads(ln)["top"] for ln in res.output.splitlines() if ln.startswith("{")] == _run_answers(
                    world
                ), what
        shutil.rmtree(a)
    assert outcomes["refused"] >= 40 and outcomes["same"] >= 5, outcomes


def _run_answers(world) -> list:
    if "run" not in world:
        res = cli("run", world["art3"], world["imgs"], "--json")
        world["run"] = [json.loads(ln)["top"] for ln in res.output.splitlines() if ln.startswith("{")]
    return world["run"]


def test_random_mutations_of_a_checkpoint_before_add_task(world, tmp_path):
    """Mutations of the growing checkpoint: add-task refuses in one line and leaves the artifact
    byte for byte as it was, or grows it to exactly the new model."""
    art0 = copy(world["art3"], tmp_path / "art0")
    pristine = snapshot(art0)
    outcomes = {"refused": 0, "grown": 0}
    for i, (rng, as_json) in enumerate(_mutations(70, seed=31, json_share=0.45)):
        ck = tmp_path / f"ck{i}"
        shutil.copytree(world["ck5"], ck)
        what = _mutate_json(ck / "manifest.json", rng) if as_json else _mutate_bytes(ck, rng)
        res = cli("add-task", art0, ck)
        if res.exit_code:
            refused(res)
            assert snapshot(art0) == pristine, what
            outcomes["refused"] += 1
        else:
            np.testing.assert_array_equal(logits_of(art0, world["x"]), world["new"], err_msg=what)
            outcomes["grown"] += 1
            shutil.rmtree(art0)
            copy(world["art3"], art0)
        shutil.rmtree(ck)
    assert outcomes["refused"] >= 40, outcomes
