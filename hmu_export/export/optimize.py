"""The fast CPU path: an ONNX Runtime-optimized copy of the graph, saved once at build time.

Three steps, each checked by parity against the unoptimized graph:

1. **Attention fusion** (ours). The dynamo exporter writes ``nn.MultiheadAttention`` with
   ``batch_first=True`` as ~50 nodes (transposes to sequence-first, head reshapes, two batched
   MatMuls, a float mask built from ``src_mask``). ONNX Runtime's transformer optimizer does not
   recognise that pattern, so each module's region (found by its stable node-name scope, e.g.
   ``encoder/layers/0/self_attn/``) is replaced by ONNX Runtime's contrib ops: ``Attention``
   (packed QKV projection inside the op) for self-attention, ``MultiHeadAttention`` for
   cross-attention, with the key-padding mask taken straight from the ``src_mask`` input and the
   decoder's causal mask as ``unidirectional=1``. Weights come from the PyTorch model, not from
   the graph, so the fusion never depends on how the exporter happened to fold them.
2. **ONNX Runtime graph optimizations** at the *extended* level (LayerNorm / SkipLayerNorm /
   Gelu / BiasGelu / MatMul+Add fusions, constant folding), saved through
   ``SessionOptions.optimized_model_filepath``. The *all* level is not saved: its NCHWc layout
   transforms are tied to the CPU that built them (ORT warns about it); it is applied at load.
3. **Parity** of the optimized graph against model.onnx on padded feeds at the profile's corners
   (max abs on logits <= the FP32 budget).

A module whose region does not match what the fusion expects is left as it was (counted in the
stage details), so an unusual model still gets step 2.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..core.errors import ArtifactError, ParityFailure
from ..core.fileio import atomic_path
from ..core.io_contract import SRC_MASK
from ..runners.onnxruntime_runner import forward_session_options, tuned_session_options

if TYPE_CHECKING:
    import onnx

    from ..core.config import BuildConfig
    from ..core.io_contract import GraphContract
    from ..model import HMUTransformer

MS_DOMAIN = "com.microsoft"
#: prefix of the nodes and weights this module writes
FUSED_PREFIX = "hmu_opt/"
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization",
             "BiasGelu", "Gelu", "FastGelu", "FusedMatMul", "FusedGemm", "BiasAdd")


# --------------------------------------------------------------------------- attention fusion
def _mha_modules(model: "HMUTransformer") -> list[tuple[str, Any, str]]:
    """(module path, module, mask kind) of every attention module, kind: 'padding' | 'causal'.

    HMUTransformer's masks: encoder self-attention and decoder cross-attention mask padded
    source tokens (src_mask); decoder self-attention is causal with no padding mask.
    """
    from torch import nn

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            causal = name.startswith("decoder.") and name.endswith(".self_attn")
            out.append((name, mod, "causal" if causal else "padding"))
    return out


def _region(graph: "onnx.GraphProto", scope: str) -> list[int]:
    return [i for i, n in enumerate(graph.node) if n.name.startswith(scope + "/")]


def _is_transpose_102(node: "onnx.NodeProto") -> bool:
    return node.op_type == "Transpose" and any(
        a.name == "perm" and list(a.ints) == [1, 0, 2] for a in node.attribute)


def _fuse_one(graph: "onnx.GraphProto", path: str, mha: Any, kind: str, mask_i32: str,
              consumers: dict[str, list[int]], all_scoped: set[int]
              ) -> tuple[list["onnx.NodeProto"], list[Any], set[int]] | str:
    """New nodes + initializers replacing one module's region, or a reason it was left alone."""
    from onnx import helper, numpy_helper

    scope = path.replace(".", "/")
    idx = _region(graph, scope)
    if not idx:
        return "no nodes under this scope"
    nodes = [graph.node[i] for i in idx]
    produced = {o for n in nodes for o in n.output}
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    # Batch-first inputs: what the module's (batch-first -> sequence-first) transposes read.
    # The exporter may share one transpose of the decoder memory between layers (CSE), so a
    # transpose outside this region that feeds it counts too. First one = query.
    entry: list[str] = []
    for n in nodes:
        if _is_transpose_102(n) and n.input[0] not in produced and n.input[0] not in inits:
            src = n.input[0]
        else:
            outer = [producer[i] for i in n.input if i and i not in produced and i in producer]
            src = next((p.input[0] for p in outer if _is_transpose_102(p)), "")
        if src and src not in entry:
            entry.append(src)
    graph_outputs = {o.name for o in graph.output}
    leaving = [o for o in produced if o in graph_outputs
               or any(c not in all_scoped for c in consumers.get(o, []))]
    if len(leaving) != 1:
        return f"expected one tensor leaving the region, found {len(leaving)}"
    cross = path.startswith("decoder.") and path.endswith(".multihead_attn")
    self_attn = not cross
    if len(entry) != (2 if cross else 1):
        return f"expected {2 if cross else 1} batch-first input(s), found {len(entry)}"
    if mha.in_proj_weight is None or mha.in_proj_bias is None or not mha.batch_first:
        return "module without packed in-projection weights and bias"
    d, heads = mha.embed_dim, mha.num_heads
    w_in = mha.in_proj_weight.detach().float().numpy()  # [3d, d]
    b_in = mha.in_proj_bias.detach().float().numpy()
    w_out = mha.out_proj.weight.detach().float().numpy()  # [d, d]
    b_out = mha.out_proj.bias.detach().float().numpy()
    pre = f"hmu_opt/{scope}"
    new_inits = [numpy_helper.from_array(b_in, f"{pre}/in_bias"),
                 numpy_helper.from_array(np.ascontiguousarray(w_out.T), f"{pre}/out_w"),
                 numpy_helper.from_array(b_out, f"{pre}/out_b")]
    attn_out = f"{pre}/attn_out"
    new_nodes = []
    mask = mask_i32 if kind == "padding" else ""
    if self_attn:
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w_in.T), f"{pre}/qkv_w"))
        new_nodes.append(helper.make_node(
            "Attention", [entry[0], f"{pre}/qkv_w", f"{pre}/in_bias", mask], [attn_out],
            name=f"{pre}/Attention", domain=MS_DOMAIN, num_heads=heads,
            unidirectional=1 if kind == "causal" else 0))
    else:
        query, memory = entry
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(w_in[:d].T), f"{pre}/q_w"),
                      numpy_helper.from_array(np.ascontiguousarray(w_in[d:].T), f"{pre}/kv_w"),
                      numpy_helper.from_array(np.array([d, d], np.int64), f"{pre}/split")]
        new_nodes += [
            helper.make_node("MatMul", [query, f"{pre}/q_w"], [f"{pre}/q"], name=f"{pre}/MatMul_q"),
            helper.make_node("MatMul", [memory, f"{pre}/kv_w"], [f"{pre}/kv"],
                             name=f"{pre}/MatMul_kv"),
            helper.make_node("Split", [f"{pre}/kv", f"{pre}/split"], [f"{pre}/k", f"{pre}/v"],
                             name=f"{pre}/Split", axis=-1),
            helper.make_node("MultiHeadAttention",
                             [f"{pre}/q", f"{pre}/k", f"{pre}/v", f"{pre}/in_bias", mask],
                             [attn_out], name=f"{pre}/MultiHeadAttention", domain=MS_DOMAIN,
                             num_heads=heads)]
    new_nodes += [
        helper.make_node("MatMul", [attn_out, f"{pre}/out_w"], [f"{pre}/proj"],
                         name=f"{pre}/MatMul_out"),
        helper.make_node("Add", [f"{pre}/proj", f"{pre}/out_b"], [leaving[0]], name=f"{pre}/Add_out")]
    return new_nodes, new_inits, set(idx)


