"""What a Triton model repository holds, as far as deploying it goes: which models, which of them
can load (their files are there), which need a GPU, which call others (BLS), how big they are.

Every ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` schema, so a folder that is not
a repository (or holds a broken config) is one ArtifactError before anything is planned.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.errors import ArtifactError

if TYPE_CHECKING:
    from ...core.config import BuildConfig

# The file each backend loads from a version folder when the config names none.
DEFAULT_FILE = {"tensorrt": "model.plan", "onnxruntime": "model.onnx", "python": "model.py"}
# Suffixes `build` gives its models (triton.py SUFFIX, triton_generate.py GEN_SUFFIX).
NAME_SUFFIXES = ("_generate_stream", "_generate", "_tensorrt", "_onnx", "_python", "_encoder",
                 "_decoder")


@dataclass(frozen=True)
class RepoModel:
    """One model folder of the repository."""

    name: str
    backend: str  # tensorrt | onnxruntime | python | another backend's name
    needs_gpu: bool  # a TensorRT plan, KIND_GPU instances or a GPU execution accelerator
    instances: int  # model instances Triton starts (sum of the instance groups' counts)
    missing: str  # why it cannot load ("" when its files are there)
    bytes: int  # bytes of its newest version folder (what a process maps or copies)
    calls: tuple[str, ...]  # models it calls through BLS (python generation, step_backend bls)

    @property
    def loadable(self) -> bool:
        return not self.missing


@dataclass(frozen=True)
class Repository:
    root: Path
    base_name: str  # the build's model name (hmu-default), from the model folders' names
    models: dict[str, RepoModel]
    cfg: BuildConfig | None  # the build config, when the manifest or a graph records it
    cfg_source: str  # where cfg came from (for the README), or why there is none
    versions: dict[str, str]  # package versions of the build (manifest), maybe empty


def _backend(conf: Any) -> str:
    if conf.platform == "tensorrt_plan" or conf.backend == "tensorrt":
        return "tensorrt"
    if conf.platform == "onnxruntime_onnx" or conf.backend == "onnxruntime":
        return "onnxruntime"
    return conf.backend or conf.platform or "unknown"


def _read_model(folder: Path) -> RepoModel:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    where = folder / "config.pbtxt"
    try:
        conf = text_format.Parse(where.read_text(), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{where} is not a Triton model config: {first}") from None
    if conf.name and conf.name != folder.name:
        raise ArtifactError(f"{where} names model '{conf.name}', its folder is '{folder.name}' "
                            "(Triton refuses that)")
    backend = _backend(conf)
    gpu_group = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in conf.instance_group)
    accel = len(conf.optimization.execution_accelerators.gpu_execution_accelerator) > 0
    instances = sum(max(g.count, 1) for g in conf.instance_group) or 1
    versions = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    wanted = conf.default_model_filename or DEFAULT_FILE.get(backend, "")
    if not versions:
        missing = "no version folder (1/)"
    elif wanted and not (versions[-1] / wanted).is_file():
        missing = f"no {versions[-1].name}/{wanted}"
    else:
        missing = ""
    size = sum(p.stat().st_size for p in versions[-1].rglob("*") if p.is_file()) if versions else 0
    params = {k: v.string_value for k, v in conf.parameters.items()}
    calls = tuple(params[k] for k in ("encoder_model", "decoder_model")
                  if params.get("step_backend") == "bls" and params.get(k))
    return RepoModel(folder.name, backend, backend == "tensorrt" or gpu_group or accel,
                     instances, missing, size, calls)


def _base_name(names: list[str], root: Path) -> str:
    for name in names:
        for suffix in NAME_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
    return names[0] if len(names) == 1 else root.name


def _build_config(root: Path, models: dict[str, RepoModel], base: str
                  ) -> tuple[BuildConfig | None, str, dict[str, str]]:
    """The build config: from the build's manifest.json when the repository is the build's
    ``triton/`` folder, else from an ONNX graph's metadata (every graph records it)."""
    from ...core.config import config_from_dict
    from ...core.graph_meta import load_graph_contract
    from ...core.fileio import read_json_object

    manifest = root.parent / "manifest.json"
    if manifest.is_file():
        try:
            data = read_json_object(manifest, ArtifactError, "manifest")
            cfg = config_from_dict(data["config"])
            if "".join(c if c.isalnum() or c in "-_" else "_" for c in cfg.model.name) == base:
                versions = data.get("versions", {})
                return cfg, f"the build's manifest ({manifest})", \
                    versions if isinstance(versions, dict) else {}
        except (ArtifactError, KeyError, TypeError, ValueError):
            pass  # not this repository's build: try the graphs
    for m in models.values():
        for graph in sorted((root / m.name).glob("[0-9]*/*.onnx")):
            try:
                _, cfg, _ = load_graph_contract(graph)
            except ArtifactError:
                continue
            return cfg, f"the metadata of {graph.relative_to(root)}", {}
    return None, "no build config found (no manifest beside it, no graph of hmu_export)", {}


def _refuse_a_failed_build(root: Path) -> None:
    """The triton/ folder of a failed build (``<out>.failed/``) is never served."""
    from ...core.fileio import read_json_object
    from ...core.manifest import refuse_failed

    manifest = root.absolute().parent / "manifest.json"
    if manifest.is_file():
        try:
            data = read_json_object(manifest, ArtifactError, "manifest")
        except ArtifactError:
            return  # not a readable build manifest: the repository is judged on its own
        refuse_failed(data, root.absolute().parent)


def read_repository(root: Path) -> Repository:
    """The repository at ``root``, or a one-line ArtifactError saying why it is not one."""
    from ..triton.config import require_schema

    root = Path(root)
    if not root.exists():
        raise ArtifactError(f"model repository {root} does not exist")
    if not root.is_dir():
        raise ArtifactError(f"model repository {root} is not a folder")
    _refuse_a_failed_build(root)
    require_schema()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and (p / "config.pbtxt").is_file())
    if not folders:
        raise ArtifactError(f"{root} is not a Triton model repository: no <model>/config.pbtxt "
                            "in it (pass the triton/ folder that `python -m hmu_export build` "
                            "writes)")
    models = {p.name: _read_model(p) for p in folders}
    base = _base_name(list(models), root)
    cfg, source, versions = _build_config(root, models, base)
    return Repository(root, base, models, cfg, source, versions)
