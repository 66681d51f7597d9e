"""PyTorch -> ONNX: dynamic batch / source / target lengths, noise as an input, checked graph.

Uses the dynamo exporter: the TorchScript one silently freezes the sequence lengths of
``nn.MultiheadAttention`` (see docs/facts.md). After export the graph is post-processed so that
it is stable and readable: node names come from the module path (``hmu/norm_input/LayerNormalization``),
per-node debug metadata (absolute file paths, FX dumps) is dropped so that the same checkpoint
gives the same bytes, and the build's metadata is attached.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__
from ..core.config import BuildConfig
from ..core.errors import HMUExportError
from ..core.fileio import atomic_path, sha256_file
from ..core.io_contract import (AXIS_TO_PROFILE, FULL, SRC_MASK, GraphContract, spec_feeds)
from ..model import HMUTransformer
from ..model.interface import ModelSource
from ..core.graph_meta import META_PREFIX

RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Multinomial", "Bernoulli", "Dropout"})


class ExportError(HMUExportError):
    """The exported graph failed a check (random op, checker, validation against PyTorch)."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    contract: GraphContract
    seconds: float
    validation_max_abs: float  # ORT vs PyTorch at the example shape, logits


def versions() -> dict[str, str]:
    import onnxruntime
    return {"hmu_export": __version__, "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def _example_sizes(cfg: BuildConfig) -> tuple[int, int, int]:
    # A size-1 example makes its axis static without any error: use >= 2 on every dynamic axis.
    p = cfg.profile
    return (max(2, min(p.batch[1], 4)), max(2, min(p.src_len[1], 16)),
            max(2, min(p.tgt_len[1], 8)))


def example_axis_sizes(cfg: BuildConfig) -> dict[str, int]:
    """Example size of every dynamic axis: >= 2 (a size-1 example freezes its axis silently),
    and distinct where axes must stay independent (past_len vs new_len)."""
    b, ls, lt = _example_sizes(cfg)
    return {"batch": b, "src_len": ls, "tgt_len": lt, "past_len": 3, "new_len": 2}


def _torch_export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], contract: GraphContract,
                  cfg: BuildConfig) -> onnx.ModelProto:
    from torch.export import Dim

    top = max(2, cfg.model.max_len)
    axes = {name: Dim(name, min=1) if name == "batch" else Dim(name, min=1, max=top)
            for name in AXIS_TO_PROFILE}
    # Positional (a tuple in input order): contract names such as "past_key.0" are no Python
    # argument names.
    per_input = [{i: axes[d] for i, d in enumerate(spec.dims) if isinstance(d, str)}
                 for spec in contract.inputs]
    dynamic_shapes: tuple = tuple(per_input)
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    star = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL]
    if star:  # forward(a, b, *rest): torch.export wants the rest's shapes as one nested tuple
        k = star[0]
        dynamic_shapes = tuple(per_input[:k]) + (tuple(per_input[k:]),)
    sink = io.StringIO()
    logging.getLogger("torch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=contract.input_names, output_names=contract.output_names,
                opset_version=cfg.export.opset, optimize=True, verbose=False)
        except Exception as exc:  # the exporter raises many types; this is a model/exporter bug
            raise ExportError(f"torch.onnx.export failed: {_export_failure(exc)}") from exc
    if program is None:  # pragma: no cover - dynamo export always returns a program
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def _export_failure(exc: BaseException) -> str:
    """The one informative line of an exporter failure (its 'Exception summary')."""
    for e in (exc, exc.__cause__):
        lines = [ln.strip() for ln in str(e or "").splitlines() if ln.strip()]
        for i, ln in enumerate(lines):
            if ln.startswith("## Exception summary") and i + 1 < len(lines):
                return lines[i + 1][:400]
    lines = str(exc).strip().splitlines()
    return lines[0][:400] if lines else type(exc).__name__


