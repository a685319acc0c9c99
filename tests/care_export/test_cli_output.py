"""What the command line shows: log levels and the log file, progress bars only on a terminal,
--json objects with the keys docs/CLI.md documents, `info` of artifacts, plots, hints, option
names, and ONNX Runtime's quantization chatter kept out of the output."""

import json
import logging
import os
import pty
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import BLOCK_TORCH, ROOT
from PIL import Image

from care_export.cli import main

TINY = ["--backbone", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--depth", "2"]
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # anything but printable text and \n


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def on_terminal(args: list[str]) -> tuple[int, str, str]:
    """``care-export ARGS`` in a fresh interpreter whose stderr is a terminal (a pty):
    ``(exit code, stdout, what the terminal received)``."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "care_export", *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100"),
    )
    os.close(slave)
    received = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        received.append(data)
    out = proc.stdout.read().decode()
    proc.wait()
    os.close(master)
    return proc.returncode, out, b"".join(received).decode(errors="replace")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-task checkpoint trained on the built-in data with -v and --log-file, stderr on a
    terminal; its artifact (capacity 4)."""
    import timm
    from safetensors.torch import save_file

    from care_export.model.config import backbone_config

    root = tmp_path_factory.mktemp("out")
    cfg = backbone_config("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    save_file(
        timm.create_model(cfg.name, pretrained=False, **cfg.timm_kwargs()).state_dict(), str(root / "vit.safetensors")
    )
    ckpt, log = root / "ckpt", root / "train.log"
    rc, out, terminal = on_terminal(
        [
            "-v",
            "--log-file",
            str(log),
            "train",
            "-o",
            str(ckpt),
            "--data",
            "builtin",
            "--builtin-classes",
            "8",
            "--builtin-train",
            "4",
            "--builtin-test",
            "2",
            "--init-cls",
            "4",
            "--increment",
            "4",
            "--learn-tasks",
            "2",
            "--epochs",
            "2",
            "--ca-epochs",
            "1",
            "--batch-size",
            "8",
            *TINY,
            "--backbone-weights",
            str(root / "vit.safetensors"),
        ]
    )
    assert rc == 0, terminal
    art = root / "model"
    res = cli("onnx", ckpt, "--tasks", "4", "-o", art)
    assert res.exit_code == 0, res.output
    return {"root": root, "ckpt": ckpt, "art": art, "log": log, "stdout": out, "terminal": terminal, "onnx": res}


# ---------------------------------------------------------------------- logs
def test_train_log_file_holds_lines_not_bars(world):
    text = world["log"].read_text()
    assert not CONTROL.search(text), repr(CONTROL.search(text))
    assert "\r" in world["terminal"], "the terminal got no progress bars"  # bars were drawn, but not into the log
    assert "epoch 2/2" in text and "task 1 (2/2): classes 4-7, top-1 over 8 seen classes" in text
    assert "A-bar" in text and "next: care-export onnx" in text  # the results and the hint are in the file too
    assert "epoch 1/2" in world["terminal"]  # -v: debug lines on stderr
    assert "A-bar" in world["stdout"] and "task 1 (2/2)" not in world["stdout"]  # log lines never on stdout


def test_quiet_and_hints(world, tmp_path):
    res = world["onnx"]
    assert res.stdout.startswith("wrote ") and f"next: care-export parity {world['ckpt']} {world['art']}" in res.stderr
    res = cli("-q", "onnx", world["ckpt"], "--tasks", "4", "-o", tmp_path / "q")
    assert res.exit_code == 0 and res.stdout.startswith("wrote ") and res.stderr == ""
    res = cli("parity", world["ckpt"], world["art"], "--samples", "4", "--json")
    assert res.exit_code == 0 and "next:" not in res.output
    assert cli("-v", "-q", "info", world["ckpt"]).exit_code == 2


def test_log_file_records_the_error(tmp_path):
    res = cli("--log-file", tmp_path / "x.log", "info", tmp_path / "nothing")
    assert res.exit_code == 1 and res.stderr.startswith("error: checkpoint not found")
    assert "ERROR" in (tmp_path / "x.log").read_text() and "checkpoint not found" in (tmp_path / "x.log").read_text()
    res = cli("--log-file", tmp_path / "no" / "dir.log", "info", tmp_path)
    assert res.exit_code == 2 and "--log-file" in res.output


# ---------------------------------------------------------------------- --json
def documented_keys() -> dict[str, list[list[str]]]:
    """``{"<command> --json": [keys of each table]}`` from docs/CLI.md."""
    out, section, table = {}, None, None
    for line in (ROOT / "docs" / "CLI.md").read_text().splitlines():
        if line.startswith("### "):
            section, table = line[4:].strip(), None
            out[section] = []
        elif section and line.startswith("| `"):
            if table is None:
                table = []
                out[section].append(table)
            table += re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])
        elif not line.startswith("|"):
            table = None
    return out


