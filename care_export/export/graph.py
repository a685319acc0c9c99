"""The static ONNX graph of a CaRE model, written from the artifact's tensor layout.

Nothing here reads weights: the graph is a function of :class:`~runtime.layout.Dims`, the
opset and the batch size alone, and every weight is an external initializer named by
:func:`~runtime.layout.layout`. That is what makes growth a data change: the same ``Dims``
give the same ``model.onnx`` bytes whatever the number of learned tasks.

Per block the BR-MoE runs every expert's down projection on the CLS token only (one GEMM over
the slots' weights laid side by side), computes every perceptor's negated entropy from those
hidden activations (the up projection is folded into perceptors and routers, runtime/packing.py),
masks unused slots to -inf, picks M routers (TopK), gathers their rows from the packed router
table, keeps K experts each (TopK, softmax over the kept K), and runs only those experts over all
tokens: two batched matmuls over gathered weights, the routing weights applied to the hidden
units (ReLU commutes with a weight >= 0). The shared expert's weights are the same for every
sample, so it runs as two plain GEMMs, the second accumulating into the selected experts' output,
and every up bias joins the backbone MLP's output bias: no per-sample copy of a weight is made.
Invalid picks (T < M, T < K) are redirected to slot 0 and weighted 0, so unused slots never
reach the routing decisions or the token path whatever they hold. Node names carry the routing
stage (``block{i}/moe/<stage>/``) for profiles (benchmarks/profile_graph.py).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from runtime.layout import (
    FEATURES,
    INPUT,
    LOGITS,
    ROUTING_EXPERTS,
    ROUTING_TASKS,
    Dims,
    TensorSpec,
    router_base,
)
from runtime.numerics import BACKBONE_LN_EPS, ENTROPY_EPS, NORM_EPS, PART_LN_EPS

MIN_OPSET = 17  # LayerNormalization

_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}


class Builder:
    """Appends nodes to a graph; inline constants for what never changes, external data for weights."""

    def __init__(self, specs: dict[str, TensorSpec]):
        self.specs = specs
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._named: set[str] = set()
        self._count = 0
        self.scope = ""

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        self._count += 1
        base = f"{self.scope}/{op_type}_{self._count}" if self.scope else f"{op_type}_{self._count}"
        outs = [base] if outputs == 1 else [f"{base}:{j}" for j in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        """An inline constant (stored in model.onnx: it never changes)."""
        self._count += 1
        name = f"const_{self._count}"
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def i64(self, value) -> str:
        return self.const(value, np.int64)

    def weight(self, name: str) -> str:
        """The external initializer ``name`` (declared once)."""
        if name not in self._named:
            s = self.specs[name]
            t = TensorProto(
                name=name, data_type=_DTYPES[s.dtype], dims=list(s.shape), data_location=TensorProto.EXTERNAL
            )
            for key, value in (("location", s.file), ("offset", str(s.offset)), ("length", str(s.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            self.initializers.append(t)
            self._named.add(name)
        return name

    def layer_norm(self, x: str, scale: str, bias: str | None, eps: float) -> str:
        inputs = (x, scale) if bias is None else (x, scale, bias)
        return self.op("LayerNormalization", *inputs, axis=-1, epsilon=eps)

    def linear(self, x: str, w: str, b: str) -> str:
        return self.op("Add", self.op("MatMul", x, self.weight(w)), self.weight(b))


class _Shared:
    """Graph-wide values: batch size shapes and the per-slot index constants."""

    def __init__(self, g: Builder, dims: Dims, moe: bool, image: str = INPUT):
        d = dims.embed_dim
        self.batch = g.op("Shape", image, start=0, end=1)  # (1,) int64
        self.cls_shape = g.op("Concat", self.batch, g.i64([1, d]), axis=0)
        if not moe:
            return
        cap = dims.capacity
        self.ones = g.const(np.ones(d))
        self.scalar_batch = g.op("Squeeze", self.batch, g.i64([0]))
        self.batch_col = g.op("Unsqueeze", g.op("Range", g.i64(0), self.scalar_batch, g.i64(1)), g.i64([1]))  # (B, 1)
        self.iota = g.i64(np.arange(cap))
        r, mk = dims.expert_dim, np.prod(routing_widths(dims))
        self.slot_rows = g.i64(np.arange(cap * r).reshape(cap, r))  # rows of slot t in experts.down
        self.spread_r = g.const(np.kron(np.eye(mk), np.ones(r)))  # (M*K, M*K*r): a weight per hidden unit
        self.router_base = g.i64([router_base(t, cap) for t in range(cap)])
        self.is_first = g.const(np.arange(cap)[:, None] == 0, np.bool_)
        self.active_tasks = g.weight("active_tasks")
        self.slot_active = g.op("Unsqueeze", g.op("Less", self.iota, self.active_tasks), g.i64([1]))  # (cap, 1)
        self.neg_inf = g.const(-np.inf)
        self.zero = g.const(0.0)
        self.i0, self.im1 = g.i64(0), g.i64(-1)
        self.forced = None  # (B, cap) routers always selected (the iterative graph's training-form passes)
        self.inf = None  # +inf, where the graph needs it


def routing_widths(dims: Dims) -> tuple[int, int]:
    """``(M, K)`` as the graph reports them (capped by the capacity)."""
    return min(dims.topk_routers, dims.capacity), min(dims.topk_experts, dims.capacity)


def _gelu(g: Builder, x: str, opset: int) -> str:
    if opset >= 20:
        return g.op("Gelu", x)
    # The erf form that ONNX Runtime fuses into one Gelu kernel.
    erf = g.op("Erf", g.op("Div", x, g.const(math.sqrt(2.0))))
    return g.op("Mul", g.op("Mul", x, g.op("Add", erf, g.const(1.0))), g.const(0.5))


def attention(g: Builder, dims: Dims, i: int, x: str) -> str:
    """``xa = x + Attn(LN1(x))`` of block ``i``."""
    b = f"vit.blocks.{i}."
    d, heads = dims.embed_dim, dims.num_heads
    h = g.layer_norm(x, g.weight(b + "norm1.weight"), g.weight(b + "norm1.bias"), BACKBONE_LN_EPS)
    qkv = g.op("Reshape", g.linear(h, b + "attn.qkv", b + "attn.qkv_bias"), g.i64([0, 0, 3, heads, d // heads]))
    # The attention scale is folded into the q projection at export.
    q = g.op("Transpose", g.op("Gather", qkv, g.i64(0), axis=2), perm=[0, 2, 1, 3])
    k = g.op("Transpose", g.op("Gather", qkv, g.i64(1), axis=2), perm=[0, 2, 3, 1])
    v = g.op("Transpose", g.op("Gather", qkv, g.i64(2), axis=2), perm=[0, 2, 1, 3])
    att = g.op("Softmax", g.op("MatMul", q, k), axis=-1)
    o = g.op("Reshape", g.op("Transpose", g.op("MatMul", att, v), perm=[0, 2, 1, 3]), g.i64([0, 0, d]))
    return g.op("Add", x, g.linear(o, b + "attn.proj", b + "attn.proj_bias"))


def mlp(g: Builder, dims: Dims, i: int, xa: str, opset: int, bias: str | None = None) -> str:
    """``MLP(LN2(xa))`` of block ``i``; ``bias`` (broadcast to it) replaces fc2's bias."""
    b = f"vit.blocks.{i}."
    h = g.layer_norm(xa, g.weight(b + "norm2.weight"), g.weight(b + "norm2.bias"), BACKBONE_LN_EPS)
    h = _gelu(g, g.linear(h, b + "mlp.fc1", b + "mlp.fc1_bias"), opset)
    return g.op("Add", g.op("MatMul", h, g.weight(b + "mlp.fc2")), bias or g.weight(b + "mlp.fc2_bias"))


