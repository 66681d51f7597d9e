"""TensorRT FP16 engine: optimization profiles, FP32 pins, timing cache, and a trtexec recipe.

Every build writes ``build_engine.sh``: the equivalent ``trtexec`` call, so the engine can be
built on the target GPU box with no Python (engines are tied to the GPU and TensorRT version
that build them). Where TensorRT and a GPU exist, the stage also builds the engine itself
through Polygraphy's loaders; elsewhere it is skipped with the reason, and ``--require-engine``
turns that into a failure (pipeline.py).

Both paths write ``engine.json`` beside the engine (TensorRT version, GPU, compute capability,
flags, profiles, pins, ONNX sha256); runners/tensorrt_runner.py refuses an engine whose record
does not match. The same record goes to manifest.json under ``engine``.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import __version__
from ..core.config import BuildConfig, ProfileConfig
from ..core.fileio import atomic_path, sha256_file
from ..core.io_contract import AXIS_TO_PROFILE, GraphContract
from ..runners.tensorrt_runner import RECORD_FILE

if TYPE_CHECKING:
    import tensorrt as trt

    from ..core.layout import BuildLayout
    from ..core.pins import Pin

Shape = tuple[int, ...]
# trtexec spells hardware compatibility differently from the config.
TRTEXEC_HW = {"ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}


def engine_profiles(cfg: BuildConfig) -> list[ProfileConfig]:
    """The optimization profiles: ``[profile]`` first, then ``engine.extra_profiles``."""
    return [cfg.profile, *cfg.engine.extra_profiles]


def input_shapes(contract: GraphContract, profile: ProfileConfig
                 ) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min / opt / max shape of every dynamic input of ``contract`` under ``profile``."""
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in contract.inputs:
        if not any(isinstance(d, str) for d in spec.dims):
            continue
        rows: list[list[int]] = [[], [], []]
        for dim in spec.dims:
            triple = ([dim] * 3 if isinstance(dim, int)
                      else profile.axis(AXIS_TO_PROFILE[dim]).as_list())
            for row, value in zip(rows, triple):
                row.append(value)
        out[spec.name] = (tuple(rows[0]), tuple(rows[1]), tuple(rows[2]))
    return out


def graph_profiles(cfg: BuildConfig, graph: str) -> list[ProfileConfig]:
    """Optimization profiles of one graph. The decoder step gets a first-step profile (past 0,
    an empty cache tensor) and a step profile (past >= 1) for every configured profile, so the
    step kernels are tuned for a real cache and the first call never needs an If. The per-row
    state inputs follow the same axes (``positions`` [batch, new_len], ``past_mask``
    [batch, past_len]): in-flight batching runs a joining row's first step in the step profile
    (its past is the running batch's, padded, past_mask 0)."""
    from dataclasses import replace

    base = engine_profiles(cfg)
    if graph != "decoder":
        return base
    out: list[ProfileConfig] = []
    for p in base:
        lo, opt, hi = p.past_len  # type: ignore[misc]
        if lo == 0:
            out.append(replace(p, past_len=(0, 0, 0)))
        if hi >= 1:
            out.append(replace(p, past_len=(max(1, lo), max(1, opt), hi)))
    return out


def profile_rows(contract: GraphContract, profiles: Sequence[ProfileConfig]
                 ) -> list[dict[str, list[int]]]:
    """Profiles restricted to the axes ``contract`` uses (what the engine record stores)."""
    axes = [AXIS_TO_PROFILE[a] for a in contract.axes if a in AXIS_TO_PROFILE]
    return [{a: list(getattr(p, a)) for a in axes} for p in profiles]


def split_engine_name(graph: str) -> str:
    return f"{graph}.fp16.plan"


def render_split_recipe(cfg: BuildConfig, layout: "BuildLayout",
                        graphs: Sequence[tuple[str, GraphContract, Sequence[str]]]) -> str:
    """The generation engines' part of build_engine.sh (appended after the full graph's)."""
    import json

    blocks = []
    for graph, contract, pins in graphs:
        args = " \\\n  ".join(shlex.quote(a) for a in trtexec_args(cfg, contract, pins, layout,
                                                                     graph))
        rec = json.dumps({"graph": graph, "onnx": layout.graph(graph).name,
                          "engine": split_engine_name(graph), "pins": list(pins),
                          "profiles": profile_rows(contract, graph_profiles(cfg, graph)),
                          "flags": flags(cfg, pins)}, sort_keys=True)
        blocks.append(f"""
# {graph} graph ({'FP32 pins: ' + ', '.join(pins) if pins else 'no FP32 pins'})
"$TRTEXEC" \\
  {args} \\
  2>&1 | tee build_engine.{graph}.log
onnx_sha=$(sha256sum {shlex.quote(layout.graph(graph).name)} | cut -d ' ' -f 1)
engine_sha=$(sha256sum {shlex.quote(split_engine_name(graph))} | cut -d ' ' -f 1)
static={shlex.quote(rec[1:-1])}
printf '{{"tensorrt": "%s", "gpu": {{"name": "%s", "compute_capability": "%s"}}, "onnx_sha256": "%s", "engine_sha256": "%s", %s}}\\n' \\
  "$trt_version" "$gpu_name" "$compute_cap" "$onnx_sha" "$engine_sha" "$static" > {graph}.engine.json.tmp
mv {graph}.engine.json.tmp {graph}.engine.json
echo "engine: $(pwd)/{split_engine_name(graph)}"
""")
    return "\n# Generation engines: encoder once per request, decoder step with its KV cache.\n" \
        + "".join(blocks)


