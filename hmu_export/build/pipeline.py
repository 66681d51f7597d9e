"""`build`: a pipeline of named stages (Model Navigator's shape) recorded in manifest.json.

The whole build happens in a staging folder beside the target. Only a build whose required
stages passed replaces the target folder, so a failed or interrupted build never leaves a
half-written artifact where a previous good build was; a failed one is kept as ``<out>.failed``
for inspection.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.layout import BuildLayout
from ..core.config import BuildConfig, GenerationConfig
from ..core.errors import ArtifactError, ConfigError, HMUExportError
from ..core.fileio import ensure_writable_dir, exclusive_lock, read_json_object, sha256_file, write_text
from ..core.io_contract import DECODER, GraphContract, full_contract
from ..core.manifest import FAILED, OK, StageResult, write_manifest
from ..model import HMUTransformer
from ..model.interface import ModelSource


@dataclass
class BuildContext:
    cfg: BuildConfig
    layout: BuildLayout
    require_engine: bool = False
    model: HMUTransformer | None = None  # the native model, when the source is native
    source: ModelSource | None = None
    contract: GraphContract | None = None  # the primary graph's (model.onnx)
    contracts: dict[str, GraphContract] = field(default_factory=dict)  # every exported graph
    checkpoint_sha256: str = ""
    # Data handed from stage to stage (pins, optimized-graph flags...), also put in the manifest.
    data: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageResult] = field(default_factory=dict)


StageFn = Callable[[BuildContext], StageResult]


def as_source(cfg: BuildConfig, model: "HMUTransformer | ModelSource | None") -> ModelSource:
    """The build's model source: given, wrapped (a native HMUTransformer), or loaded."""
    from ..model import sources
    from ..model.native import NativeSource

    if isinstance(model, ModelSource):
        return model
    if model is not None:
        return NativeSource(cfg.model, model)
    return sources.load(cfg.model)


def stage_checkpoint(ctx: BuildContext) -> StageResult:
    from ..model.checkpoint import save_source_checkpoint
    from ..model.native import NativeSource

    source = ctx.source or as_source(ctx.cfg, ctx.model)
    ctx.source = source
    if isinstance(source, NativeSource):
        ctx.model = source.model
    weights, _ = save_source_checkpoint(source, ctx.layout.checkpoint_dir)
    ctx.checkpoint_sha256 = sha256_file(weights)
    hmu, total = source.hmu_parameter_share()
    ctx.data["parameters"] = {"total": total, "hmu": hmu,
                              "hmu_share": round(hmu / total, 6) if total else 0.0}
    m = ctx.cfg.model
    origin = m.checkpoint or m.path or "seeded"
    hmu_status = getattr(source, "hmu_status", "")
    if hmu_status:
        ctx.data["hmu_status"] = hmu_status
    return StageResult(OK, details={"source": m.source, "weights": origin,
                                    **({"hmu": hmu_status} if hmu_status else {}),
                                    "graphs": list(source.graph_names()),
                                    "parameters": ctx.data["parameters"]})


def stage_export(ctx: BuildContext) -> StageResult:
    """Export every graph of the source once (dynamo tracing dominates the build's time)."""
    import onnx

    from ..export.onnx_export import sensitive_nodes
    from ..core.io_contract import ENCODER, GRAPH_FILES

    assert ctx.source is not None
    graphs: dict[str, Any] = {}
    pins: dict[str, list[str]] = {}
    names = [g for g in ctx.source.graph_names()
             if ctx.cfg.generation.split_graphs or g not in (ENCODER, DECODER)]
    results = _export_all(ctx, names)
    for i, graph in enumerate(names):
        res = results[graph]
        ctx.contracts[graph] = res.contract
        if i == 0:
            ctx.contract = res.contract
        pins[graph] = sensitive_nodes(onnx.load(str(res.path)), ctx.source.hmu_scope)
        graphs[graph] = {"file": GRAPH_FILES[graph], "sha256": res.sha256,
                         "seconds": round(res.seconds, 2),
                         "validation_max_abs": res.validation_max_abs,
                         "contract": res.contract.to_dict()}
    primary = ctx.source.graph_names()[0]
    ctx.data["sensitive_nodes"] = pins[primary]
    ctx.data["graph_pins"] = pins
    ctx.data["graphs"] = graphs
    worst = max(g["validation_max_abs"] for g in graphs.values())
    return StageResult(OK, details={"opset": ctx.cfg.export.opset, "graphs": list(graphs),
                                    "validation_max_abs": worst,
                                    "sensitive_nodes": ctx.data["sensitive_nodes"]})