def _perceptor_neg_entropy(g: Builder, h: str, proj: str, shift: str, bias: str, classes: int, r: int) -> str:
    """Negative entropy of ``fc(LN(c))`` for expert output ``c = h up + up_bias``, computed from
    ``h`` alone (runtime/packing.py folds ``up`` and the LayerNorm into ``proj`` and ``shift``)."""
    y = g.op("Add", g.op("MatMul", h, g.weight(proj)), g.weight(shift))
    num, hg, lin = g.op("Split", y, g.i64([classes, r, 1]), axis=-1, outputs=3)
    std = g.op("Sqrt", g.op("Add", g.op("ReduceSum", g.op("Mul", hg, h), g.i64([-1]), keepdims=1), lin))
    p = g.op("Softmax", g.op("Add", g.op("Div", num, std), g.weight(bias)), axis=-1)
    return g.op("ReduceSum", g.op("Mul", p, g.op("Log", g.op("Add", p, g.const(ENTROPY_EPS)))), g.i64([-1]), keepdims=0)


class MoEOut:
    """A block's BR-MoE, in the parts :func:`network` adds to the residual stream."""

    def __init__(self, selected: str, bias: str, shared_hidden: str, shared_up: str, tasks: str, experts: str):
        self.selected = selected  # (B, N, d) the selected experts' weighted output, biases excluded
        self.bias = bias  # (B, 1, d) fc2's bias and every expert's up bias, routing weights applied
        self.shared_hidden = shared_hidden  # (B*N, rs) the shared expert's hidden activations
        self.shared_up = shared_up  # (rs, d)
        self.tasks, self.experts = tasks, experts  # (B, M), (B, M, K), -1 where nothing was selected


