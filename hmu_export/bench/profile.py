"""Where the time goes inside an ONNX Runtime session: the profiler's per-node kernel times,
summed per op type and per model part (the HMU, encoder, decoder, LM head, ...).

``bench`` says how long a forward takes; this says which kernels take it. A session is made
with ``enable_profiling`` (and ``optimized_model_filepath``, so the graph ORT really runs, with
its load-time fusions, can be read back), run ``warmup + runs`` times, and every
``*_kernel_time`` event of the timed runs is attributed to

- its **op type** as ORT ran it (``SkipLayerNormalization``, ``BiasGelu``, ``Attention``, ...);
- its **part**: the first component of the node's module path (``encoder/layers/0/...`` ->
  ``encoder``; the HMU is the source's ``hmu_scope``; ``hmu_opt/<path>`` nodes of our attention
  fusion count for ``<path>``). Nodes that ORT's fusions renamed (``SkipLayerNormalization_token_9``)
  have no path: they take the part of the module whose weights they read
  (``decoder.layers.0.norm3.weight``), else of the node that makes their first input.

Shares are of the summed kernel time of the timed runs (they add up to 100%). The profiler
inflates short kernels (docs/performance.md), and a kernel waiting for a descheduled pool
thread on a busy machine is counted as running: use it for the op mix and for what is fused
where, and ``bench`` for latency. ``overhead`` is the wall time of ``run`` minus the kernels
(the executor, allocations, thread hand-offs).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: op types that are pure data movement or shape arithmetic (no arithmetic on activations)
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Concat", "Split", "Slice", "Gather", "Shape",
                        "Unsqueeze", "Squeeze", "Expand", "Cast", "Identity", "ConstantOfShape",
                        "Range", "Where"})
#: op types that do the model's matrix arithmetic (GEMMs and fused attention)
MATMUL_OPS = frozenset({"MatMul", "Gemm", "FusedGemm", "FusedMatMul", "Attention",
                        "MultiHeadAttention", "MatMulNBits", "MatMulInteger",
                        "DynamicQuantizeMatMul", "QAttention"})
#: prefix of the nodes our attention fusion writes (export/optimize.py)
FUSED_PREFIX = "hmu_opt/"
OTHER = "other"


@dataclass
class GraphProfile:
    """One graph at one shape: per-run milliseconds per op type, part and node."""

    graph: str
    shape: list[int]
    threads: int
    runs: int
    run_ms: float  # wall time of one run (mean of the timed runs' model_run events)
    kernel_ms: float  # summed kernel time of one run (mean over the timed runs)
    by_op: list[dict[str, Any]] = field(default_factory=list)
    by_part: list[dict[str, Any]] = field(default_factory=list)
    by_node: list[dict[str, Any]] = field(default_factory=list)
    #: op types per part in the graph ORT ran (after its load-time fusions)
    ops_by_part: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def overhead_ms(self) -> float:
        return max(0.0, self.run_ms - self.kernel_ms)

    def share(self, table: str, key: str) -> float:
        """Share (%) of one op type (table 'op') or part (table 'part'), 0 when absent."""
        rows = self.by_op if table == "op" else self.by_part
        return next((r["share_pct"] for r in rows if r["key"] == key), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "shape": self.shape, "threads": self.threads,
                "runs": self.runs, "run_ms": self.run_ms, "kernel_ms": self.kernel_ms,
                "overhead_ms": self.overhead_ms, "by_op": self.by_op, "by_part": self.by_part,
                "by_node": self.by_node, "ops_by_part": self.ops_by_part}


# --------------------------------------------------------------------------- attribution
def node_parts(proto: Any, hmu_scope: str = "hmu") -> dict[str, str]:
    """Part of every node of a graph (see the module docstring), by node name."""
    hmu = hmu_scope.replace(".", "/")
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    memo: dict[str, str] = {}

    def from_path(path: str) -> str:
        if path.startswith(FUSED_PREFIX):
            path = path[len(FUSED_PREFIX):]
        if path == hmu or path.startswith(hmu + "/"):
            return "hmu"
        head = path.split("/")[0] if "/" in path else ""
        return "" if head.startswith("_") else head  # exporter hooks: no module of ours

    def part(node: Any, depth: int = 0) -> str:
        if node.name in memo:
            return memo[node.name]
        found = from_path(node.name)
        if not found:  # renamed by a fusion: the module whose weights it reads
            for name in node.input:
                if name in inits and "." in name:
                    found = from_path(name.replace(".", "/"))
                    if found:
                        break
        if not found and depth < 8 and node.input and node.input[0] in producer:
            found = part(producer[node.input[0]], depth + 1)
        memo[node.name] = found or OTHER
        return memo[node.name]

    return {n.name: part(n) for n in proto.graph.node}


def _table(totals: Mapping[str, float], calls: Mapping[str, int], runs: int
           ) -> list[dict[str, Any]]:
    whole = sum(totals.values()) or 1.0
    rows = [{"key": k, "ms": v / runs / 1e3, "calls": calls[k] // runs,
             "share_pct": 100.0 * v / whole} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def summarize(events: list[dict[str, Any]], parts: Mapping[str, str], op_types: Mapping[str, str],
              warmup: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]],
                                    list[float], int]:
    """Kernel microseconds and call counts per op / part / node over the runs after ``warmup``,
    and the wall time (us) of each of those runs."""
    model_runs = sorted((e for e in events if e.get("cat") == "Session"
                         and e.get("name") == "model_run"), key=lambda e: e["ts"])
    timed = model_runs[warmup:]
    if not timed:
        raise ValueError(f"the profile holds {len(model_runs)} runs, none after {warmup} warm-up")
    start = timed[0]["ts"]
    totals: dict[str, dict[str, float]] = {"op": {}, "part": {}, "node": {}}
    calls: dict[str, dict[str, int]] = {"op": {}, "part": {}, "node": {}}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") \
                or e["ts"] < start:
            continue
        node = e["name"][:-len("_kernel_time")]
        keys = {"op": e.get("args", {}).get("op_name") or op_types.get(node, "?"),
                "part": parts.get(node, OTHER), "node": node}
        for table, key in keys.items():
            totals[table][key] = totals[table].get(key, 0.0) + float(e["dur"])
            calls[table][key] = calls[table].get(key, 0) + 1
    return totals, calls, [float(r["dur"]) for r in timed], len(timed)


# --------------------------------------------------------------------------- profiling
def profile_graph(path: Path, feeds: Mapping[str, np.ndarray], *, sess_options: Any = None,
                  runs: int = 50, warmup: int = 10, hmu_scope: str = "hmu", top: int = 25,
                  shape: list[int] | None = None) -> GraphProfile:
    """Profile ``runs`` calls of one graph (after ``warmup``) with the given session options
    (default: the tuned options bench uses for the optimized graph)."""
    import onnx
    import onnxruntime as ort

    from ..runners.onnxruntime_runner import forward_session_options

    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got {runs}, {warmup}")
    opts = sess_options or forward_session_options()
    with tempfile.TemporaryDirectory(prefix="hmu-profile-") as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        opts.optimized_model_filepath = str(Path(tmp) / "ran.onnx")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        feed = {i.name: feeds[i.name] for i in sess.get_inputs()}
        for _ in range(warmup + runs):
            sess.run(names, feed)
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
        ran = onnx.load(str(Path(tmp) / "ran.onnx"), load_external_data=False)
    parts = node_parts(ran, hmu_scope)
    op_types = {n.name: n.op_type for n in ran.graph.node}
    totals, calls, run_us, n = summarize(events, parts, op_types, warmup)
    ops_by_part: dict[str, dict[str, int]] = {}
    for node in ran.graph.node:
        counts = ops_by_part.setdefault(parts[node.name], {})
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return GraphProfile(
        graph=Path(path).name, shape=list(shape or []),
        threads=int(opts.intra_op_num_threads or 0), runs=n,
        run_ms=float(np.mean(run_us)) / 1e3,
        kernel_ms=sum(totals["op"].values()) / n / 1e3,
        by_op=_table(totals["op"], calls["op"], n),
        by_part=_table(totals["part"], calls["part"], n),
        by_node=[r | {"op": op_types.get(r["key"], "?"), "part": parts.get(r["key"], OTHER)}
                 for r in _table(totals["node"], calls["node"], n)[:top]],
        ops_by_part={k: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0])))
                     for k, v in sorted(ops_by_part.items())})


def profile_build(artifacts: Path, shapes: list[tuple[int, ...]], *, threads: int = 0,
                  runs: int = 50, warmup: int = 10, graphs: tuple[str, ...] = ("", "opt"),
                  top: int = 25) -> list[GraphProfile]:
    """Profile a build's primary graph (``""``: model.onnx with ORT's load-time optimizations
    only, i.e. unfused attention; ``"opt"``: model.opt.onnx) at each shape, with the tuned
    session options of the ``onnxruntime-opt`` backend."""
    from ..core.build_folder import open_build
    from ..core.errors import ArtifactError
    from ..core.grid import contract_feeds, grid_axes
    from ..model.checkpoint import load_build_source
    from ..runners.onnxruntime_runner import cpu_threads, forward_session_options
    from .forward import check_shapes

    build = open_build(Path(artifacts))
    axes = grid_axes(build.contract)
    check_shapes(build.cfg, shapes, axes)
    scope = getattr(load_build_source(build), "hmu_scope", "hmu")
    n_threads = threads or cpu_threads()
    out: list[GraphProfile] = []
    for shape in shapes:
        feeds = contract_feeds(build.contract, build.cfg, dict(zip(axes, shape)),
                               seed=build.cfg.parity.seed,
                               noise_scale=build.cfg.parity.noise_scale)
        for variant in graphs:
            path = build.layout.onnx_optimized if variant == "opt" else build.layout.onnx
            if not path.is_file():
                raise ArtifactError(f"{path} not found (build with export.optimize = true)")
            out.append(profile_graph(path, feeds, sess_options=forward_session_options(n_threads),
                                     runs=runs, warmup=warmup, hmu_scope=scope, top=top,
                                     shape=list(shape)))
    return out


# --------------------------------------------------------------------------- reports
def to_markdown(profiles: list[GraphProfile], top_ops: int = 12) -> str:
    """Per graph and shape: the op-type table, the part table and the op types of each part."""
    lines = ["# ONNX Runtime profile (kernel time per run; shares of the summed kernel time)", ""]
    for p in profiles:
        lines += [f"## {p.graph} at {'x'.join(map(str, p.shape))} ({p.threads} threads, "
                  f"{p.runs} runs)", "",
                  f"run {p.run_ms:.3f} ms (mean wall), kernels {p.kernel_ms:.3f} ms, "
                  f"outside kernels {p.overhead_ms:.3f} ms", "",
                  "| op type | calls/run | ms/run | share |", "|---|---|---|---|"]
        lines += [f"| {r['key']} | {r['calls']} | {r['ms']:.3f} | {r['share_pct']:.1f}% |"
                  for r in p.by_op[:top_ops]]
        rest = p.by_op[top_ops:]
        if rest:
            lines.append(f"| ({len(rest)} more) | {sum(r['calls'] for r in rest)} | "
                         f"{sum(r['ms'] for r in rest):.3f} | "
                         f"{sum(r['share_pct'] for r in rest):.1f}% |")
        lines += ["", "| part | calls/run | ms/run | share | op types ORT ran |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['key']} | {r['calls']} | {r['ms']:.3f} | {r['share_pct']:.1f}% | "
                  + ", ".join(f"{k} {v}" for k, v in p.ops_by_part.get(r["key"], {}).items())
                  + " |" for r in p.by_part]
        lines.append("")
    return "\n".join(lines)


def write_profiles(profiles: list[GraphProfile], out_dir: Path) -> dict[str, Path]:
    """profile.json (every field) and profile.md (the tables) in ``out_dir``."""
    from ..core.fileio import write_json, write_text

    out_dir = Path(out_dir)
    paths = {"json": out_dir / "profile.json", "markdown": out_dir / "profile.md"}
    write_json(paths["json"], {"profiles": [p.to_dict() for p in profiles]})
    write_text(paths["markdown"], to_markdown(profiles))
    return paths
