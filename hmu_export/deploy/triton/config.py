"""Triton model repository: three models of one graph, every config validated before it is written.

From a build folder (``model.onnx``, maybe ``model.fp16.plan``) this writes::

    triton/
      README.md
      <name>_tensorrt/config.pbtxt   1/model.plan   (plan only if the engine was built)
      <name>_onnx/config.pbtxt       1/model.onnx
      <name>_python/config.pbtxt     1/model.py  1/model.onnx

Inputs, outputs, dtypes and dims come from the I/O contract; batch and lengths from the shape
profile(s). Each config is rendered to text, parsed back with Triton's own ``ModelConfig``
protobuf (shipped in ``tritonclient``) and checked semantically (names, dtypes and dims against the
contract *and* the ONNX graph, preferred batch sizes inside max and the profiles, profile indices
that exist) before anything is written; a bad config is a ``TritonConfigError``, never a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ...core.config import BuildConfig, ProfileConfig
from ...core.errors import ArtifactError, BackendUnavailable, HMUExportError
from ...core.io_contract import AXIS_TO_PROFILE, BATCH, NOISE, GraphContract, TensorSpec

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2


TENSORRT, ONNXRUNTIME, PYTHON = "tensorrt", "onnxruntime", "python"
KINDS = (TENSORRT, ONNXRUNTIME, PYTHON)
SUFFIX = {TENSORRT: "_tensorrt", ONNXRUNTIME: "_onnx", PYTHON: "_python"}
NP_TO_TRITON = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32",
                "float16": "TYPE_FP16", "bool": "TYPE_BOOL",
                "string": "TYPE_STRING"}  # text of the generation models (BYTES on the wire)
ONNX_ELEM_TO_TRITON = {7: "TYPE_INT64", 6: "TYPE_INT32", 1: "TYPE_FP32", 10: "TYPE_FP16",
                       9: "TYPE_BOOL"}  # onnx.TensorProto element types
PYTHON_MODEL_SOURCE = Path(__file__).parents[2] / "shipped" / "python_model.py"


class TritonConfigError(HMUExportError):
    """A generated (or given) config.pbtxt fails Triton's schema or a semantic check."""


@dataclass(frozen=True)
class TritonOptions:
    """Knobs of the generated repository (defaults from the build config's [triton] table)."""

    max_queue_delay_us: int = 100
    instance_count: int = 1
    # Adds ONNX Runtime's TensorRT execution accelerator to the onnxruntime_onnx model (GPU hosts).
    onnx_tensorrt_accelerator: bool = False
    python_intra_op_threads: int = 1

    def validate(self) -> None:
        if self.instance_count < 1:
            raise TritonConfigError(f"instance count must be >= 1, got {self.instance_count}")
        if self.max_queue_delay_us < 0:
            raise TritonConfigError(f"max queue delay must be >= 0 us, got "
                                    f"{self.max_queue_delay_us}")
        if self.python_intra_op_threads < 0:
            raise TritonConfigError("python_intra_op_threads must be >= 0 (0 = ORT default)")


@dataclass
class TritonModel:
    kind: str
    name: str
    config: "model_config_pb2.ModelConfig"
    files: dict[str, Path] = field(default_factory=dict)  # path inside the model dir -> source
    note: str = ""
    header: str = ""  # config.pbtxt comment; empty = HEADER[kind]
    # Validation of the parsed config when it is not the full graph's (generation models).
    check: "Callable[[model_config_pb2.ModelConfig], None] | None" = None


@dataclass
class RepositoryResult:
    root: Path
    models: dict[str, str]  # kind -> model name
    plan_included: bool
    notes: list[str]
    generation_precisions: list[str] = field(default_factory=list)  # generation models served


# ----------------------------------------------------------------------------- config building

def require_schema() -> None:
    """Triton's ModelConfig schema ships in ``tritonclient`` (the ``[triton]`` extra): without it
    no config can be rendered or validated, so no repository is written (BackendUnavailable)."""
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except ImportError:
        raise BackendUnavailable("Triton's config schema (package tritonclient) is not "
                                 "installed: install hmu-export[triton] to write and validate "
                                 "the Triton repository") from None


def model_names(cfg: BuildConfig) -> dict[str, str]:
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in cfg.model.name)
    return {kind: base + SUFFIX[kind] for kind in KINDS}