def _prune(graph: "onnx.GraphProto") -> None:
    """Drop nodes and initializers nothing reaches from the graph outputs (dead after fusion)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    live = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(live)


def fuse_attention(proto: "onnx.ModelProto", model: "HMUTransformer") -> dict[str, str]:
    """Replace every attention module's region in place; returns {module path: 'fused' | reason}."""
    from onnx import TensorProto, helper

    graph = proto.graph
    if SRC_MASK not in {i.name for i in graph.input}:
        return {"*": f"graph has no '{SRC_MASK}' input"}
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(graph.node):
        for i in n.input:
            consumers.setdefault(i, []).append(k)
    modules = _mha_modules(model)
    all_scoped = {k for path, _, _ in modules for k in _region(graph, path.replace(".", "/"))}
    mask_i32 = "hmu_opt/src_mask_i32"
    outcome: dict[str, str] = {}
    plans: list[tuple[set[int], list[Any], list[Any]]] = []
    for path, mha, kind in modules:
        res = _fuse_one(graph, path, mha, kind, mask_i32, consumers, all_scoped)
        if isinstance(res, str):
            outcome[path] = res
            continue
        new_nodes, new_inits, idx = res
        plans.append((idx, new_nodes, new_inits))
        outcome[path] = "fused"
    if not plans or len(plans) != len(modules):
        # All or nothing: a region left alone may read tensors a fused region no longer makes.
        return {k: (v if v != "fused" else "not fused: another module did not match")
                for k, v in outcome.items()}
    for _, _, new_inits in plans:
        graph.initializer.extend(new_inits)
    if not plans:
        return outcome
    # Emit each module's new nodes where its region's last node stood: every input of the region
    # exists by then, and every consumer of its output comes later.
    emit_at = {max(idx): nodes for idx, nodes, _ in plans}
    drop = set().union(*(idx for idx, _, _ in plans))
    rebuilt = [helper.make_node("Cast", [SRC_MASK], [mask_i32], name="hmu_opt/Cast_src_mask",
                                to=TensorProto.INT32)]
    for i, node in enumerate(graph.node):
        if i in emit_at:
            rebuilt.extend(emit_at[i])
        elif i not in drop:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)
    _prune(graph)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return outcome