def _brmoe(g: Builder, dims: Dims, i: int, xa: str, s: _Shared) -> MoEOut:
    """BR-MoE of block ``i`` on ``xa`` (B, N, d)."""
    p = f"moe.{i}."
    d, r, rs, cap = dims.embed_dim, dims.expert_dim, dims.shared_dim, dims.capacity
    m, k = routing_widths(dims)
    w = lambda name: g.weight(p + name)  # noqa: E731
    scope = g.scope

    g.scope = f"{scope}/norm"
    # Affine-free LayerNorm shared by every expert and the shared expert (affines are folded).
    xh = g.layer_norm(xa, s.ones, None, PART_LN_EPS)

    g.scope = f"{scope}/cls"
    # 1. Every slot's expert on the CLS token, down projection only: one GEMM over (cap*r, d).
    hidden = g.op(
        "Relu", g.op("Gemm", g.op("Gather", xh, s.i0, axis=1), w("experts.down"), w("experts.down_bias"), transB=1)
    )
    h = g.op("Transpose", g.op("Reshape", hidden, g.i64([0, cap, r])), perm=[1, 0, 2])  # (cap, B, r)

    g.scope = f"{scope}/perceptors"
    # 2. Perceptor entropies, negated (TopK largest); task 0 has its own (wider) perceptor, unused
    # slots never win (-inf), forced ones always do (+inf).
    ent0 = _perceptor_neg_entropy(
        g,
        g.op("Gather", h, s.i0, axis=0),
        p + "perceptor0.proj",
        p + "perceptor0.shift",
        p + "perceptor0.bias",
        dims.first_classes,
        r,
    )
    ents = _perceptor_neg_entropy(
        g, h, p + "perceptors.proj", p + "perceptors.shift", p + "perceptors.bias", dims.slot_classes, r
    )
    ent = g.op("Where", s.is_first, g.op("Unsqueeze", ent0, g.i64([0])), ents)
    ent = g.op("Transpose", g.op("Where", s.slot_active, ent, s.neg_inf), perm=[1, 0])  # (B, cap)
    if s.forced is not None:
        ent = g.op("Where", s.forced, s.inf, ent)

    g.scope = f"{scope}/select_routers"
    # 3. M routers of lowest entropy; picks beyond the active tasks (T < M) point at slot 0, weight 0.
    _, sel = g.op("TopK", ent, g.i64([m]), axis=-1, largest=1, outputs=2)
    router_ok = g.op("Less", sel, s.active_tasks)
    sel0 = g.op("Where", router_ok, sel, s.i0)
    flat_h = g.op("Reshape", h, g.i64([-1, r]))
    h_sel = g.op("Gather", flat_h, g.op("Add", g.op("Mul", sel0, s.scalar_batch), s.batch_col))  # (B, M, r)

    g.scope = f"{scope}/router_logits"
    # 4. Logits of the selected routers: rows base(t) + min(e, t) of the packed table; e > t masked.
    sel_u = g.op("Unsqueeze", sel0, g.i64([-1]))  # (B, M, 1)
    rows = g.op("Add", g.op("Gather", s.router_base, sel_u), g.op("Min", s.iota, sel_u))  # (B, M, cap)
    logits = g.op("MatMul", g.op("Gather", w("routers.weight"), rows), g.op("Unsqueeze", h_sel, g.i64([-1])))
    logits = g.op("Add", g.op("Squeeze", logits, g.i64([-1])), g.op("Gather", w("routers.bias"), rows))
    logits = g.op("Where", g.op("LessOrEqual", s.iota, sel_u), logits, s.neg_inf)

    g.scope = f"{scope}/select_experts"
    # 5. K experts per router, softmax over the kept K (the reference's -100 fill is e^-100 ~ 0).
    vals, eidx = g.op("TopK", logits, g.i64([k]), axis=-1, outputs=2)
    kept = g.op("And", g.op("LessOrEqual", eidx, sel_u), g.op("Unsqueeze", router_ok, g.i64([-1])))
    weights = g.op("Reshape", g.op("Where", kept, g.op("Softmax", vals, axis=-1), s.zero), g.i64([0, 1, m * k]))
    idx = g.op("Reshape", g.op("Where", kept, eidx, s.i0), g.i64([0, m * k]))

    g.scope = f"{scope}/experts"
    # 6. The M*K selected experts over all tokens as two batched matmuls over gathered weights,
    # the routing weights applied to their hidden units; the shared expert (constant weights)
    # as a GEMM whose up projection network() accumulates into the selected experts' output.
    rows = g.op("Reshape", g.op("Gather", s.slot_rows, idx), g.i64([0, m * k * r]))  # (B, M*K*r) of experts.down
    down = g.op("Transpose", g.op("Gather", w("experts.down"), rows), perm=[0, 2, 1])  # (B, d, M*K*r)
    down_b = g.op("Unsqueeze", g.op("Gather", w("experts.down_bias"), rows), g.i64([1]))  # (B, 1, M*K*r)
    hsel = g.op("Relu", g.op("Add", g.op("MatMul", xh, down), down_b))
    hsel = g.op("Mul", hsel, g.op("MatMul", weights, s.spread_r))  # routing weights (>= 0) per hidden unit
    up = g.op("Reshape", g.op("Gather", w("experts.up"), idx), g.i64([0, m * k * r, d]))
    selected = g.op("MatMul", hsel, up)
    up_b = g.op("Reshape", g.op("Gather", w("experts.up_bias"), idx), g.i64([0, m * k, d]))
    # (B, 1, d): fc2's bias and the shared expert's up bias are constants, folded into one at load.
    fixed = g.op("Add", g.weight(f"vit.blocks.{i}.mlp.fc2_bias"), w("shared.up_bias"))
    bias = g.op("Add", g.op("MatMul", weights, up_b), fixed)
    sh_down = g.op("Reshape", w("shared.down"), g.i64([rs, d]))
    sh_down_b = g.op("Reshape", w("shared.down_bias"), g.i64([rs]))
    shared_hidden = g.op("Relu", g.op("Gemm", g.op("Reshape", xh, g.i64([-1, d])), sh_down, sh_down_b, transB=1))
    shared_up = g.op("Reshape", w("shared.up"), g.i64([rs, d]))

    g.scope = f"{scope}/outputs"
    tasks = g.op("Where", router_ok, sel, s.im1)
    experts = g.op("Where", kept, eidx, s.im1)
    return MoEOut(selected, bias, shared_hidden, shared_up, tasks, experts)