def engine_profiles(cfg: BuildConfig) -> list[ProfileConfig]:
    """The engine's optimization profiles, in index order: [profile] first, then the extras."""
    return [cfg.profile, *cfg.engine.extra_profiles]


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    dims = [-1 if isinstance(d, str) else int(d) for d in spec.dims]
    if batched:
        if spec.dims[0] != BATCH:
            raise TritonConfigError(f"'{spec.name}' has no leading batch axis; cannot batch")
        dims = dims[1:]
    return dims


def preferred_batch_sizes(profile: ProfileConfig, max_batch: int) -> list[int]:
    """The profile's opt and max batch, clipped to ``max_batch`` (the sizes the engine is tuned for)."""
    lo, opt, _ = profile.batch
    return sorted({b for b in (opt, max_batch) if lo <= b <= max_batch and b > 1})


def base_config(name: str, contract: GraphContract, max_batch: int, preferred: Sequence[int],
                 opts: TritonOptions, optional_noise: bool = False
                 ) -> "model_config_pb2.ModelConfig":
    from tritonclient.grpc import model_config_pb2 as mc

    conf = mc.ModelConfig(name=name, max_batch_size=max_batch)
    for spec in contract.inputs:
        conf.input.add(name=spec.name, data_type=mc.DataType.Value(NP_TO_TRITON[spec.dtype]),
                       dims=_dims(spec, max_batch > 0),
                       optional=optional_noise and spec.name == NOISE)
    for spec in contract.outputs:
        conf.output.add(name=spec.name, data_type=mc.DataType.Value(NP_TO_TRITON[spec.dtype]),
                        dims=_dims(spec, max_batch > 0))
    if max_batch > 0:
        conf.dynamic_batching.preferred_batch_size.extend(preferred)
        conf.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_us
    return conf


def describe_noise(conf: "model_config_pb2.ModelConfig", contract: GraphContract) -> None:
    """State the noise input's axes (``input.noise``, as the python model states every input),
    so a client can tell which length the noise spans (src_len, or tgt_len for a model whose
    HMU follows the decoder) from any model's config; backends ignore the parameter."""
    from ...shipped.python_model import INPUT_PREFIX, format_tensor

    for spec in contract.inputs:
        if spec.name == NOISE:
            conf.parameters[INPUT_PREFIX + NOISE].string_value = format_tensor(spec.dtype,
                                                                               spec.dims)


def tensorrt_config(name: str, cfg: BuildConfig, contract: GraphContract,
                    opts: TritonOptions) -> "model_config_pb2.ModelConfig":
    """``tensorrt_plan`` model: batch limited by every profile, GPU instances naming the profiles."""
    from tritonclient.grpc import model_config_pb2 as mc

    profiles = engine_profiles(cfg)
    # Triton checks max_batch_size against each profile an instance uses: take the smallest max.
    max_batch = min(p.batch[2] for p in profiles)
    conf = base_config(name, contract, max_batch, preferred_batch_sizes(cfg.profile, max_batch),
                        opts)
    conf.platform = "tensorrt_plan"
    conf.default_model_filename = "model.plan"
    describe_noise(conf, contract)
    conf.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=opts.instance_count,
                            profile=[str(i) for i in range(len(profiles))])
    return conf


def onnx_config(name: str, cfg: BuildConfig, contract: GraphContract,
                opts: TritonOptions) -> "model_config_pb2.ModelConfig":
    """``onnxruntime_onnx`` model: GPU when the host has one (KIND_AUTO), else CPU."""
    from tritonclient.grpc import model_config_pb2 as mc

    max_batch = cfg.profile.batch[2]
    conf = base_config(name, contract, max_batch, preferred_batch_sizes(cfg.profile, max_batch),
                        opts)
    conf.platform = "onnxruntime_onnx"
    conf.default_model_filename = "model.onnx"
    describe_noise(conf, contract)
    conf.instance_group.add(kind=mc.ModelInstanceGroup.KIND_AUTO, count=opts.instance_count)
    if opts.onnx_tensorrt_accelerator:
        acc = conf.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt")
        acc.parameters["precision_mode"] = "FP16"
        acc.parameters["max_workspace_size_bytes"] = str(cfg.engine.workspace_mib << 20)
        acc.parameters["trt_engine_cache_enable"] = "1"
        acc.parameters["trt_engine_cache_path"] = "/tmp/hmu_trt_cache"
    return conf


