"""Stage checkpoint: the source's weights and resolved config into checkpoint/."""
from __future__ import annotations

from ...core.fileio import sha256_file
from ...core.manifest import OK, StageResult
from ..context import BuildContext, as_source
from ..context import Stage


def stage_checkpoint(ctx: BuildContext) -> StageResult:
    from ...model.checkpoint import save_source_checkpoint
    from ...model.native import NativeSource

    source = ctx.source or as_source(ctx.cfg, ctx.model)
    ctx.source = source
    if isinstance(source, NativeSource):
        ctx.model = source.model
    weights, _ = save_source_checkpoint(source, ctx.layout.checkpoint_dir)
    if isinstance(source, NativeSource):
        _check_native_tokenizer(ctx)
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


def _check_native_tokenizer(ctx: BuildContext) -> None:
    """A native checkpoint's tokenizer must end sequences with the build's EOS (its ids were
    checked against the vocabulary when the source loaded)."""
    from ...model.tokenizer import TOKENIZER_DIR, check_tokenizer, tokenizer_files

    folder = ctx.layout.root / TOKENIZER_DIR
    if tokenizer_files(folder):
        check_tokenizer(folder, ctx.cfg.model.vocab_size, (ctx.cfg.generation.eos_id,))


STAGE = Stage("checkpoint", stage_checkpoint, True,
              reads=("config", "model source"),
              writes=("checkpoint/model.safetensors", "checkpoint/config.json",
                      "checkpoint/hf/ (the source's tokenizer, where it has one)"))
