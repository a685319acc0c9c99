"""runtime.Session through its public API: equal to the PyTorch model before and after growth,
growth in memory and persisted, chunking, backend choice, and one-line errors for bad input."""

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    ATOL,
    ROOT,
    SESSION_CAPACITY,
    SESSION_GROWN,
    SESSION_TASKS,
    assert_equals_reference,
    synth_session_checkpoint,
)

from care_export.cli import main
from care_export.export.writer import export_artifact
from runtime import Session
from runtime.errors import ArtifactError, BackendError, CapacityError, CheckpointError, InputError, MismatchError


@pytest.fixture()
def art_copy(built, tmp_path):
    """A private copy of the artifact, for tests that write into it."""
    return Path(shutil.copytree(built["art"], tmp_path / "art"))


# ---------------------------------------------------------------------- parity and growth
def test_equals_pytorch_before_and_after_add_task(built):
    session = Session(built["art"], device="cpu")
    assert (session.backend, session.providers, session.device) == ("onnxruntime", ["CPUExecutionProvider"], "cpu")
    assert_equals_reference(session, built["x"], built["before"])
    assert session.add_task(built["grown"]) == [4, 5]
    assert (session.num_tasks, session.num_classes) == (SESSION_GROWN, 25)
    assert_equals_reference(session, built["x"], built["after"])
    assert session.add_task(built["grown"]) == []  # nothing new: a no-op


def test_add_task_in_memory_leaves_the_artifact_untouched(built, art_copy):
    before = {p.name: p.read_bytes() for p in art_copy.iterdir()}
    session = Session(art_copy)
    session.add_task(built["grown"])
    assert {p.name: p.read_bytes() for p in art_copy.iterdir()} == before
    assert Session(art_copy).num_tasks == SESSION_TASKS


def test_add_task_persist_and_artifacts_grown_by_add_tasks(built, art_copy, tmp_path):
    session = Session(art_copy)
    session.add_task(built["grown"], persist=True)
    reopened = Session(art_copy)
    assert reopened.num_tasks == SESSION_GROWN
    assert_equals_reference(reopened, built["x"], built["after"])

    from runtime.growth import add_tasks  # what `care-export add-task` runs

    other = Path(shutil.copytree(built["art"], tmp_path / "other"))
    add_tasks(other, built["grown"])
    assert_equals_reference(Session(other), built["x"], built["after"])


def test_threads_predicting_while_a_task_is_added_see_before_or_after(built):
    session = Session(built["art"], threads=1)
    x = built["x"][:8]
    before, after = built["before"][0][:8], built["after"][0][:8]
    answers, errors = [], []
    grown = threading.Event()

    def worker():
        try:
            extra = 0
            while extra < 5:  # keep predicting until a few answers after the growth
                answers.append(session.logits(x))
                extra += grown.is_set()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(answers) < 12 and not errors and time.monotonic() < deadline:
        time.sleep(0.005)
    session.add_task(built["grown"])
    grown.set()
    for t in threads:
        t.join()
    assert not errors, errors
    kinds = []
    for a in answers:
        ref = before if a.shape[1] == before.shape[1] else after
        assert a.shape == ref.shape and np.abs(a - ref).max() <= ATOL
        kinds.append(a.shape[1])
    assert set(kinds) == {before.shape[1], after.shape[1]}
    assert_equals_reference(session, built["x"], built["after"])  # every call after add_task sees it


def test_chunks_and_static_batch_give_the_same_answers(built, tmp_path):
    x, (logits, _, _) = built["x"][:10], built["before"]
    small = Session(built["art"], max_batch=3)
    np.testing.assert_allclose(small.logits(x), logits[:10], atol=ATOL, rtol=0)
    export_artifact(built["ck"], tmp_path / "static", SESSION_CAPACITY, batch=4)
    static = Session(tmp_path / "static")
    np.testing.assert_allclose(static.logits(x), logits[:10], atol=ATOL, rtol=0)
    pred = static.predict(x, top_k=3, return_routing=True)
    assert pred.classes.shape == (10, 3) and pred.tasks.shape[0] == 10
    static.add_task(built["grown"])
    np.testing.assert_allclose(static.logits(x), built["after"][0][:10], atol=ATOL, rtol=0)