def python_model_refusal(contract: GraphContract) -> str:
    """Empty when the python-backend model (triton_python_model.py, driven by the contract) can
    serve this graph, else why not (one line). It serves any graph whose tensors all lead with
    the batch axis and whose noise spans only axes another input carries (the server sizes the
    noise it draws from them): the full graph (noise over src_len, or tgt_len with the HMU after
    the decoder) and the classifier graph alike."""
    unbatched = [s.name for s in (*contract.inputs, *contract.outputs)
                 if not s.dims or s.dims[0] != BATCH]
    if unbatched:
        return (f"{', '.join(unbatched)} of graph {contract.name} have no leading batch axis: "
                "serve it with the onnx or tensorrt model")
    noise = next((s for s in contract.inputs if s.name == NOISE), None)
    if noise is None:
        return ""
    carried = {d for s in contract.inputs if s.name != NOISE for d in s.dims}
    free = [d for d in noise.dims if isinstance(d, str) and d not in carried]
    if free or len(noise.dims) != 3:
        return (f"the noise of graph {contract.name} is {list(noise.dims)}, which the server "
                "cannot size from the other inputs: serve it with the onnx or tensorrt model")
    return ""


def python_parameters(cfg: BuildConfig, contract: GraphContract,
                      opts: TritonOptions) -> dict[str, str]:
    """The python model's ``parameters``: the graph file, every input's dtype and dims
    (``input.<name>``), the profile range of every dynamic axis but batch, the vocabulary."""
    from ...shipped.python_model import INPUT_PREFIX, format_tensor

    params = {"onnx_file": "model.onnx", "vocab_size": str(cfg.model.vocab_size),
              "intra_op_threads": str(opts.python_intra_op_threads)}
    for spec in contract.inputs:
        params[INPUT_PREFIX + spec.name] = format_tensor(spec.dtype, spec.dims)
    for axis in contract.axes:
        if axis != BATCH:
            r = cfg.profile.axis(AXIS_TO_PROFILE[axis])
            params[f"{axis}_min"], params[f"{axis}_max"] = str(r.min), str(r.max)
    return params


def python_config(name: str, cfg: BuildConfig, contract: GraphContract,
                  opts: TritonOptions) -> "model_config_pb2.ModelConfig":
    """python-backend model: ONNX Runtime on CPU; noise optional (zeros or seeded server-side)."""
    from tritonclient.grpc import model_config_pb2 as mc

    max_batch = cfg.profile.batch[2]
    conf = base_config(name, contract, max_batch, preferred_batch_sizes(cfg.profile, max_batch),
                        opts, optional_noise=True)
    conf.backend = "python"
    conf.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=opts.instance_count)
    for key, value in python_parameters(cfg, contract, opts).items():
        conf.parameters[key].string_value = value
    return conf


# ----------------------------------------------------------------------------- text + validation

HEADER = {
    TENSORRT: ("TensorRT FP16 engine (model.plan = the build's model.fp16.plan). Loads only on a\n"
               "GPU host with the same TensorRT version and GPU the plan was built for; build it\n"
               "there with build_engine.sh and copy it to 1/model.plan."),
    ONNXRUNTIME: ("ONNX graph served by Triton's onnxruntime backend (CPU or GPU). On a GPU host,\n"
                  "`python -m hmu_export triton --onnx-tensorrt` adds ONNX Runtime's TensorRT\n"
                  "execution accelerator (optimization.execution_accelerators, FP16)."),
    PYTHON: ("ONNX graph run by ONNX Runtime inside Triton's python backend, for hosts without\n"
             "the onnxruntime/tensorrt backends. 'noise' is optional: omitted = zeros (mean\n"
             "path), or request parameters {seed, temperature} = seeded N(0, t^2) noise."),
}


def render_config(conf: "model_config_pb2.ModelConfig", header: str = "") -> str:
    from google.protobuf import text_format

    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append("# Generated by hmu_export; validated against Triton's ModelConfig schema.")
    return "\n".join(lines) + "\n" + text_format.MessageToString(conf)


def parse_config(text: str, where: str = "config.pbtxt") -> "model_config_pb2.ModelConfig":
    """Parse ``text`` with Triton's ModelConfig schema (syntax, field names, enum values)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonConfigError(f"{where} does not match Triton's ModelConfig schema: "
                                f"{str(exc).splitlines()[0]}") from None


def _kind_of(conf: "model_config_pb2.ModelConfig") -> str:
    if conf.platform == "tensorrt_plan" or conf.backend == "tensorrt":
        return TENSORRT
    if conf.platform == "onnxruntime_onnx" or conf.backend == "onnxruntime":
        return ONNXRUNTIME
    if conf.backend == "python":
        return PYTHON
    raise TritonConfigError(f"model '{conf.name}': unknown platform/backend "
                            f"{conf.platform or conf.backend!r}")


def onnx_graph_io(onnx_path: Path) -> dict[str, tuple[str, list[str | int]]]:
    """name -> (Triton dtype, dims with dim_param names / values) of the graph's inputs+outputs."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / OSError for corrupt or missing files
        raise ArtifactError(f"cannot read ONNX graph {onnx_path}: {exc}") from None
    out = {}
    for v in list(proto.graph.input) + list(proto.graph.output):
        tt = v.type.tensor_type
        dims: list[str | int] = [d.dim_param if d.HasField("dim_param") else
                                 (int(d.dim_value) if d.HasField("dim_value") else "?")
                                 for d in tt.shape.dim]
        out[v.name] = (ONNX_ELEM_TO_TRITON.get(tt.elem_type, f"onnx:{tt.elem_type}"), dims)
    return out