# --------------------------------------------------------------------------- elementwise rewrites
# Patterns the dynamo exporter writes and ONNX Runtime's CPU optimizer leaves as separate
# passes over the activations (found with bench --profile, docs/performance.md). Each rewrite
# computes the same function (the optimize stage's parity check holds it to the FP32 budget);
# they match by structure and constants, not by module names, and in this model they are all
# in the HMU (its GELU, VAE and gate) and the embeddings.
class _Graph:
    """Producer / consumer / constant lookups over one graph, and the edits of one pass."""

    def __init__(self, graph: "onnx.GraphProto") -> None:
        from onnx import numpy_helper

        self.graph = graph
        seen: set[str] = set()
        for i, n in enumerate(graph.node):  # edits are keyed by node name: make names unique
            if not n.name or n.name in seen:
                n.name = f"{FUSED_PREFIX}node_{i}"
            seen.add(n.name)
        self.arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.drop: set[str] = set()  # names of nodes to remove
        self.emit: dict[str, list[Any]] = {}  # node name -> new nodes emitted in its place
        self.new_inits: list[Any] = []

    def scalar(self, name: str) -> float | None:
        """The value of a one-element float constant (initializer), else None."""
        a = self.arrays.get(name)
        if a is None or a.size != 1 or a.dtype.kind != "f":
            return None
        return float(a.reshape(()))

    def single_use(self, name: str, op: str) -> Any:
        """The one consumer of ``name`` when it is an ``op`` node (and ``name`` is no graph
        output), else None."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs or users[0].op_type != op:
            return None
        return users[0]

    def own(self, name: str, node: Any) -> bool:
        """``name`` is a constant that only ``node`` reads (folding into it copies nothing)."""
        return name in self.arrays and [n.name for n in self.consumers.get(name, [])] == [node.name]

    def made_by(self, name: str, op: str) -> Any:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def free(self, *nodes: Any) -> bool:
        """None of ``nodes`` is touched by an earlier match of this pass."""
        return all(n.name not in self.drop and n.name not in self.emit for n in nodes)

    def add_init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.arrays[name] = array
        return name

    def apply(self) -> None:
        """Rebuild the node list: new nodes where the node they replace stood."""
        rebuilt = []
        for node in self.graph.node:
            if node.name in self.emit:
                rebuilt.extend(self.emit[node.name])
            elif node.name not in self.drop:
                rebuilt.append(node)
        del self.graph.node[:]
        self.graph.node.extend(rebuilt)
        self.graph.initializer.extend(self.new_inits)


def _scope(node: Any) -> str:
    return node.name.rsplit("/", 1)[0] if "/" in node.name else node.name


def _erf_gelu(g: _Graph) -> int:
    """x * 0.5 * (1 + erf(x / sqrt 2)) (any order of the two Muls) -> com.microsoft Gelu, which
    ORT then fuses with the bias Add before it into BiasGelu (exact erf GELU)."""
    from onnx import helper

    count = 0
    for erf in list(g.graph.node):
        if erf.op_type != "Erf":
            continue
        div = g.made_by(erf.input[0], "Div")
        if div is None or g.scalar(div.input[1]) is None \
                or abs(g.scalar(div.input[1]) - np.sqrt(2.0)) > 1e-6:  # type: ignore[operator]
            continue
        x = div.input[0]
        add = g.single_use(erf.output[0], "Add")
        if add is None or g.scalar([i for i in add.input if i != erf.output[0]][0]) != 1.0:
            continue
        m1 = g.single_use(add.output[0], "Mul")
        m2 = g.single_use(m1.output[0], "Mul") if m1 is not None else None
        if m1 is None or m2 is None:
            continue
        other1 = [i for i in m1.input if i != add.output[0]]
        other2 = [i for i in m2.input if i != m1.output[0]]
        if len(other1) != 1 or len(other2) != 1:
            continue
        pair = {"half" if g.scalar(i) == 0.5 else "x" if i == x else "?" for i in other1 + other2}
        if pair != {"half", "x"} or not g.free(div, erf, add, m1, m2) \
                or len(g.consumers.get(div.output[0], [])) != 1:
            continue
        g.drop.update(n.name for n in (div, erf, add, m1))
        g.emit[m2.name] = [helper.make_node("Gelu", [x], [m2.output[0]],
                                            name=f"{_scope(m2)}/Gelu", domain=MS_DOMAIN)]
        count += 1
    return count


def _fold_scale(g: _Graph) -> int:
    """A constant scalar Mul after a Linear (MatMul + bias Add) or an embedding Gather folded
    into its weights: ``exp(0.5 * (x W + b))`` reads ``x (0.5 W) + 0.5 b``; one pass less.
    Only weights nothing else reads (a tied embedding is not copied)."""
    from onnx import helper

    count = 0
    for mul in list(g.graph.node):
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        consts = [i for i in mul.input if g.scalar(i) is not None]
        if len(consts) != 1:
            continue
        c = np.float32(g.scalar(consts[0]))
        t = [i for i in mul.input if i != consts[0]][0]
        if len(g.consumers.get(t, [])) != 1 or t in g.outputs:
            continue
        add, gather = g.made_by(t, "Add"), g.made_by(t, "Gather")
        if gather is not None and g.own(gather.input[0], gather) and g.free(gather, mul):
            table = g.add_init(f"{FUSED_PREFIX}{_scope(gather)}/scaled_table",
                               g.arrays[gather.input[0]] * c)
            g.drop.add(mul.name)
            g.emit[gather.name] = [helper.make_node("Gather", [table, gather.input[1]],
                                                    [mul.output[0]], name=gather.name,
                                                    **{a.name: helper.get_attribute_value(a)
                                                       for a in gather.attribute})]
            count += 1
            continue
        if add is None:
            continue
        bias = [i for i in add.input if i in g.arrays and g.arrays[i].ndim == 1]
        mm = next((g.made_by(i, "MatMul") for i in add.input if i not in bias
                   and g.made_by(i, "MatMul") is not None), None)
        if len(bias) != 1 or mm is None or not g.own(mm.input[1], mm) \
                or not g.own(bias[0], add) \
                or len(g.consumers.get(mm.output[0], [])) != 1 or not g.free(mm, add, mul):
            continue
        pre = f"{FUSED_PREFIX}{_scope(mm)}"
        w = g.add_init(f"{pre}/scaled_w", g.arrays[mm.input[1]] * c)
        b = g.add_init(f"{pre}/scaled_b", g.arrays[bias[0]] * c)
        g.drop.add(mul.name)
        g.emit[mm.name] = [helper.make_node("MatMul", [mm.input[0], w], [mm.output[0]],
                                            name=mm.name)]
        g.emit[add.name] = [helper.make_node("Add", [mm.output[0], b], [mul.output[0]],
                                             name=add.name)]
        count += 1
    return count


def _gate_mix(g: _Graph) -> int:
    """``g * a + (1 - g) * b`` (the HMU's gated mix) -> ``b + g * (a - b)``: three passes over
    the activations instead of four."""
    from onnx import helper

    count = 0
    for add in list(g.graph.node):
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        muls = [g.made_by(i, "Mul") for i in add.input]
        if any(m is None or len(g.consumers.get(m.output[0], [])) != 1 for m in muls):
            continue
        for m_gate, m_rest in (muls, muls[::-1]):
            sub = next((g.made_by(i, "Sub") for i in m_rest.input
                        if g.made_by(i, "Sub") is not None), None)
            if sub is None or g.scalar(sub.input[0]) != 1.0 \
                    or len(g.consumers.get(sub.output[0], [])) != 1:
                continue
            gate = sub.input[1]
            b = [i for i in m_rest.input if i != sub.output[0]]
            a = [i for i in m_gate.input if i != gate]
            if gate not in m_gate.input or len(a) != 1 or len(b) != 1 \
                    or not g.free(add, sub, *muls):
                continue
            pre = _scope(add)
            diff, scaled = f"{FUSED_PREFIX}{pre}/a_minus_b", f"{FUSED_PREFIX}{pre}/g_times_diff"
            g.drop.update({sub.name, muls[0].name, muls[1].name})
            g.emit[add.name] = [
                helper.make_node("Sub", [a[0], b[0]], [diff], name=f"{pre}/Sub_mix"),
                helper.make_node("Mul", [gate, diff], [scaled], name=f"{pre}/Mul_mix"),
                helper.make_node("Add", [b[0], scaled], [add.output[0]], name=f"{pre}/Add_mix")]
            count += 1
            break
    return count


#: the rewrites, in the order they run (each one pass over the graph)
REWRITES: dict[str, Callable[[_Graph], int]] = {
    "erf_gelu": _erf_gelu, "fold_scale": _fold_scale, "gate_mix": _gate_mix}


def rewrite_elementwise(proto: "onnx.ModelProto") -> dict[str, int]:
    """Apply every rewrite of ``REWRITES`` in place; returns how often each matched."""
    done: dict[str, int] = {}
    for name, rewrite in REWRITES.items():
        g = _Graph(proto.graph)
        done[name] = rewrite(g)
        if done[name]:
            g.apply()
    if done.get("erf_gelu") and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        from onnx import helper
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _prune(proto.graph)
    return done


# --------------------------------------------------------------------------- optimize + parity
@dataclass
class OptimizeReport:
    attention: dict[str, str]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    parity_max_abs: float
    parity_shapes: list[list[int]] = field(default_factory=list)
    #: elementwise rewrites applied before ORT's own fusions: {rewrite: times}
    rewrites: dict[str, int] = field(default_factory=dict)

    @property
    def fused_ops(self) -> dict[str, int]:
        return {k: v for k, v in self.ops_after.items() if k in FUSED_OPS and v}

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention, "fused_ops": self.fused_ops,
                "nodes_before": sum(self.ops_before.values()),
                "nodes_after": sum(self.ops_after.values()),
                "parity_max_abs": self.parity_max_abs, "parity_shapes": self.parity_shapes,
                "rewrites": self.rewrites}


def op_counts(proto: "onnx.ModelProto") -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def parity_shapes(cfg: "BuildConfig") -> list[tuple[int, int, int]]:
    """Profile corners and opt point (padded rows appear wherever batch >= 2)."""
    p = cfg.profile
    shapes = {(p.batch[0], p.src_len[0], p.tgt_len[0]), (p.batch[1], p.src_len[1], p.tgt_len[1]),
              (p.batch[2], p.src_len[2], p.tgt_len[2]), (p.batch[2], p.src_len[2], p.tgt_len[0])}
    return sorted(s for s in shapes if cfg.profile.contains(*s))


def compare_graphs(ref_path: Path, opt_path: Path, cfg: "BuildConfig",
                   shapes: Sequence[tuple[int, int, int]], seed: int = 0) -> float:
    """Max abs difference of all outputs between two graphs over ``shapes`` (plain CPU ORT).

    Feeds follow the contract recorded in ``ref_path`` (any graph: full with noise over the
    source or the target, classifier); ``shapes`` are BxLsxLt, cut down to the graph's axes."""
    import onnxruntime as ort

    from ..core.graph_meta import load_graph_contract
    from ..core.grid import contract_feeds, grid_axes, project

    try:
        _, _, contract = load_graph_contract(Path(ref_path))
    except ArtifactError:  # a graph without our metadata: the config's full graph
        from ..core.io_contract import full_contract
        contract = full_contract(cfg.model, cfg.export.diagnostics)
    axes = grid_axes(contract)
    plain = ort.SessionOptions()
    plain.log_severity_level = 3
    ref = ort.InferenceSession(str(ref_path), plain, providers=["CPUExecutionProvider"])
    opt = ort.InferenceSession(str(opt_path), forward_session_options(),
                               providers=["CPUExecutionProvider"])
    positional = {s.name for s in contract.outputs if s.src_positional}
    worst = 0.0
    for shape in dict.fromkeys(project(s, axes) for s in shapes):
        sizes = dict(zip(axes, shape))
        feeds = contract_feeds(contract, cfg, sizes, seed=seed,
                               noise_scale=cfg.parity.noise_scale)
        names = [o.name for o in ref.get_outputs()]
        for name, x, y in zip(names, ref.run(names, feeds), opt.run(names, feeds)):
            if x.shape != y.shape:
                where = ", ".join(f"{a}={v}" for a, v in sizes.items())
                raise ParityFailure(f"optimized graph output '{name}' has shape {y.shape}, "
                                    f"expected {x.shape} at {where}")
            if name in positional:  # diagnostic outputs: compare real source positions only
                m = feeds[SRC_MASK].astype(bool)
                x, y = x[m], y[m]
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
    return worst


def optimize_graph(src: Path, dst: Path, cfg: "BuildConfig", model: "HMUTransformer | None",
                   *, fuse: bool = True) -> OptimizeReport:
    """Write the optimized copy of ``src`` to ``dst`` (atomically, only if parity holds)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(src))
    before = op_counts(proto)
    attention = fuse_attention(proto, model) if (fuse and model is not None) else {}
    rewrites = rewrite_elementwise(proto)
    with tempfile.TemporaryDirectory(prefix="hmu-opt-") as tmp:
        fused_path = Path(tmp) / "fused.onnx"
        onnx.save_model(proto, str(fused_path))
        opts = forward_session_options(optimization="extended")
        saved = Path(tmp) / "ort.onnx"
        opts.optimized_model_filepath = str(saved)
        try:
            ort.InferenceSession(str(fused_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ArtifactError("ONNX Runtime rejected the fused graph: "
                                f"{str(exc).splitlines()[0]}") from None
        out = onnx.load(str(saved))
        # ORT drops nothing we need, but keep the exporter's metadata (config, contract) for sure.
        have = {p.key for p in out.metadata_props}
        for p in proto.metadata_props:
            if p.key not in have:
                out.metadata_props.add(key=p.key, value=p.value)
        out.producer_name = proto.producer_name or out.producer_name
        with atomic_path(Path(dst)) as tmp_dst:
            onnx.save_model(out, str(tmp_dst))
            shapes = parity_shapes(cfg)
            err = compare_graphs(Path(src), tmp_dst, cfg, shapes, seed=cfg.parity.seed)
            if not err <= cfg.parity.fp32_max_abs:
                raise ParityFailure(f"optimized graph disagrees with model.onnx: max abs {err:.3g}"
                                    f" > {cfg.parity.fp32_max_abs:g}")
    return OptimizeReport(attention, before, op_counts(out), err, [list(s) for s in shapes],
                          rewrites)


def split_parity_sizes(contract: "GraphContract", cfg: "BuildConfig") -> list[dict[str, int]]:
    """Axis sizes at which a split graph is checked: profile corners, past 0 and new 1 included."""
    p = cfg.profile
    rows = [{"batch": p.batch[0], "src_len": p.src_len[0], "past_len": 0, "new_len": 1},
            {"batch": p.batch[1], "src_len": p.src_len[1], "past_len": p.past_len[1],
             "new_len": p.new_len[1]},
            {"batch": p.batch[2], "src_len": p.src_len[2], "past_len": p.past_len[2],
             "new_len": p.new_len[0]},
            {"batch": p.batch[2], "src_len": p.src_len[2], "past_len": 0,
             "new_len": p.new_len[2]}]
    axes = set(contract.axes)
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k in axes}
        if row not in out:
            out.append(row)
    return out


def compare_split_graphs(ref_path: Path, opt_path: Path, contract: "GraphContract",
                         cfg: "BuildConfig", seed: int = 0) -> float:
    """Max abs difference of every output of two variants of a split graph (plain CPU ORT);
    outputs over source positions are compared at real positions only."""
    import onnxruntime as ort

    from ..core.io_contract import spec_feeds

    plain = ort.SessionOptions()
    plain.log_severity_level = 3
    ref = ort.InferenceSession(str(ref_path), plain, providers=["CPUExecutionProvider"])
    opt = ort.InferenceSession(str(opt_path), tuned_session_options(),
                               providers=["CPUExecutionProvider"])
    worst = 0.0
    for sizes in split_parity_sizes(contract, cfg):
        feeds = spec_feeds(contract, cfg.model, sizes, seed=seed)
        for spec, x, y in zip(contract.outputs, ref.run(contract.output_names, feeds),
                              opt.run(contract.output_names, feeds)):
            if x.shape != y.shape:
                raise ParityFailure(f"{Path(opt_path).name}: output '{spec.name}' has shape "
                                    f"{list(y.shape)}, expected {list(x.shape)} at {sizes}")
            if spec.src_positional:
                m = feeds[SRC_MASK].astype(bool)
                keep = m[:, None, :, None] if x.ndim == 4 else m[:, :, None]
                x, y = np.where(keep, x, 0), np.where(keep, y, 0)
            if x.size:
                worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
    return worst


def optimize_split_graph(src: Path, dst: Path, contract: "GraphContract", cfg: "BuildConfig"
                         ) -> dict[str, Any]:
    """ONNX Runtime's own fusions, saved offline, for an encoder or decoder-step graph
    (written atomically, only if it matches the exported graph)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(src))
    with atomic_path(Path(dst)) as tmp_dst:
        opts = tuned_session_options(optimization="extended")
        opts.optimized_model_filepath = str(tmp_dst)
        try:
            ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime rejected {Path(src).name}: "
                                f"{str(exc).splitlines()[0]}") from None
        out = onnx.load(str(tmp_dst))
        have = {p.key for p in out.metadata_props}
        for p in proto.metadata_props:
            if p.key not in have:
                out.metadata_props.add(key=p.key, value=p.value)
        onnx.save_model(out, str(tmp_dst))
        err = compare_split_graphs(Path(src), tmp_dst, contract, cfg, seed=cfg.parity.seed)
        if not err <= cfg.parity.fp32_max_abs:
            raise ParityFailure(f"{Path(dst).name} disagrees with {Path(src).name}: max abs "
                                f"{err:.3g} > {cfg.parity.fp32_max_abs:g}")
    return {"path": Path(dst).name, "ops_before": op_counts(proto), "ops_after": op_counts(out),
            "max_abs_vs_exported": err}