def export_workers(cfg: BuildConfig, graphs: int) -> int:
    """Processes exporting graphs beside the main one: dynamo tracing is single-threaded Python,
    so each core can trace its own graph (``[export] workers``: 0 = one per spare core)."""
    from ..export.optimize import cpu_threads

    want = cfg.export.workers if cfg.export.workers > 0 else cpu_threads() - 1
    return max(0, min(want, graphs - 1))


def _export_all(ctx: BuildContext, names: list[str]) -> dict[str, Any]:
    """Export ``names``: the primary graph here, the others in spawned processes that rebuild
    the model from the checkpoint stage's files (the same weights, so the same bytes)."""
    import concurrent.futures as cf
    import multiprocessing

    from ..export.onnx_export import export_graph
    from ..core.io_contract import GRAPH_FILES

    assert ctx.source is not None
    ckpt = ctx.layout.checkpoint_dir
    workers = export_workers(ctx.cfg, len(names)) if (ckpt / "config.json").is_file() else 0

    def here(i: int, graph: str) -> Any:
        assert ctx.source is not None
        return export_graph(ctx.source, graph, ctx.cfg, ctx.layout.root / GRAPH_FILES[graph],
                            checkpoint_sha256=ctx.checkpoint_sha256,
                            diagnostics=ctx.cfg.export.diagnostics and i == 0)

    if not workers:
        return {g: here(i, g) for i, g in enumerate(names)}
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {g: pool.submit(_export_in_child, str(ckpt), g, ctx.cfg,
                                  str(ctx.layout.root / GRAPH_FILES[g]), ctx.checkpoint_sha256)
                   for g in names[1:]}
        out = {names[0]: here(0, names[0])}
        for g, fut in futures.items():
            out[g] = fut.result()
    return out


def _export_in_child(checkpoint_dir: str, graph: str, cfg: BuildConfig, path: str,
                     checkpoint_sha256: str) -> Any:
    import torch

    from ..export.onnx_export import export_graph
    from ..model.checkpoint import load_source_checkpoint

    torch.set_num_threads(1)
    source = load_source_checkpoint(Path(checkpoint_dir))
    return export_graph(source, graph, cfg, Path(path), checkpoint_sha256=checkpoint_sha256)


def stage_optimize(ctx: BuildContext) -> StageResult:
    from ..export.optimize import optimize_stage
    return optimize_stage(ctx)


def stage_fp16(ctx: BuildContext) -> StageResult:
    from ..export.fp16 import fp16_stage
    return fp16_stage(ctx)


def stage_engine(ctx: BuildContext) -> StageResult:
    from ..deploy.tensorrt import engine_stage
    return engine_stage(ctx)


def stage_parity(ctx: BuildContext) -> StageResult:
    from ..verify.parity import parity_stage
    return parity_stage(ctx)


def stage_triton(ctx: BuildContext) -> StageResult:
    from ..deploy.triton.repository import triton_stage
    return triton_stage(ctx)


def engine_required(ctx: BuildContext) -> bool:
    """--require-engine / engine.require: then a missing or failed engine fails the build."""
    return ctx.require_engine


# name, function, required (a failure fails the build): a bool, or a function of the context
STAGES: list[tuple[str, StageFn, bool | Callable[[BuildContext], bool]]] = [
    ("checkpoint", stage_checkpoint, True),
    ("export", stage_export, True),
    ("optimize", stage_optimize, True),
    ("fp16", stage_fp16, False),
    ("engine", stage_engine, engine_required),
    ("parity", stage_parity, True),
    ("triton", stage_triton, True),
]

