"""The fallback rule of calibration/fallback.py on a hand-built QDQ graph with a scripted evaluator:
which layers fall back, and how many passes over the calibration images it spends."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.fallback import activation_qdq, sensitivity_fallback

LAYERS = ("mm0", "mm1", "mm2")


def qdq_model() -> onnx.ModelProto:
    """Three MatMuls, each reading DQ(Q(x)) of its activation and DQ of an int8 weight."""
    nodes, inits = [], [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z")]
    x = "x"
    for i, name in enumerate(LAYERS):
        inits.append(numpy_helper.from_array(np.ones((4, 4), np.int8), f"w{i}"))
        nodes += [
            helper.make_node("QuantizeLinear", [x, "s", "z"], [f"q{i}"], name=f"q{i}"),
            helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"dq{i}"], name=f"dq{i}"),
            helper.make_node("DequantizeLinear", [f"w{i}", "s", "z"], [f"wdq{i}"], name=f"wdq{i}"),
            helper.make_node("MatMul", [f"dq{i}", f"wdq{i}"], [f"y{i}"], name=name),
        ]
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


class Scripted:
    """Flips per block = ``floor`` + the cost of each layer whose activation is still quantized."""

    eps = None
    images = range(10)

    def __init__(self, floor: float, cost: dict[str, float]):
        self.floor, self.cost, self.calls = floor, cost, 0

    def score(self, model):
        self.calls += 1
        act = activation_qdq(model, set(LAYERS))
        flips = self.floor + sum(self.cost[n] for n in act)
        return np.array([flips, flips / 2]), 0.0, 1.0


def test_w8a8_within_target_takes_one_pass():
    ev = Scripted(0.0, dict.fromkeys(LAYERS, 0.01))
    model, record = sensitivity_fallback(qdq_model(), set(LAYERS), ev, target=1.0)
    assert ev.calls == 1 and record["weight_only"] == [] and record["floor"] is None
    assert record["w8a8"] == pytest.approx(0.03)
    assert set(activation_qdq(model, set(LAYERS))) == set(LAYERS)


def test_most_sensitive_layers_fall_back_until_the_target_holds():
    ev = Scripted(0.001, {"mm0": 0.001, "mm1": 0.02, "mm2": 0.0025})
    model, record = sensitivity_fallback(qdq_model(), set(LAYERS), ev, target=0.005)
    assert record["weight_only"] == ["mm1"] and record["floor"] == pytest.approx(0.001)
    assert record["calibration_flips"] == pytest.approx(0.0045)
    assert list(record["sensitivity"]) == ["mm1", "mm2", "mm0"]
    assert set(activation_qdq(model, set(LAYERS))) == {"mm0", "mm2"}
    ev = Scripted(0.001, {"mm0": 0.001, "mm1": 0.02, "mm2": 0.004})  # now mm2 must go too
    _, record = sensitivity_fallback(qdq_model(), set(LAYERS), ev, target=0.005)
    assert record["weight_only"] == ["mm1", "mm2"]


def test_floor_above_target_sends_every_layer_back():
    ev = Scripted(0.05, {"mm0": 0.0, "mm1": 0.01, "mm2": 0.0})
    model, record = sensitivity_fallback(qdq_model(), set(LAYERS), ev, target=0.005)
    assert set(record["weight_only"]) == set(LAYERS) and record["floor"] == pytest.approx(0.05)
    assert activation_qdq(model, set(LAYERS)) == {}