def test_json_objects_have_the_documented_keys(world, tmp_path):
    docs = documented_keys()
    ck, art = world["ckpt"], world["art"]

    def keys(*args) -> dict:
        res = cli(*args, "--json")
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    d = keys("eval", art, "builtin", "--builtin-test", "2")
    assert set(d) == set(docs["eval --json"][0]) and d["images"] == 16
    d = keys("parity", ck, art, "--samples", "8", "--save-golden", tmp_path / "g.npz")
    assert set(d) == set(docs["parity --json"][0]) and d["ok"] and d["mode"] == "checkpoint"
    g = keys("parity", art, "--golden", tmp_path / "g.npz")
    assert set(g) == set(d) and g["mode"] == "golden" and g["precision"] == "fp32"
    d = keys("info", art)
    assert set(d) == set(docs["info --json"][0]) and d["check"]["ok"]
    d = keys("info", ck)
    assert set(d) == set(docs["info --json"][1]) and d["tasks"] == 2
    d = keys("verify", art)
    assert set(d) == set(docs["verify --json"][0]) and d["ok"] and d["tasks"] == 2
    d = keys(
        "quantize", art, "-o", tmp_path / "fp16", "--precision", "fp16", "--eval-data", "builtin", "--eval-samples", "8"
    )
    assert set(d) == set(docs["quantize --json"][0])
    assert d["report"] == json.loads((tmp_path / "fp16" / "calibration_report.json").read_text())
    d = keys(
        "bench",
        "--ckpt",
        ck,
        "--task-counts",
        "1,2",
        "--batch",
        "1",
        "--rounds",
        "3",
        "--capacity",
        "0",
        "--eager-max-tasks",
        "1",
        "--eager-rounds",
        "1",
        "--plot",
        tmp_path / "lat.svg",
    )
    top, row = docs["bench --json"]
    assert set(d) == set(top) and all(set(r) == set(row) for r in d["rows"])
    assert {r["engine"] for r in d["rows"]} == {"eager (PyTorch)", "artifact (ORT)", "backbone (ORT)"}
    assert all(r["p50_ms"] == r["ms"] <= r["p90_ms"] <= r["p99_ms"] for r in d["rows"])
    assert "<svg" in (tmp_path / "lat.svg").read_text()