def _scope_of(node: onnx.NodeProto, root: str = "") -> str:
    """Module path of ``node`` relative to the submodule ``root`` (a wrapper's attribute name)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            # [..., 'hmu', 'hmu.norm_input', 'layer_norm_4']: the last one names the op itself.
            modules = [s for s in scopes[:-1] if s]
            path = modules[-1] if modules else ""
            if root and (path == root or path.startswith(root + ".")):
                path = path[len(root) + 1:]
            return path.replace(".", "/")
    return ""


def stabilize_node_names(model: onnx.ModelProto, root: str = "") -> None:
    """Name every node ``<module path>/<OpType>[_k]`` and drop per-node debug metadata.
    Paths are relative to the HMUTransformer, also when a wrapper (attribute ``root``) was
    exported, so pins and fusions find the same names in every graph variant."""
    seen: Counter[str] = Counter()
    for node in model.graph.node:
        scope = _scope_of(node, root)
        base = f"{scope}/{node.op_type}" if scope else node.op_type
        k = seen[base]
        seen[base] += 1
        node.name = base if k == 0 else f"{base}_{k}"
        del node.metadata_props[:]
    for value in list(model.graph.input) + list(model.graph.output):
        del value.metadata_props[:]
    for init in model.graph.initializer:
        del init.metadata_props[:]
    for vi in model.graph.value_info:
        del vi.metadata_props[:]
    del model.graph.metadata_props[:]


def _name_dims(model: onnx.ModelProto, contract: GraphContract) -> None:
    """Give every graph input/output the contract's dim names (the exporter may use s0, s1...)."""
    specs = {s.name: s for s in contract.inputs + contract.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        spec = specs[value.name]
        value.doc_string = spec.doc
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.dims):
            raise ExportError(f"exported '{value.name}' has rank {len(dims)}, contract says "
                              f"{len(spec.dims)}")
        for dim, want in zip(dims, spec.dims):
            if isinstance(want, str):
                if dim.HasField("dim_value"):
                    raise ExportError(f"axis '{want}' of '{value.name}' was frozen to "
                                      f"{dim.dim_value} by the exporter")
                dim.dim_param = want
            elif dim.dim_value != want:
                raise ExportError(f"'{value.name}' has a dim of {dim.dim_value}, contract says {want}")


def _check_graph(model: onnx.ModelProto, contract: GraphContract) -> onnx.ModelProto:
    random_ops = sorted({n.op_type for n in model.graph.node if n.op_type in RANDOM_OPS})
    if random_ops:
        raise ExportError(f"exported graph contains random op(s) {random_ops}; noise must be an "
                          "input")
    if [i.name for i in model.graph.input] != contract.input_names:
        raise ExportError(f"graph inputs {[i.name for i in model.graph.input]} differ from the "
                          f"contract {contract.input_names}")
    if [o.name for o in model.graph.output] != contract.output_names:
        raise ExportError(f"graph outputs {[o.name for o in model.graph.output]} differ from the "
                          f"contract {contract.output_names}")
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"ONNX checker rejected the graph: {str(exc).splitlines()[0]}") from exc


def _validate_against_torch(path: Path, module: torch.nn.Module, feeds: dict[str, np.ndarray],
                            contract: GraphContract, atol: float) -> float:
    """Run the saved graph once in ONNX Runtime and compare logits with PyTorch (Optimum-style)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(contract.output_names, feeds)
    with torch.inference_mode():
        ref = module(*(torch.from_numpy(feeds[n]) for n in contract.input_names))
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    err = 0.0
    for spec, g, r in zip(contract.outputs, got, refs):
        r = r.numpy()
        if g.shape != r.shape:
            raise ExportError(f"exported graph output '{spec.name}' has shape {list(g.shape)}, "
                              f"PyTorch gives {list(r.shape)}")
        if spec.src_positional and SRC_MASK in feeds and g.ndim >= 3:
            real = feeds[SRC_MASK].astype(bool)  # padded positions carry no meaning
            axis = 2 if g.ndim == 4 else 1
            keep = real[:, None, :, None] if axis == 2 else real[:, :, None]
            g, r = np.where(keep, g, 0), np.where(keep, r, 0)
        if g.size:
            err = max(err, float(np.max(np.abs(g - r))))
    if not err <= atol:
        raise ExportError(f"exported graph disagrees with PyTorch right after export: max abs "
                          f"error {err:.3g} > {atol:g}")
    return err


def _root_of(module: torch.nn.Module, inner: torch.nn.Module) -> str:
    """Attribute path of the source's model inside a graph module (stripped from node names)."""
    for name, mod in module.named_modules():
        if mod is inner:
            return name
    return ""