LOG_FILE = "build.log"


@dataclass
class BuildOutcome:
    out_dir: Path
    stages: dict[str, StageResult]
    ok: bool
    seconds: float
    manifest: Path
    failure: str = ""
    log: Path | None = None  # <out>.failed/build.log when a stage raised a bug's exception
    notes: list[str] = field(default_factory=list)  # e.g. an interrupted swap restored


def _versions() -> dict[str, str]:
    from ..export.onnx_export import versions
    return versions()


def resolve_out(out_dir: str | Path) -> Path:
    """``--out`` as an absolute path with a real name (``.``, ``..``, ``sub/..`` resolved)."""
    out = Path(out_dir).expanduser().resolve()
    if not out.name:
        raise ArtifactError(f"cannot build into {out}: choose a named folder for --out")
    return out


def failed_dir(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def is_build_folder(path: Path) -> bool:
    """A folder holding our manifest.json (a previous build, good or failed)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        data = read_json_object(manifest, ArtifactError, "manifest")
    except ArtifactError:
        return False
    return "manifest_version" in data and "artifacts" in data


def check_target(out: Path, force: bool = False) -> None:
    """Refuse, before anything is built, to replace what is not ours: a file or other non-folder
    (even with --force), or a non-empty folder without our manifest.json (unless --force)."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and cwd.is_relative_to(out):  # `--out .`: replaced from under the shell
        raise ArtifactError(f"--out {out} is (or contains) the current folder, which a build "
                            "replaces as a whole: name a folder outside it (e.g. --out ../NAME "
                            "from its parent)")
    for path, what in ((out, "--out"), (failed_dir(out), "the failed-build folder")):
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_dir():
            kind = "a symbolic link" if path.is_symlink() else (
                "a file" if path.is_file() else "not a folder")
            raise ArtifactError(f"{what} {path} exists and is {kind}: choose another path "
                                "(nothing was written)")
        if force or is_build_folder(path) or (path / LOG_FILE).is_file():
            continue
        if any(path.iterdir()):
            raise ArtifactError(f"{what} {path} is not empty and holds no build of hmu_export "
                                "(no manifest.json): choose an empty or new folder, or pass "
                                "--force to replace it and everything in it")


def estimate_memory(cfg: BuildConfig) -> tuple[int, str]:
    """Bytes a build may need at its peak (a deliberate over-estimate: the model, its checkpoint,
    export and ONNX Runtime copies, and activations of a few backends at the profile's max)."""
    m, p = cfg.model, cfg.profile
    d, f, z, v = m.d_model, m.d_ff, m.latent_dim, m.vocab_size
    heads = getattr(m, "heads", m.n_heads) or 1
    params = (3 * v * d + m.max_len * d + m.n_encoder_layers * (4 * d * d + 2 * d * f)
              + m.n_decoder_layers * (8 * d * d + 2 * d * f) + 3 * d * z + 3 * d * d)
    b, ls, lt = p.batch[2], p.src_len[2], p.tgt_len[2]
    acts = (b * (ls + lt) * (8 * d + f + 2 * z) + b * heads * (ls * ls + lt * lt + ls * lt)
            + 3 * b * lt * v)
    total = 4 * (8 * params + 8 * acts)
    return total, (f"~{params:.3g} parameters, ~{acts:.3g} activation values at the profile's "
                   f"max {b}x{ls}x{lt}")


def physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: BuildConfig) -> None:
    need, detail = estimate_memory(cfg)
    have = physical_memory()
    if have is not None and need > have:
        raise ConfigError(f"this model cannot be built here: it needs about {need / 2**30:.3g} "
                          f"GiB of memory ({detail}) and this machine has "
                          f"{have / 2**30:.3g} GiB; reduce model sizes or profile maxima")