def test_predict_outputs(built):
    session = Session(built["art"])
    x = built["x"][:5]
    pred = session.predict(x, top_k=4)
    logits = built["before"][0][:5].astype(np.float64)
    p = np.exp(20 * logits - (20 * logits).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(pred.probs, np.sort(p, 1)[:, ::-1][:, :4], atol=1e-5)
    assert pred.tasks is None and len(pred) == 5
    assert pred.names[0][0] == session.class_names[pred.classes[0, 0]]
    assert (np.diff(pred.probs, axis=1) <= 0).all()
    item = pred.to_list()[0]
    assert set(item) == {"top"} and len(item["top"]) == 4
    one = session.predict(x[0])  # one CHW image
    assert one.classes.shape == (1, 1) and one.classes[0, 0] == pred.classes[0, 0]
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(session.predict(images).classes, session.predict(list(images)).classes)


# ---------------------------------------------------------------------- without torch
NO_TORCH = """
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
import numpy as np
from runtime import Session
s = Session(sys.argv[1])
pred = s.predict(np.zeros((2, 40, 40, 3), np.uint8), top_k=2, return_routing=True)
assert pred.classes.shape == (2, 2) and pred.tasks is not None
s.add_task(sys.argv[2])
assert s.num_tasks == 6 and s.predict(sys.argv[3]).classes.shape == (1, 1)
from click.testing import CliRunner
from care_export.cli.run import run_command
res = CliRunner().invoke(run_command, [sys.argv[1], sys.argv[3], "--json"])
assert res.exit_code == 0, res.output
assert sys.modules.get('torch') is None, 'torch was imported'
print('ok')
"""


def test_loads_predicts_and_grows_where_torch_cannot_be_imported(built, tmp_path):
    from PIL import Image

    image = tmp_path / "im.png"
    Image.fromarray(np.full((50, 40, 3), 90, np.uint8)).save(image)
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(built["art"]), str(built["grown"]), str(image)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ---------------------------------------------------------------------- command line
def test_run_command(built, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (36, 50, 3), np.uint8)).save(tmp_path / f"{i}.png")
    res = CliRunner().invoke(main, ["run", str(built["art"]), str(tmp_path), "--top-k", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 3 and all(line.count("(") == 2 for line in lines)
    res = CliRunner().invoke(main, ["run", str(built["art"]), str(tmp_path / "0.png"), "--json", "--routing"])
    assert res.exit_code == 0 and '"routing"' in res.output
    res = CliRunner().invoke(main, ["run", str(built["art"]), str(tmp_path / "missing.png")])
    assert res.exit_code == 1 and "error: image not found" in res.output


# ---------------------------------------------------------------------- backends
def test_backend_choice_is_explicit():
    from runtime.backends.gpu import gpu_names

    if gpu_names():
        pytest.skip("checks the answers on a machine without a GPU")
    art = Path("unused")
    from runtime.backends import open_runner

    for kwargs, message in [
        (dict(device="cuda"), "device cuda asked for"),
        (dict(backend="tensorrt"), "backend tensorrt needs a CUDA GPU"),
        (dict(backend="tensorrt", device="cpu"), "not on device cpu"),
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(backend="openvino"), "unknown backend 'openvino'"),
        (dict(providers=["cuda"]), "has no CUDAExecutionProvider|device cpu cannot use"),
        (dict(providers=["tensorrt"]), "has no TensorrtExecutionProvider"),
        (dict(providers=["cpu"], device="cuda"), "first provider named is the CPU's"),
    ]:
        with pytest.raises(BackendError, match=message) as err:
            open_runner(art, cache_root=Path("unused"), **kwargs)
        assert "\n" not in str(err.value)


def test_auto_chooses_cpu_here_and_says_so(built):
    from runtime.backends.gpu import gpu_names

    session = Session(built["art"], providers=["cpu"])
    assert session.providers == ["CPUExecutionProvider"]
    if not gpu_names():
        assert Session(built["art"]).device == "cpu"


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3, 32), np.float32), "float input must be NCHW"),
        (np.zeros((2, 32, 32, 4), np.uint8), "3 channels"),
        (np.zeros((2, 3, 32, 32), np.float16), "dtype float16"),
        (np.zeros((0, 3, 32, 32), np.float32), "empty batch"),
        ([], "empty batch"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN or Inf"),
    ],
)
def test_bad_input(built, bad, message):
    session = Session(built["art"])
    with pytest.raises(InputError, match=message):
        session.predict(bad)
    with pytest.raises(InputError, match=message):
        session.logits(bad)


def test_bad_top_k(built):
    session = Session(built["art"])
    for k in (0, 20, 2.5):
        with pytest.raises(InputError, match="top_k must be between 1 and the 19 learned classes"):
            session.predict(built["x"][:1], top_k=k)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message, verify",
    [
        (lambda a: shutil.rmtree(a), "artifact not found", False),
        (lambda a: (a / "manifest.json").unlink(), "manifest missing", False),
        (lambda a: (a / "manifest.json").write_text("{not json"), "manifest missing or not valid JSON", False),
        (lambda a: (a / "backbone.bin").unlink(), "backbone.bin: file missing", False),
        (lambda a: (a / "slots.bin").write_bytes(b"\0" * 100), "slots.bin: truncated", False),
        (lambda a: _corrupt(a / "model.onnx"), "model.onnx: corrupt", False),
        (lambda a: _corrupt(a / "backbone.bin"), "backbone.bin: corrupt", True),
        (
            lambda a: (a / "manifest.json").write_text(
                (a / "manifest.json").read_text().replace('"format_version": 1', '"format_version": 2')
            ),
            "format version 2 is newer",
            False,
        ),
    ],
)
def test_damaged_artifact(art_copy, damage, message, verify):
    damage(art_copy)
    with pytest.raises(ArtifactError, match=message) as err:
        Session(art_copy, verify=verify)
    assert "\n" not in str(err.value)


def test_add_task_refusals_leave_the_session_as_it_was(built, tmp_path):
    x, before = built["x"], built["before"]
    export_artifact(built["ck"], tmp_path / "small", SESSION_TASKS + 1)  # room for one more task only
    small = Session(tmp_path / "small")
    with pytest.raises(CapacityError, match="holds 5 tasks"):
        small.add_task(built["grown"])
    assert_equals_reference(small, x, before)

    session = Session(built["art"])
    other = synth_session_checkpoint(tmp_path / "other", SESSION_GROWN, seed=1)
    with pytest.raises(MismatchError, match="backbone differs"):
        session.add_task(other)
    with pytest.raises(CheckpointError, match="not found"):
        session.add_task(tmp_path / "nowhere")
    assert_equals_reference(session, x, before)