def _strip_initializer_prefix(model: onnx.ModelProto, root: str) -> None:
    """Weight names relative to the source model (``src_embed.weight``, not
    ``model.src_embed.weight``), whatever wrapper a graph was traced through."""
    if not root:
        return
    prefix = root + "."
    inputs = {i.name for i in model.graph.input}
    rename = {i.name: i.name[len(prefix):] for i in model.graph.initializer
              if i.name.startswith(prefix) and i.name[len(prefix):] not in inputs}
    if len(set(rename.values())) != len(rename):
        return  # a clash: keep the exporter's names
    taken = {i.name for i in model.graph.initializer} - set(rename)
    if taken & set(rename.values()):
        return
    for init in model.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for vi in model.graph.value_info:
        vi.name = rename.get(vi.name, vi.name)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]


def export_graph(source: ModelSource, graph: str, cfg: BuildConfig, out_path: Path, *,
                 checkpoint_sha256: str = "", diagnostics: bool = False) -> ExportResult:
    """Export one graph of ``source`` to ``out_path`` (written atomically, after all checks)."""
    import time

    t0 = time.perf_counter()
    source.eval()
    contract = source.contract(graph, diagnostics)
    module = source.module(graph, diagnostics).eval()
    sizes = example_axis_sizes(cfg)
    feeds = spec_feeds(contract, cfg.model, sizes, seed=cfg.parity.seed)
    args = tuple(torch.from_numpy(feeds[n]) for n in contract.input_names)
    proto = _torch_export(module, args, contract, cfg)
    root = _root_of(module, source.torch_module())
    stabilize_node_names(proto, root=root)
    _strip_initializer_prefix(proto, root)
    _name_dims(proto, contract)
    proto.producer_name, proto.producer_version = "hmu_export", __version__
    proto.doc_string = ("" if graph == FULL else f"{graph} graph of ") + (
        "encoder -> Hippocampus Memory Unit -> decoder; noise is an input")
    # The checkpoint is recorded by hash, not path, so the graph bytes do not depend on where it lies.
    portable = replace(cfg, model=replace(cfg.model, checkpoint="", path="", hmu_checkpoint=""))
    meta = {"config": portable.to_json(), "graph": graph,
            "contract": json.dumps(contract.to_dict(), sort_keys=True),
            "checkpoint_sha256": checkpoint_sha256,
            "versions": json.dumps(versions(), sort_keys=True)}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=META_PREFIX + key, value=value)
    checked = _check_graph(proto, contract)
    del checked.graph.value_info[:]  # keep the file lean; shapes are re-inferred by runtimes
    if any(n.op_type == "If" for n in proto.graph.node):
        raise ExportError(f"the {graph} graph contains an If node (TensorRT cannot build it)")
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        err = _validate_against_torch(tmp, module, feeds, contract, cfg.parity.fp32_max_abs)
    return ExportResult(out_path, sha256_file(out_path), contract, time.perf_counter() - t0, err)


def export_onnx(model: HMUTransformer, cfg: BuildConfig, out_path: Path, *,
                checkpoint_sha256: str = "") -> ExportResult:
    """Export the native model's full graph (the diagnostic variant when the config asks)."""
    from ..model.native import NativeSource

    return export_graph(NativeSource(cfg.model, model), FULL, cfg, out_path,
                        checkpoint_sha256=checkpoint_sha256, diagnostics=cfg.export.diagnostics)