def preflight(cfg: BuildConfig, out_dir: Path, force: bool = False) -> ModelSource:
    """User errors (output that is not ours or unwritable, a model too large for this machine,
    missing / corrupt / mismatched checkpoint) are reported here, before anything is written."""
    from ..model import sources

    out = resolve_out(out_dir)
    check_target(out, force)
    resolved = sources.resolve(cfg.model)
    cfg = replace(cfg, model=resolved).validate()
    check_memory(cfg)
    ensure_writable_dir(out.parent)
    source = sources.load(resolved)
    check_generation_options(cfg, source)
    return source


def model_generation(cfg: BuildConfig, source: ModelSource) -> GenerationConfig:
    """[generation] with what the model's own files fix: its start / end ids always, its
    decoding defaults (beams, token rules) where the config leaves a key at its default."""
    base = GenerationConfig()
    fixed = {k: v for k, v in source.generation_defaults().items()
             if k in ("bos_id", "eos_id") or getattr(cfg.generation, k) == getattr(base, k)}
    gen = replace(cfg.generation, **fixed)
    gen.validate(source.cfg, cfg.profile)
    return gen


def check_generation_options(cfg: BuildConfig, source: ModelSource) -> None:
    """Generation graphs only for a model whose own decoding settings every loop honours."""
    if cfg.generation.split_graphs and DECODER in source.graph_names():
        refusal = source.generation_options_refusal()
        if refusal:
            raise ConfigError(f"{refusal}: remove them, or set [generation] split_graphs = "
                              "false to build without generation graphs")


def recover_swap(dst: Path) -> str | None:
    """Finish or undo a swap that a kill interrupted (``_replace_dir`` renames ``dst`` to
    ``.<dst>.old``, then the staging folder to ``dst``). Call it under the output's lock."""
    old = dst.with_name(f".{dst.name}.old")
    if not old.exists() and not old.is_symlink():
        return None
    if old.is_symlink() or not old.is_dir():
        raise ArtifactError(f"{old} exists and is not a folder of a previous build: remove it")
    try:
        if dst.exists() or dst.is_symlink():  # both renames happened: only cleanup was cut
            shutil.rmtree(old)
            return None
        old.rename(dst)  # killed between the renames: the previous build comes back
    except OSError as exc:
        raise ArtifactError(f"cannot restore the previous build {old} to {dst}: "
                            f"{exc.strerror or exc}") from None
    return f"restored the previous build {dst} (an earlier build was interrupted replacing it)"


_HELD: set[Path] = set()  # outputs this process has locked (lock_output is re-entrant)


