"""The Triton model repository: config.pbtxt valid against Triton's own ModelConfig schema, and
each version run in ONNX Runtime as Triton's onnxruntime backend loads it."""

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_artifact, make_checkpoint

from care_export.cli import main
from care_export.export.parity import random_images
from runtime import Session

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")  # in the dev extra


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def parse_config(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())  # raises on any unknown field


def triton_style_run(version_dir, config, batch: int):
    """What Triton's onnxruntime backend does: load the file the config names from the version
    folder (external data beside it), feed only the config's inputs, batch on the first axis."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(version_dir / config.default_model_filename), providers=["CPUExecutionProvider"])
    required = [i.name for i in sess.get_inputs()]
    assert required == [i.name for i in config.input] == ["images"]  # growth tensors stay initializers
    assert batch <= config.max_batch_size
    x = random_images(batch, 32, seed=3)
    outs = sess.run([o.name for o in config.output], {"images": x})
    for o, spec in zip(outs, config.output):
        assert list(o.shape) == [batch, *spec.dims]
    return x, outs


def test_triton_repository_and_versions(tmp_path):
    ck3 = make_checkpoint(tmp_path / "ck3", [4, 3, 3], seed=2)
    ck5 = make_checkpoint(tmp_path / "ck5", [4, 3, 3, 3, 3], seed=2)
    art = make_artifact(ck3, tmp_path / "art", 6)
    res = cli(
        "triton",
        art,
        "-o",
        tmp_path / "repo",
        "--name",
        "care",
        "--max-batch",
        "8",
        "--instances",
        "2",
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    model = tmp_path / "repo" / "care"
    cfg = parse_config(model / "config.pbtxt")
    assert cfg.name == "care" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [3, 32, 32] and cfg.input[0].data_type == model_config_pb2.TYPE_FP32
    assert [o.name for o in cfg.output] == ["logits", "routing_tasks", "routing_experts"]
    assert cfg.output[0].label_filename == "labels.txt" and cfg.output[1].data_type == model_config_pb2.TYPE_INT64
    assert cfg.HasField("dynamic_batching") and cfg.instance_group[0].count == 2
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (model / "labels.txt").read_text().splitlines() == Session(art).class_names

    def check_version(v):
        x, (logits, tasks, experts) = triton_style_run(model / str(v), cfg, 8)
        with Session(model / str(v), device="cpu") as s:
            pred = s.predict(x, return_routing=True)
            np.testing.assert_allclose(logits[:, : s.num_classes], pred.logits, rtol=0, atol=1e-5)
            assert (logits[:, s.num_classes :] < -1e29).all()  # unused class slots never win
            return s.num_tasks, logits, tasks

    assert check_version(1)[0] == 3
    res = cli("add-task", "--triton", model, ck5, "--keep", "1")
    assert res.exit_code == 0 and "removed version(s) 1" in res.output, res.output
    assert sorted(p.name for p in model.iterdir()) == ["2", "config.pbtxt", "labels.txt"]
    assert check_version(2)[0] == 5
    assert len((model / "labels.txt").read_text().splitlines()) == 16
    res = cli("triton", art, "-o", tmp_path / "repo", "--name", "care")
    assert res.exit_code == 1 and "already exists" in res.output
    res = cli("add-task", "--triton", model, ck5)  # nothing new: refused, no version 3
    assert res.exit_code == 1 and not (model / "3").exists()
