"""INT8: symmetric Q/DQ (zero point 0) with per-channel weights, activations calibrated.

Two steps:

1. :func:`store_growth_int8`: the large growth tensors (expert stacks, the shared experts, the
   cosine head) are stored as int8 with one float32 scale per row (per output channel of the
   head), symmetric, and dequantized in the graph: a ``Gather`` of a stack takes int8 rows and
   their scales (``Cast`` + ``Mul``: only the selected rows are widened), any other use reads
   the whole tensor widened once. The router table, read by the routing path only, is stored as
   float16 unless routing is reduced too. The routing path still *computes* in float32.
2. :func:`quantize_qdq`: ONNX Runtime's static quantization (QDQ format, QInt8 activations and
   weights, symmetric, weights per channel) of the MatMul, Gemm and Conv nodes outside the
   routing path and outside the int8-stored tensors' uses (their weights are already int8 and
   their scales per row), with activation ranges from the calibration set. Only the inputs of
   those nodes get Q/DQ, never their outputs; the int8 weight values are then re-rounded by
   ``calibration.gptq`` and the most routing-sensitive layers fall back to weight-only int8
   (``calibration.fallback``).
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.tensor_files import as_stored

from .calib_data import batches
from .gptq import gptq_round
from .graph import consumers, node_attr, save_model

SCALE_SUFFIX = ".scale"
# Growth tensors stored in int8, by the last part of their name, and the axes a scale spans
# (the scale varies along the others). Rows along axis 0 are what growth writes per task.
INT8_STORED = {
    "experts.down": (1,),  # (cap*r, d): one scale per row
    "experts.up": (2,),  # (cap, r, d): one scale per (slot, hidden unit)
    "experts.up_bias": (1, 2),  # (cap, 1, d): one scale per slot
    "routers.weight": (1,),  # (router rows, r): one scale per scored expert
    "shared.down": (2,),  # (1, r_s, d): one scale per row
    "shared.up": (2,),  # (1, r_s, d): one scale per hidden unit
    "head.weight": (0,),  # (d, classes): one scale per class (output channel)
}
# Growth tensors that only the routing path reads and that are stored float16 when routing stays
# FP32: 8-bit router rows alone flip 0.5-1.4 % of the demo model's expert choices per block
# (docs/CALIBRATION.md). The perceptors stay float32: float16 ones flip more than that.
ROUTING_FP16 = ("routers.weight",)
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
METHODS = ("minmax", "entropy", "percentile")
CALIB_BATCH = 1  # equal batches: the histogram methods stack per-batch outputs
# Images per collect_data call: the calibrator holds every calibrated tensor of them until it merges
# (the targets' inputs: 49 tensors, 51 MB per image on ViT-B/16); merging per call costs about the same.
CALIB_GROUP = 2

log = logging.getLogger(__name__)


@contextmanager
def quiet_ort_quantization():
    """ONNX Runtime's quantization tool prints its histogram chatter and logs a "consider
    pre-processing" warning on the root logger at every call: both become debug lines of ours."""
    root = logging.getLogger()

    def from_ort(record) -> bool:
        if "onnxruntime" in record.pathname:
            log.debug("onnxruntime: %s", record.getMessage())
            return False
        return True

    placeholder = logging.NullHandler() if not root.handlers else None  # logging.warning would call basicConfig
    if placeholder:
        root.addHandler(placeholder)
    root.addFilter(from_ort)
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(from_ort)
        if placeholder:
            root.removeHandler(placeholder)
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.debug("onnxruntime: %s", line.strip())


def stored_kind(name: str) -> tuple[int, ...] | None:
    return next((axes for suffix, axes in INT8_STORED.items() if _is(name, suffix)), None)


def routing_fp16(growth: set[str]) -> set[str]:
    return {g for g in growth if any(_is(g, k) for k in ROUTING_FP16)}


def _is(name: str, kind: str) -> bool:
    """Whether tensor ``name`` is a ``kind`` (``moe.3.experts.down`` is an ``experts.down``)."""
    return name == kind or name.endswith("." + kind)