@contextlib.contextmanager
def lock_output(out: Path) -> Iterator[None]:
    """One build per output at a time: an exclusive lock on ``.<out>.lock`` beside it (a second
    build into it is refused at once with one line). Re-entrant within this process."""
    out = resolve_out(out)
    if out in _HELD:
        yield
        return
    ensure_writable_dir(out.parent)
    with exclusive_lock(out.parent / f".{out.name}.lock", f"the output {out}"):
        _HELD.add(out)
        try:
            yield
        finally:
            _HELD.discard(out)


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of builds that died (we hold the lock, so none is in use)."""
    for stale in out.parent.glob(f".{out.name}.staging*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _required(required: bool | Callable[[BuildContext], bool], ctx: BuildContext) -> bool:
    return required(ctx) if callable(required) else bool(required)


def run_build(cfg: BuildConfig, out_dir: Path, *, require_engine: bool = False,
              on_stage: Callable[[str, StageResult | None], None] | None = None,
              only: list[str] | None = None,
              model: "HMUTransformer | ModelSource | None" = None,
              force: bool = False) -> BuildOutcome:
    """Run the stages into a staging folder, then move it to ``out_dir`` if it succeeded.

    The output is locked (``.<out>.lock`` beside it) for the whole build: a second build into
    it is refused at once. Each build stages into its own ``.<out>.staging-*`` folder, which
    never outlives the build."""
    t0 = time.perf_counter()
    out_dir = resolve_out(out_dir)
    if model is None:
        model = preflight(cfg, out_dir, force)
    with lock_output(out_dir):
        notes = [n for n in (recover_swap(out_dir), recover_swap(failed_dir(out_dir))) if n]
        check_target(out_dir, force)
        _remove_stale_staging(out_dir)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-",
                                            dir=out_dir.parent))
            os.chmod(staging, 0o777 & ~_umask())
        except OSError as exc:
            raise ArtifactError(f"output folder {out_dir.parent} is not writable: "
                                f"{exc.strerror or exc}") from None
        try:
            outcome = _run_stages(cfg, out_dir, staging, model, require_engine, on_stage, only,
                                  t0)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    outcome.notes = notes
    return outcome


def _run_stages(cfg: BuildConfig, out_dir: Path, staging: Path,
                model: "HMUTransformer | ModelSource",
                require_engine: bool, on_stage: Callable[[str, StageResult | None], None] | None,
                only: list[str] | None, t0: float) -> BuildOutcome:
    source = as_source(cfg, model)
    check_generation_options(cfg, source)
    cfg = replace(cfg, model=source.cfg,  # resolved: sizes a source reads from its files
                  generation=model_generation(cfg, source))
    ctx = BuildContext(cfg, BuildLayout(staging), require_engine=require_engine or
                       cfg.engine.require, source=source)
    failure, log = "", None
    for name, fn, required in STAGES:
        if only is not None and name not in only:
            continue
        if on_stage:
            on_stage(name, None)
        s0 = time.perf_counter()
        bug = False
        try:
            result = fn(ctx)
        except HMUExportError as exc:
            result = StageResult(FAILED, reason=str(exc))
        except Exception as exc:  # a bug: keep the evidence in the failed build's build.log
            bug = True
            first = (str(exc).strip().splitlines() or [""])[0]
            write_text(staging / LOG_FILE, f"stage '{name}' raised an unexpected exception\n\n"
                                           + traceback.format_exc())
            log = failed_dir(out_dir) / LOG_FILE
            result = StageResult(FAILED, reason=f"unexpected {type(exc).__name__}"
                                                f"{': ' + first if first else ''} (a bug; "
                                                f"traceback in {LOG_FILE})")
        result.seconds = time.perf_counter() - s0
        ctx.stages[name] = result
        if on_stage:
            on_stage(name, result)
        if result.status == FAILED and (bug or _required(required, ctx)):
            failure = f"stage '{name}' failed: {result.reason}"
            break
    ok = not failure
    extra = {"name": cfg.model.name, "config": cfg.to_dict(),
             "contract": (ctx.contract or full_contract(cfg.model, cfg.export.diagnostics)
                          ).to_dict(),
             "checkpoint_sha256": ctx.checkpoint_sha256, "ok": ok,
             "build_seconds": round(time.perf_counter() - t0, 3)}
    extra.update({k: v for k, v in ctx.data.items() if k in ("parameters", "sensitive_nodes",
                                                              "engine", "parity", "graphs",
                                                              "graph_pins", "generation_parity",
                                                              "hmu_status")})
    write_manifest(staging, stages=ctx.stages, profile=cfg.profile.to_dict(),
                   versions=_versions(), extra=extra)
    final = out_dir if ok else failed_dir(out_dir)
    _replace_dir(staging, final)
    return BuildOutcome(final, ctx.stages, ok, time.perf_counter() - t0,
                        final / "manifest.json", failure, log)


def _replace_dir(src: Path, dst: Path) -> None:
    """Put ``src`` where ``dst`` is: ``dst`` -> ``.<dst>.old``, ``src`` -> ``dst``, drop the old.
    A failed second rename is rolled back at once; a kill between the renames is repaired by
    ``recover_swap`` on the next build (and reported by commands that read ``dst``)."""
    old = dst.with_name(f".{dst.name}.old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if dst.exists():
            dst.rename(old)
        try:
            src.rename(dst)
        except OSError:
            if old.exists() and not dst.exists():
                old.rename(dst)  # roll back: the previous build stays where it was
            raise
    except OSError as exc:
        raise ArtifactError(f"cannot move the build into {dst}: {exc.strerror or exc}") from None
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
