"""Error-compensated int8 rounding (calibration/gptq.py) and the ONNX Runtime session options that
keep weight-only int8 layers in float32 (runtime.backends.onnxrt.session_options)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.gptq import gptq_round, input_moments, weight_readers
from calibration.int8 import quantize_symmetric
from runtime.backends.onnxrt import session_options


def correlated_inputs(rng, n=2000, d=64, rank=6):
    """Inputs like a transformer's: a few strong directions plus small noise."""
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) * 3 + rng.normal(size=(n, d)) * 0.1


def test_gptq_lowers_the_output_error_with_the_same_scales():
    rng = np.random.default_rng(0)
    x = correlated_inputs(rng)
    w = rng.normal(size=(48, 64)).astype(np.float32)
    w[5] = 0  # an empty slot's row
    q_near, scale = quantize_symmetric(w, (1,))
    q = gptq_round(w, scale, x.T @ x / len(x))
    assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q.astype(int)).max() <= 127
    assert not q[5].any()
    err = lambda qq: np.mean((x @ (w - qq * scale).T) ** 2)  # noqa: E731
    assert err(q) < 0.5 * err(q_near), (err(q), err(q_near))
    # Each weight still lands within a few steps of its own value: the scales are unchanged.
    assert np.abs(q * scale - w).max() < 8 * scale.max()


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 32)).astype(np.float32)
    q_near, scale = quantize_symmetric(w, (1,))
    h = np.diag(rng.uniform(0.5, 2.0, size=32))
    np.testing.assert_array_equal(gptq_round(w, scale, h), q_near)


def _linear_model(w_name="w", conv=False):
    if conv:
        x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 8, 8])
        node = helper.make_node("Conv", ["images", w_name], ["y"], kernel_shape=[4, 4], strides=[4, 4])
        w = np.random.default_rng(2).normal(size=(5, 3, 4, 4)).astype(np.float32)
    else:
        x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 7, 6])
        node = helper.make_node("MatMul", ["h", w_name], ["y"])
        w = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32)
    nodes = [node] if conv else [helper.make_node("Relu", ["images"], ["h"]), node]
    graph = helper.make_graph(
        nodes,
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, w_name)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("conv", [False, True])
def test_input_moments_are_the_second_moments_of_each_layer_input(conv):
    model = _linear_model(conv=conv)
    x = np.random.default_rng(3).normal(size=(5, 3, 8, 8) if conv else (5, 7, 6)).astype(np.float32)
    readers = weight_readers(model, {"w"})
    assert set(readers) == {"w"}
    h = input_moments(model, readers, [x], "images")["w"]
    if conv:  # rows are the 4x4 patches, in (channel, kh, kw) order
        rows = x.reshape(5, 3, 2, 4, 2, 4).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 48)
    else:
        rows = np.maximum(x, 0).reshape(-1, 6)
    np.testing.assert_allclose(h, rows.T.astype(np.float64) @ rows / len(rows), rtol=1e-5, atol=1e-6)


def test_weight_only_int8_matmul_computes_in_float32():
    """DequantizeLinear(int8 weight) -> MatMul with a float activation: ONNX Runtime fuses it into
    MatMulNBits, whose default accuracy level quantizes the activation to int8. The artifacts'
    session options must keep the float activation (the graph's meaning)."""
    rng = np.random.default_rng(4)
    k, n = 192, 96
    w = rng.normal(size=(k, n)).astype(np.float32) * 0.05
    q, scale = quantize_symmetric(w, (0,))  # one scale per output column
    dq = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wf"], axis=1)
    mm = helper.make_node("MatMul", ["x", "wf"], ["y"])
    graph = helper.make_graph(
        [dq, mm],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [
            numpy_helper.from_array(q, "wq"),
            numpy_helper.from_array(scale.reshape(n), "ws"),
            numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    x = (rng.normal(size=(16, k)) * np.linspace(0.01, 4, k)).astype(np.float32)  # uneven channels
    expected = x.astype(np.float64) @ (q.astype(np.float64) * scale)
    got = sess.run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    onnx.checker.check_model(model)
