"""Weights a quantizer can see: ``MatMul(x, Transpose(W))`` with a constant ``W`` becomes
``MatMul(x, W^T)`` with ``W^T`` stored.

A tied LM head (T5, BART, Marian: the output projection reuses the embedding matrix) exports as
a Transpose of the shared initializer feeding the MatMul. ONNX Runtime's quantizers only
quantize a MatMul whose weight is an initializer, so without this the largest matrix of a
decoder step (t5-small: 32128 x 512, 66 MB of the 154 MB read per token) would stay FP32 in
every int8 / int4 graph, whatever ``[int8] keep_lm_head`` says. The embedding's Gather keeps
the original matrix (a Gather reads only the rows it needs)."""
from __future__ import annotations

from typing import Callable

import onnx
from onnx import numpy_helper


def fold_weight_transposes(model: onnx.ModelProto,
                           wanted: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Rewrites ``model`` in place for the MatMul nodes ``wanted`` names (a node kept FP32
    would only gain a second FP32 copy of its weight); returns the nodes folded."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            users[x] = users.get(x, 0) + 1
    for o in graph.output:
        users[o.name] = users.get(o.name, 0) + 1
    folded, dead = [], []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or not wanted(node.name):
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = inits[t.input[0]]
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if len(w.dims) != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{w.name}.T"
        if name not in inits:
            arr = numpy_helper.to_array(w).T.copy()
            graph.initializer.append(numpy_helper.from_array(arr, name))
            inits[name] = graph.initializer[-1]
        node.input[1] = name
        users[t.output[0]] -= 1
        if users[t.output[0]] == 0:
            dead.append(t)
        folded.append(node.name)
    for t in dead:
        graph.node.remove(t)
    return folded