def shape_spec(shapes: dict[str, tuple[Shape, Shape, Shape]], which: int) -> str:
    """trtexec's ``name:AxBxC,name2:...`` for min (0), opt (1) or max (2)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in triple[which])}"
                    for name, triple in shapes.items())


def flags(cfg: BuildConfig, pins: Sequence[str]) -> dict[str, Any]:
    e = cfg.engine
    return {"fp16": e.fp16, "precision_constraints": "obey" if pins else "none",
            "builder_optimization_level": e.builder_optimization_level,
            "workspace_mib": e.workspace_mib, "version_compatible": e.version_compatible,
            "hardware_compatibility": e.hardware_compatibility}


def trtexec_args(cfg: BuildConfig, contract: GraphContract, pins: Sequence[str],
                 layout: "BuildLayout", graph: str = "full") -> list[str]:
    """The trtexec arguments equivalent to the Python build of one graph (paths relative to
    the build folder): model.onnx -> model.fp16.plan, <graph>.onnx -> <graph>.fp16.plan."""
    e = cfg.engine
    full = graph == "full"
    args = [f"--onnx={(layout.onnx if full else layout.graph(graph)).name}"]
    if e.fp16:
        args.append("--fp16")
    profiles = graph_profiles(cfg, graph)
    for i, profile in enumerate(profiles):
        shapes = input_shapes(contract, profile)
        if len(profiles) > 1:
            args.append(f"--profile={i}")  # TensorRT 10: one --profile=N per min/opt/max set
        args += [f"--minShapes={shape_spec(shapes, 0)}", f"--optShapes={shape_spec(shapes, 1)}",
                 f"--maxShapes={shape_spec(shapes, 2)}"]
    if pins:
        args += ["--precisionConstraints=obey",
                 "--layerPrecisions=" + ",".join(f"{p}:fp32" for p in pins),
                 "--layerOutputTypes=" + ",".join(f"{p}:fp32" for p in pins)]
    args += [f"--timingCacheFile={layout.timing_cache.name}",
             f"--builderOptimizationLevel={e.builder_optimization_level}",
             f"--memPoolSize=workspace:{e.workspace_mib}M"]
    if e.version_compatible:
        args.append("--versionCompatible")
    if e.hardware_compatibility != "none":
        args.append(f"--hardwareCompatibilityLevel={TRTEXEC_HW[e.hardware_compatibility]}")
    engine = layout.engine.name if full else split_engine_name(graph)
    args += [f"--saveEngine={engine}", "--skipInference"]
    return args


def render_recipe(cfg: BuildConfig, contract: GraphContract, pins: Sequence[str],
                  layout: "BuildLayout", onnx_sha256: str) -> str:
    """``build_engine.sh``: trtexec build + an engine.json record, runnable from any folder."""
    args = trtexec_args(cfg, contract, pins, layout)
    lines = " \\\n  ".join(shlex.quote(a) for a in args)
    profiles = profile_rows(contract, engine_profiles(cfg))
    import json
    static = json.dumps({"source": "build_engine.sh", "flags": flags(cfg, pins),
                         "profiles": profiles, "pins": list(pins),
                         "engine": layout.engine.name,
                         "timing_cache": layout.timing_cache.name}, sort_keys=True)
    return f"""#!/usr/bin/env bash
# TensorRT engine for '{cfg.model.name}', generated by hmu_export {__version__}.
# Run it on the GPU machine that will serve: an engine (and timing.cache) only runs on the
# TensorRT version and GPU that built it. Needs trtexec (set TRTEXEC=/path/to/trtexec) and
# sha256sum; no Python. Built from model.onnx sha256 {onnx_sha256}.
# FP32 pins (precision constraints obeyed): {', '.join(pins) or 'none'}
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-trtexec}}"
"$TRTEXEC" \\
  {lines} \\
  2>&1 | tee build_engine.log