def quantize_symmetric(a: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8, scale float32)`` with ``a ~ q * scale``, ``|q| <= 127``, one scale per slice
    along ``axes`` (kept as size-1 dims so that it broadcasts and gathers with ``q``)."""
    a = np.asarray(a, np.float32)
    amax = np.abs(a).max(axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(a / scale), -127, 127).astype(np.int8)
    return q, scale


def store_growth_int8(
    model: onnx.ModelProto, growth: set[str], fp16: set[str] = frozenset(), moments: dict[str, np.ndarray] | None = None
) -> set[str]:
    """Rewrite ``model`` in place: the growth tensors named in ``INT8_STORED`` become int8 plus
    ``NAME.scale`` (rounded by :func:`~calibration.gptq.gptq_round` where ``moments`` has their
    readers' input moments), the tensors in ``fp16`` float16. Returns the names of the nodes
    added (they widen to float32; keep them float)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph)
    added: list[onnx.NodeProto] = []
    before: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # node name -> nodes to insert before it
    for name in sorted(growth):
        axes = stored_kind(name)
        if name not in inits or (axes is None and name not in fp16):
            continue
        a = numpy_helper.to_array(inits[name])
        if name in fp16:
            inits[name].CopyFrom(numpy_helper.from_array(as_stored(a, "float16"), name))
            scale = None
        else:
            q, scale = quantize_symmetric(a, axes)
            if moments and name in moments and a.ndim == 2 and axes == (1,):  # rows along axis 0
                q = gptq_round(a, scale, moments[name])
            inits[name].CopyFrom(numpy_helper.from_array(q, name))
            graph.initializer.append(numpy_helper.from_array(scale, name + SCALE_SUFFIX))
        whole = None
        for node, j in readers[name]:
            if node.op_type == "Gather" and j == 0 and node_attr(node, "axis", 0) == 0:
                # Gather the stored rows (and their scales); widen only those.
                base = f"{node.name}/stored"
                rows = f"{base}/rows"
                new = [helper.make_node("Gather", [name, node.input[1]], [rows], name=f"{base}/gather", axis=0)]
                if scale is None:  # the Gather itself becomes the Cast
                    node.op_type = "Cast"
                    del node.input[:]
                    node.input.append(rows)
                    del node.attribute[:]
                    node.attribute.append(helper.make_attribute("to", TensorProto.FLOAT))
                else:
                    srows = f"{base}/scales"
                    new += [
                        helper.make_node(
                            "Gather", [name + SCALE_SUFFIX, node.input[1]], [srows], name=f"{base}/gather_scale", axis=0
                        ),
                        helper.make_node("Cast", [rows], [rows + "_f"], name=f"{base}/cast", to=TensorProto.FLOAT),
                    ]
                    node.op_type = "Mul"
                    del node.input[:]
                    node.input.extend([rows + "_f", srows])
                    del node.attribute[:]
                before[node.name] += new
                added += new + [node]
            else:
                if whole is None:
                    whole = f"{name}/dequant"
                    cast = helper.make_node(
                        "Cast",
                        [name],
                        [whole + "/cast" if scale is not None else whole],
                        name=whole + "/cast",
                        to=TensorProto.FLOAT,
                    )
                    new = (
                        [cast]
                        if scale is None
                        else [
                            cast,
                            helper.make_node("Mul", [whole + "/cast", name + SCALE_SUFFIX], [whole], name=whole),
                        ]
                    )
                    before[node.name] += new
                    added += new
                node.input[j] = whole
    nodes = []
    for n in graph.node:
        nodes += before.get(n.name, []) + [n]
    del graph.node[:]
    graph.node.extend(nodes)
    return {n.name for n in added}


def weight_nodes(model: onnx.ModelProto, growth: set[str]) -> set[str]:
    """MatMul, Gemm and Conv nodes whose weight (second input) is a float initializer other than
    a growth tensor: the backbone's linear layers. Products of two activations (attention
    scores, the gathered experts of the token path, whose weights are int8 already) stay float."""
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT} - growth
    return {
        n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in floats
    }