def validate_config(conf: "model_config_pb2.ModelConfig", contract: GraphContract,
                    profiles: Sequence[ProfileConfig], *,
                    graph_io: dict[str, tuple[str, list[str | int]]] | None = None) -> None:
    """Semantic checks Triton's schema cannot do; raises TritonConfigError naming the first one."""
    from tritonclient.grpc import model_config_pb2 as mc

    name = conf.name or "<unnamed>"

    def fail(msg: str) -> None:
        raise TritonConfigError(f"model '{name}': {msg}")

    if not conf.name:
        fail("no name")
    kind = _kind_of(conf)
    if not profiles:
        fail("no shape profile to check against")
    mb = conf.max_batch_size
    if mb < 0:
        fail(f"max_batch_size {mb} < 0")
    batch_max = profiles[0].batch[2] if kind != TENSORRT else min(p.batch[2] for p in profiles)
    if mb > batch_max:
        fail(f"max_batch_size {mb} exceeds the profile's max batch {batch_max}")
    batched = mb > 0

    def check_io(kind_name: str, got: Sequence, specs: Sequence[TensorSpec]) -> None:
        names = [t.name for t in got]
        want = [s.name for s in specs]
        if sorted(names) != sorted(want) or len(set(names)) != len(names):
            fail(f"{kind_name}s {names} differ from the contract's {want}")
        by_name = {s.name: s for s in specs}
        for t in got:
            spec = by_name[t.name]
            dtype = mc.DataType.Name(t.data_type)
            if dtype != NP_TO_TRITON[spec.dtype]:
                fail(f"{kind_name} '{t.name}' has {dtype}, contract says {spec.dtype}")
            want_dims = _dims(spec, batched)
            if list(t.dims) != want_dims:
                fail(f"{kind_name} '{t.name}' has dims {list(t.dims)}, expected {want_dims} "
                     f"({'batch dim implicit, ' if batched else ''}-1 = dynamic)")
            if graph_io is not None:
                if t.name not in graph_io:
                    fail(f"{kind_name} '{t.name}' is not in the ONNX graph")
                gtype, gdims = graph_io[t.name]
                if gtype != dtype:
                    fail(f"{kind_name} '{t.name}' is {dtype} but the graph has {gtype}")
                full = ([-1] if batched else []) + list(t.dims)
                if len(full) != len(gdims):
                    fail(f"{kind_name} '{t.name}' has rank {len(full)}, the graph {len(gdims)}")
                for c, g in zip(full, gdims):
                    if (c == -1) != isinstance(g, str) or (c != -1 and c != g):
                        fail(f"{kind_name} '{t.name}' dims {full} do not match the graph's "
                             f"{gdims}")

    check_io("input", conf.input, contract.inputs)
    check_io("output", conf.output, contract.outputs)
    for t in conf.input:
        if t.optional and not (kind == PYTHON and t.name == NOISE):
            fail(f"input '{t.name}' is optional, but the {kind} graph always needs it")

    if conf.HasField("dynamic_batching"):
        if not batched:
            fail("dynamic_batching needs max_batch_size > 0")
        named = _named_profiles(conf, profiles, fail) if kind == TENSORRT else [profiles[0]]
        for b in conf.dynamic_batching.preferred_batch_size:
            if not 1 <= b <= mb:
                fail(f"preferred batch size {b} is outside [1, max_batch_size={mb}]")
            if not any(p.axis("batch").contains(b) for p in named):
                fail(f"preferred batch size {b} lies in no optimization profile")
    groups = list(conf.instance_group)
    if not groups:
        fail("no instance_group")
    for g in groups:
        if g.count < 1:
            fail(f"instance_group count {g.count} < 1")
        if g.profile and kind != TENSORRT:
            fail("only tensorrt_plan models name optimization profiles")
    if kind == TENSORRT:
        for g in groups:
            if g.kind != mc.ModelInstanceGroup.KIND_GPU:
                fail("a TensorRT plan needs KIND_GPU instances")
        named = _named_profiles(conf, profiles, fail)
        for p in named:
            if p.batch[2] < mb:
                fail(f"max_batch_size {mb} exceeds a named profile's max batch {p.batch[2]}")
    if kind == PYTHON:
        _check_python_parameters({k: v.string_value for k, v in conf.parameters.items()},
                                 contract, profiles[0], fail)
    else:  # the noise axes a client reads (describe_noise): the contract's, or absent
        from ...shipped.python_model import INPUT_PREFIX, format_tensor
        stated = conf.parameters.get(INPUT_PREFIX + NOISE)
        noise = [s for s in contract.inputs if s.name == NOISE]
        if stated is not None and (not noise or stated.string_value !=
                                   format_tensor(noise[0].dtype, noise[0].dims)):
            fail(f"parameter '{INPUT_PREFIX}{NOISE}' = {stated.string_value!r} is not the "
                 "contract's noise input")