# engine.json: what the engine is tied to; the TensorRT runner refuses a mismatch.
field() {{ sed -n "s/.*$1: *//p" build_engine.log | head -n 1 | tr -d '\\r"'; }}
trt_version=$(field "TensorRT version")
gpu_name=$(field "Selected Device")
compute_cap=$(field "Compute Capability")
onnx_sha=$(sha256sum {shlex.quote(layout.onnx.name)} | cut -d ' ' -f 1)
engine_sha=$(sha256sum {shlex.quote(layout.engine.name)} | cut -d ' ' -f 1)
static={shlex.quote(static[1:-1])}
printf '{{"tensorrt": "%s", "gpu": {{"name": "%s", "compute_capability": "%s"}}, "onnx_sha256": "%s", "engine_sha256": "%s", %s}}\\n' \\
  "$trt_version" "$gpu_name" "$compute_cap" "$onnx_sha" "$engine_sha" "$static" > {RECORD_FILE}.tmp
mv {RECORD_FILE}.tmp {RECORD_FILE}
echo "engine: $(pwd)/{layout.engine.name} (TensorRT $trt_version, $gpu_name, sm $compute_cap)"
"""


def load_contract_of(path: Path) -> GraphContract:
    from ..core.graph_meta import load_graph_contract
    return load_graph_contract(path)[2]


def apply_pins(network: "trt.INetworkDefinition", pins: Sequence[str]) -> list[str]:
    """Run the pinned layers in FP32 with FP32 outputs; returns the layer names it found.

    The ONNX parser names each layer after its node, so pins (node names) address layers.
    """
    import tensorrt as trt

    wanted = set(pins)
    found: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name not in wanted:
            continue
        layer.precision = trt.float32
        for k in range(layer.num_outputs):
            if layer.get_output(k).dtype in (trt.float32, trt.float16):
                layer.set_output_type(k, trt.float32)
        found.append(layer.name)
    return found


def _hardware_level(name: str) -> "trt.HardwareCompatibilityLevel | None":
    import tensorrt as trt

    return {"none": None, "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
            "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
            }[name]


def build_engine(layout: "BuildLayout", cfg: BuildConfig, contract: GraphContract,
                 pins: Sequence[str], graph: str = "full") -> dict[str, Any]:
    """Build ``model.fp16.plan`` (or ``<graph>.fp16.plan`` of a split graph) with Polygraphy's
    loaders; reuses and updates timing.cache."""
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork,
                                        NetworkFromOnnxPath, PostprocessNetwork, Profile)

    onnx_path = layout.onnx if graph == "full" else layout.graph(graph)
    engine_path = layout.engine if graph == "full" else layout.root / split_engine_name(graph)
    profiles = []
    for p in graph_profiles(cfg, graph):
        prof = Profile()
        for name, (lo, opt, hi) in input_shapes(contract, p).items():
            prof.add(name, min=lo, opt=opt, max=hi)
        profiles.append(prof)
    applied: list[str] = []

    def pin_layers(network: trt.INetworkDefinition) -> None:
        applied.extend(apply_pins(network, pins))

    network = PostprocessNetwork(NetworkFromOnnxPath(str(onnx_path)), pin_layers,
                                 name="fp32-pins")
    config = CreateConfig(
        fp16=cfg.engine.fp16, profiles=profiles,
        precision_constraints="obey" if pins else None,
        load_timing_cache=str(layout.timing_cache) if layout.timing_cache.is_file() else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: cfg.engine.workspace_mib << 20},
        builder_optimization_level=cfg.engine.builder_optimization_level,
        hardware_compatibility_level=_hardware_level(cfg.engine.hardware_compatibility),
        version_compatible=cfg.engine.version_compatible or None)
    t0 = time.perf_counter()
    data = EngineBytesFromNetwork(network, config=config,
                                  save_timing_cache=str(layout.timing_cache))()
    seconds = time.perf_counter() - t0
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(data))
    missing = sorted(set(pins) - set(applied))
    return {"build_seconds": round(seconds, 3), "pins_applied": applied,
            "pins_not_found": missing, "engine_sha256": sha256_file(engine_path)}


def engine_record(cfg: BuildConfig, layout: "BuildLayout", pins: Sequence["Pin"],
                  onnx_sha256: str, contract: GraphContract) -> dict[str, Any]:
    names = [p.name for p in pins]
    return {"recipe": layout.recipe.name, "engine": layout.engine.name,
            "timing_cache": layout.timing_cache.name, "onnx": layout.onnx.name,
            "onnx_sha256": onnx_sha256, "pins": [p.to_dict() for p in pins],
            "profiles": profile_rows(contract, engine_profiles(cfg)),
            "flags": flags(cfg, names), "built": False}