def test_verify_json_of_a_damaged_artifact(world, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(world["art"], bad)
    with open(bad / "slots.bin", "r+b") as f:
        f.write(b"\xff" * 8)
    res = cli("verify", bad, "--json")
    d = json.loads(res.stdout)
    assert res.exit_code == 1 and not d["ok"] and "slot of task 0 is corrupt" in d["error"]
    assert res.stderr.startswith("error: ")
    res = cli("info", bad, "--verify")
    assert res.exit_code == 1 and "DAMAGED" in res.stdout and "slot of task 0" in res.stderr


# ---------------------------------------------------------------------- info of an artifact
def without_torch(*args) -> str:
    """stdout of ``care-export ARGS`` in an interpreter where ``import torch`` fails."""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + f"from care_export.cli import main\nmain({[str(a) for a in args]!r})\n"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_info_describes_an_artifact_without_torch(world):
    art = world["art"]
    d = json.loads(without_torch("info", art, "--json"))
    assert json.loads(without_torch("verify", art, "--json"))["ok"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert (d["kind"], d["precision"], d["capacity"], d["tasks"], d["classes"]) == ("artifact", "fp32", 4, 2, 8)
    assert d["graph"] == {
        "nodes": len(onnx.load(str(art / "model.onnx"), load_external_data=False).graph.node),
        "opset": 17,
    }
    assert d["preprocessing"] == manifest["preprocessing"]
    assert d["bytes"] == sum((art / n).stat().st_size for n in manifest["files"])
    text = cli("info", art).stdout
    assert "2 active of capacity 4" in text and f"{d['graph']['nodes']} nodes, opset 17" in text
    assert "files        ok" in text


# ---------------------------------------------------------------------- plots
def test_plot_draws_the_metrics(world, tmp_path):
    from care_export.plots.accuracy import plot_accuracy

    metrics = json.loads((world["ckpt"] / "metrics.json").read_text())
    res = cli("plot", world["ckpt"])
    assert res.exit_code == 0, res.output
    png = (world["ckpt"] / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    drawn = plot_accuracy(metrics, tmp_path / "a.svg")
    assert "<svg" in (tmp_path / "a.svg").read_text()
    assert drawn["tasks"] == [1, 2]
    assert drawn["top1"] == pytest.approx(metrics["top1"])
    assert drawn["matrix"] == [pytest.approx(row) for row in metrics["matrix"]]
    assert cli("plot", world["ckpt"], "-o", tmp_path / "a.jpg").exit_code == 1


def test_latency_plot_draws_the_rows(tmp_path):
    from care_export.plots.latency import plot_latency

    rows = [
        {"tasks": t, "batch": b, "engine": e, "ms": ms}
        for (t, b, e, ms) in [
            (1, 1, "artifact (ORT)", 2.0),
            (10, 1, "artifact (ORT)", 2.5),
            (1, 1, "backbone (ORT)", 1.5),
            (10, 1, "backbone (ORT)", 1.5),
            (1, 1, "eager (PyTorch)", 30.0),
            (10, 8, "artifact (ORT)", 9.0),
        ]
    ]
    drawn = plot_latency(rows, tmp_path / "lat.png")
    assert (tmp_path / "lat.png").read_bytes().startswith(b"\x89PNG")
    assert drawn == {
        "artifact (ORT), batch 1": {"tasks": [1, 10], "ms": [2.0, 2.5]},
        "artifact (ORT), batch 8": {"tasks": [10], "ms": [9.0]},
        "backbone (ORT), batch 1": {"tasks": [1, 10], "ms": [1.5, 1.5]},
        "eager (PyTorch), batch 1": {"tasks": [1], "ms": [30.0]},
    }


def test_plot_without_matplotlib_names_the_extra(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = cli("plot", world["ckpt"], "-o", world["root"] / "x.png")
    assert res.exit_code == 1 and res.stderr.strip() == (
        "error: plotting needs matplotlib: pip install 'care-export[plot]'"
    )
    assert not (world["root"] / "x.png").exists()
    res = cli("bench", "--ckpt", world["ckpt"], "--task-counts", "1", "--plot", world["root"] / "l.png")
    assert res.exit_code == 1 and "care-export[plot]" in res.stderr and "cores" not in res.stderr  # before timing


def test_plot_refuses_an_untrained_checkpoint(tmp_path):
    res = cli("synth-ckpt", "-o", tmp_path / "s", *TINY, "--init-cls", "4", "--increment", "4", "--tasks", "1")
    assert res.exit_code == 0 and "next: care-export onnx" in res.stderr
    res = cli("plot", tmp_path / "s")
    assert res.exit_code == 1 and "holds no accuracy" in res.stderr


# ---------------------------------------------------------------------- run, option names
def test_run_names_missing_images_before_the_backend(world, tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    res = cli("run", world["art"], tmp_path / "missing.png", "--device", "cpu")
    assert res.exit_code == 1 and res.stderr.splitlines()[0] == f"error: image not found: {tmp_path / 'missing.png'}"
    assert "onnxruntime" not in res.stderr  # no session was opened
    res = cli("run", world["art"], tmp_path / "missing.png", tmp_path / "a.png", "--device", "cpu")
    lines = res.stderr.splitlines()
    assert res.exit_code == 1 and lines[0].startswith("error: image not found") and "onnxruntime on cpu" in lines[1]
    assert res.stdout.startswith(str(tmp_path / "a.png"))


@pytest.mark.parametrize("command,names", [("train", "--learn-tasks, --tasks"), ("bench", "--task-counts, --tasks")])
def test_clearer_option_names_keep_the_old_ones(command, names):
    assert names in cli(command, "--help").output
    assert "Capacity" in cli("onnx", "--help").output


# ---------------------------------------------------------------------- ONNX Runtime's quantization tool
def test_ort_quantization_chatter_becomes_debug_lines(capfd, caplog):
    from onnx import TensorProto, helper, numpy_helper

    from calibration.int8 import quantize_qdq

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["images", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    images = [np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)]
    with caplog.at_level(logging.DEBUG, logger="calibration"):
        out = quantize_qdq(model, images, {"mm"}, "percentile", "images")
    assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    captured = capfd.readouterr()
    assert captured.out == "" and "pre-processing" not in captured.err
    ours = [r.getMessage() for r in caplog.records if r.name == "calibration.int8"]
    assert any("pre-processing" in m for m in ours) and any("histogram" in m.lower() for m in ours)
    assert not any("pre-processing" in r.getMessage() for r in caplog.records if r.name == "root")