class ListReader:
    """An ONNX Runtime ``CalibrationDataReader`` over batches of preprocessed images."""

    def __init__(self, input_name: str, batches, progress=None):
        self._it = iter(batches)
        self.input_name = input_name
        self.progress = progress

    def get_next(self):
        batch = next(self._it, None)
        if batch is None:
            return None
        if self.progress:
            self.progress(len(batch))
        return {self.input_name: np.ascontiguousarray(batch, np.float32)}

    def __len__(self):  # some ORT versions ask
        return 0


def activation_inputs(model: onnx.ModelProto, targets: set[str]) -> set[str]:
    """The tensors whose ranges ``quantize_static`` reads when it puts Q/DQ on the inputs of the
    nodes named in ``targets`` only: their inputs that are not initializers (a weight's scale
    comes from its own values)."""
    inits = {t.name for t in model.graph.initializer}
    return {i for n in model.graph.node if n.name in targets for i in n.input if i and i not in inits}


def calibrator(src: Path, tensors: set[str], method: str, augmented: Path, large: bool, threads: int | None = None):
    """ONNX Runtime's calibrator for ``method`` (with ``create_calibrator``'s defaults) that
    calibrates only ``tensors``, its session on ``threads`` intra-op threads (``None``: ORT's
    default). ``create_calibrator`` would calibrate the inputs and outputs of every
    MatMul/Gemm/Conv (391 tensors, 212 MB per image on ViT-B/16) and builds its augmented graph at
    once, so the narrowed class is built here."""
    from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater

    base, options = {
        "minmax": (MinMaxCalibrater, {}),
        "entropy": (EntropyCalibrater, {}),
        "percentile": (PercentileCalibrater, {"symmetric": True}),
    }[method]

    class Narrowed(base):
        def select_tensors_to_calibrate(self, model):
            found, value_infos = super().select_tensors_to_calibrate(model)
            return found & tensors, value_infos

        def create_inference_session(self):
            import onnxruntime as ort

            opts = ort.SessionOptions()
            # As ORT's own calibrator: the augmented graph unoptimised, so fusions cannot hide a tensor.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if threads:
                opts.intra_op_num_threads = int(threads)
            self.infer_session = ort.InferenceSession(
                self.augmented_model_path, sess_options=opts, providers=self.execution_providers
            )

    c = Narrowed(
        src, list(QUANTIZED_OPS), augmented_model_path=str(augmented), use_external_data_format=large, **options
    )
    c.augment_graph()
    c.create_inference_session()
    return c


def quantize_qdq(
    model: onnx.ModelProto,
    images,
    targets: set[str],
    method: str,
    input_name: str,
    progress=None,
    threads: int | None = None,
) -> onnx.ModelProto:
    """Static QDQ quantization of the nodes named in ``targets`` of ``model`` (weights in memory),
    activation ranges from ``images`` (an iterable of image arrays, ``calib_data.Chunks``).

    Only the targets' activation inputs are calibrated (:func:`activation_inputs`). ONNX Runtime's
    calibrator keeps every calibrated tensor of the images it is given until it merges them into
    its ranges or histograms, so it is given a few images at a time (``collect_data`` merges into
    what it has); the ranges then go to ``quantize_static`` through its calibration cache."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if not targets:  # quantize_static would take an empty list for "every node"
        return model
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="care-quantize-") as tmp, quiet_ort_quantization():
        src, dst, cache = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", Path(tmp) / "ranges.json"
        large = save_model(model, src)
        calib = calibrator(src, activation_inputs(model, targets), method, Path(tmp) / "aug.onnx", large, threads)
        for chunk in images:
            for group in batches(chunk, CALIB_GROUP):
                calib.collect_data(ListReader(input_name, batches(group, CALIB_BATCH), progress))
        save_tensors_data(calib.compute_data(), cache)
        del calib
        quantize_static(
            str(src),
            str(dst),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=sorted(targets),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            use_external_data_format=large,
            calibration_cache_path=cache,
            # Q/DQ on the inputs of the quantized nodes only: their outputs (the residual branch
            # before its bias) stay float, as TensorRT's int8 GEMMs write them.
            # Biases stay float32: the outputs are float, and an artifact stores no int32 tensors.
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
            },
        )
        log.info(f"int8: {len(targets)} MatMul/Gemm/Conv nodes quantized, activation ranges by {method}")
        return onnx.load(str(dst))