def build_model(
    dims: Dims, specs: dict[str, TensorSpec], opset: int = MIN_OPSET, batch: int | None = None, moe: bool = True
) -> onnx.ModelProto:
    """The CaRE graph (``moe=False``: the plain backbone, output ``features``).

    ``batch``: a fixed batch size, or None for a dynamic one.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET} (LayerNormalization)")
    g = Builder(specs)
    s = _Shared(g, dims, moe)
    feat, tasks, experts = network(g, dims, s, INPUT, opset, moe)
    bdim = batch if batch is not None else "batch"
    image = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [bdim, dims.in_chans, dims.img_size, dims.img_size])
    if moe:
        cosine_logits(g, dims, feat, s, LOGITS)
        m, k = routing_widths(dims)
        for name, routing, shape in zip((ROUTING_TASKS, ROUTING_EXPERTS), (tasks, experts), routing_shapes(dims)):
            g.nodes.append(helper.make_node("Reshape", [routing, g.i64(shape)], [name], name=f"head/{name}"))
        outputs = [
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [bdim, dims.class_capacity]),
            helper.make_tensor_value_info(ROUTING_TASKS, TensorProto.INT64, [bdim, dims.depth, m]),
            helper.make_tensor_value_info(ROUTING_EXPERTS, TensorProto.INT64, [bdim, dims.depth, m, k]),
        ]
    else:
        g.nodes.append(helper.make_node("Identity", [feat], [FEATURES], name="head/features"))
        outputs = [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [bdim, dims.embed_dim])]
    return finish(g, "care" if moe else "backbone", [image], outputs, opset)


def routing_shapes(dims: Dims) -> tuple[list[int], list[int]]:
    """The shapes of the routing outputs, ``(B, depth, M)`` and ``(B, depth, M, K)``, for the
    ``(B, depth * M)`` and ``(B, depth * M, K)`` that :func:`network` returns."""
    m, k = routing_widths(dims)
    return [-1, dims.depth, m], [-1, dims.depth, m, k]


def finish(g: Builder, name: str, inputs, outputs, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph, opset_imports=opsets, producer_name="care-export", ir_version=helper.find_min_ir_version_for(opsets)
    )


def network(g: Builder, dims: Dims, s: _Shared, image: str, opset: int, moe: bool = True):
    """``(features (B, d), routing tasks (B, depth * M), routing experts (B, depth * M, K))`` of
    ``image`` (see :func:`routing_shapes`)."""
    d = dims.embed_dim
    x = embed(g, dims, s, image)
    tasks, experts = [], []
    for i in range(dims.depth):
        g.scope = f"block{i}"
        xa = attention(g, dims, i, x)
        if not moe:
            x = g.op("Add", xa, mlp(g, dims, i, xa, opset))
            continue
        g.scope = f"block{i}/moe"
        e = _brmoe(g, dims, i, xa, s)
        g.scope = f"block{i}/moe/experts"
        # The shared expert's up projection accumulates into the selected experts' output (Gemm's
        # C input), the residual stream takes their sum: as many full-size passes as before
        # the fusion, and no copy of the residual stream to and from 2-D.
        moe = g.op("Gemm", e.shared_hidden, e.shared_up, g.op("Reshape", e.selected, g.i64([-1, d])))
        moe = g.op("Reshape", moe, g.i64([-1, dims.num_tokens, d]))
        g.scope = f"block{i}"
        x = g.op("Add", g.op("Add", xa, mlp(g, dims, i, xa, opset, e.bias)), moe)
        tasks.append(e.tasks)
        experts.append(e.experts)

    g.scope = "head"
    if moe:  # one Concat per output rather than an Unsqueeze per block and output
        tasks, experts = g.op("Concat", *tasks, axis=1), g.op("Concat", *experts, axis=1)
    return features(g, x), tasks, experts


def embed(g: Builder, dims: Dims, s: _Shared, image: str) -> str:
    """The token sequence (B, N, d) of ``image``: patch embedding, CLS token, position embedding."""
    d, p = dims.embed_dim, dims.patch_size
    g.scope = "embed"
    x = g.op(
        "Conv",
        image,
        g.weight("vit.patch_embed.weight"),
        g.weight("vit.patch_embed.bias"),
        kernel_shape=[p, p],
        strides=[p, p],
    )
    x = g.op("Transpose", g.op("Reshape", x, g.i64([0, d, -1])), perm=[0, 2, 1])
    cls = g.op("Expand", g.weight("vit.cls_token"), s.cls_shape)
    return g.op("Add", g.op("Concat", cls, x, axis=1), g.weight("vit.pos_embed"))


def features(g: Builder, x: str) -> str:
    """(B, d) features: the final LayerNorm of the CLS token."""
    g.scope = "head"
    cls = g.op("Gather", x, g.i64(0), axis=1)
    return g.layer_norm(cls, g.weight("vit.norm.weight"), g.weight("vit.norm.bias"), BACKBONE_LN_EPS)


def cosine_logits(g: Builder, dims: Dims, feat: str, s: _Shared, out: str | None = None) -> str:
    """(B, class capacity) cosine logits, -inf on classes not learned yet (named ``out`` if given)."""
    # ||f|| as Sqrt(ReduceSum(f*f)): ReduceSum takes axes as an input at every opset >= 13.
    sq = g.op("ReduceSum", g.op("Mul", feat, feat), g.i64([-1]), keepdims=1)
    norm = g.op("Max", g.op("Sqrt", sq), g.const(NORM_EPS))
    logits = g.op("MatMul", g.op("Div", feat, norm), g.weight("head.weight"))
    active = g.op("Less", g.i64(np.arange(dims.class_capacity)), g.weight("active_classes"))
    if out is None:
        return g.op("Where", active, logits, s.neg_inf)
    g.nodes.append(helper.make_node("Where", [active, logits, s.neg_inf], [out], name="head/logits"))
    return out