def _check_python_parameters(params: dict[str, str], contract: GraphContract,
                             profile: ProfileConfig, fail) -> None:  # type: ignore[no-untyped-def]
    """A python model validates requests by its parameters: ``vocab_size``, and the range of
    every dynamic axis (``<axis>_min`` / ``<axis>_max``, inside the profile). The graph's python
    model (triton_python_model.py: its contract has the noise input, or its parameters describe
    inputs) also reads its inputs from ``input.<name>``: exactly the contract's."""
    from ...shipped.python_model import INPUT_PREFIX, format_tensor

    try:
        if int(params.get("vocab_size", "")) < 1:
            raise ValueError
    except ValueError:
        fail("python model parameter 'vocab_size' must be a positive integer")
    for axis in sorted(set(contract.axes) - {BATCH}):
        lo_text, hi_text = params.get(f"{axis}_min", ""), params.get(f"{axis}_max", "")
        if not (lo_text.isdigit() and hi_text.isdigit()):
            fail(f"python model parameters lack integer '{axis}_min' / '{axis}_max'")
        lo, hi = int(lo_text), int(hi_text)
        r = profile.axis(AXIS_TO_PROFILE[axis])
        if lo < r.min or hi > r.max or lo > hi:
            fail(f"python model {axis} [{lo}, {hi}] lies outside the profile [{r.min}, {r.max}]")
    described = sorted(k[len(INPUT_PREFIX):] for k in params if k.startswith(INPUT_PREFIX))
    if not described and NOISE not in contract.input_names:
        return  # another python model (generation): its I/O is its own code's
    why = python_model_refusal(contract)
    if why:
        fail(f"no python model can serve this graph: {why}")
    if described != sorted(contract.input_names):
        fail(f"python model parameters describe inputs {described}, the contract has "
             f"{sorted(contract.input_names)} (one '{INPUT_PREFIX}<name>' each)")
    for spec in contract.inputs:
        want, got = format_tensor(spec.dtype, spec.dims), params[INPUT_PREFIX + spec.name]
        if got.replace(" ", "") != want:
            fail(f"python model parameter '{INPUT_PREFIX}{spec.name}' is {got!r}, the "
                 f"contract says {want!r}")


def _named_profiles(conf: "model_config_pb2.ModelConfig", profiles: Sequence[ProfileConfig],
                    fail) -> list[ProfileConfig]:  # type: ignore[no-untyped-def]
    named: list[ProfileConfig] = []
    for g in conf.instance_group:
        for ref in g.profile or [str(i) for i in range(len(profiles))]:
            if not ref.isdigit() or int(ref) >= len(profiles):
                fail(f"instance_group names profile '{ref}', the engine has "
                     f"{len(profiles)} (0..{len(profiles) - 1})")
            named.append(profiles[int(ref)])
    return named


def check_config_text(text: str, contract: GraphContract, profiles: Sequence[ProfileConfig], *,
                      onnx_path: Path | None = None, where: str = "config.pbtxt"
                      ) -> "model_config_pb2.ModelConfig":
    """Schema + semantic validation of one config.pbtxt text (what is written is what is checked)."""
    conf = parse_config(text, where)
    validate_config(conf, contract, profiles,
                    graph_io=onnx_graph_io(onnx_path) if onnx_path is not None else None)
    return conf


# ----------------------------------------------------------------------------- repository


