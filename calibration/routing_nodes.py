"""The routing path of an artifact's graph, found by graph analysis (no name lists).

Routing is everything that decides *which* tasks and experts run: the CLS-only expert pass,
perceptor logits, softmax and entropy, router logits, both TopKs, and the index and weight
arithmetic that follows them. Two passes over the graph find it:

1. backward fixed point from the TopK nodes: a node is routing when it is a TopK, or when it has
   consumers and every one of them is a routing node (or a routing graph output). Nodes that also
   feed the token path (the block's LayerNorm, the backbone) never qualify;
2. forward closure: a node whose inputs are all outputs of routing nodes or constants
   (initializers), with at least one routing input, is routing too (index arithmetic after a
   TopK, the routing weights, the routing outputs); a Gather from an initializer is not: it
   reads the selected experts' weights for the token path.

The result is a set of node names; reduced-precision rewrites keep these nodes in float32.
"""

from __future__ import annotations

import onnx

from runtime.layout import ROUTING_EXPERTS, ROUTING_TASKS

from .graph import consumers, producers

ROUTING_OUTPUTS = (ROUTING_TASKS, ROUTING_EXPERTS)


def routing_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the routing nodes of ``model`` (every node must have a unique name)."""
    graph = model.graph
    nodes = list(graph.node)
    names = [n.name for n in nodes]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError("routing analysis needs unique, non-empty node names")
    readers = {t: [c.name for c, _ in cs] for t, cs in consumers(graph).items()}
    producer = {t: n.name for t, n in producers(graph).items()}
    by_name = {n.name: n for n in nodes}
    outputs = {o.name for o in graph.output}
    constants = {t.name for t in graph.initializer}

    routing = {n.name for n in nodes if n.op_type == "TopK"}
    if not routing:
        return routing

    def all_consumers_routing(n: onnx.NodeProto) -> bool:
        seen = False
        for o in n.output:
            if o in outputs and o not in ROUTING_OUTPUTS:
                return False
            for c in readers.get(o, ()):
                if c not in routing:
                    return False
                seen = True
        return seen

    def fed_by_routing(n: onnx.NodeProto) -> bool:
        inputs = [i for i in n.input if i]
        if not inputs or (n.op_type.startswith("Gather") and inputs[0] in constants):
            return False
        some = False
        for i in inputs:
            if i in constants:
                continue
            p = producer.get(i)
            if p is None or p not in routing:
                return False
            some = True
        return some

    changed = True
    while changed:  # both rules together until nothing changes
        changed = False
        for n in reversed(nodes):
            if n.name not in routing and all_consumers_routing(n):
                routing.add(n.name)
                changed = True
        for n in nodes:
            if n.name not in routing and fed_by_routing(n):
                routing.add(n.name)
                changed = True
    assert routing <= set(by_name)
    return routing
