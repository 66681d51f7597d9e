"""What a build's stages share: the context handed from stage to stage, and the ``Stage``
declaration each module of ``build/stages/`` makes (its name, what it reads and writes, whether
its failure fails the build)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple
from ..core.layout import BuildLayout
from ..core.config import BuildConfig
from ..core.io_contract import GraphContract
from ..core.manifest import StageResult
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


class Stage(NamedTuple):
    """One build stage, declared by its module in ``build/stages/`` (a plain
    ``(name, run, required)`` tuple is one too: tests insert such stages)."""

    name: str
    run: StageFn
    #: a failure fails the build: a bool, or a function of the context (--require-engine)
    required: bool | Callable[[BuildContext], bool] = True
    reads: tuple[str, ...] = ()  # build files / context fields it needs
    writes: tuple[str, ...] = ()  # build files it writes (every one lands in the manifest)

    def is_required(self, ctx: BuildContext) -> bool:
        return self.required(ctx) if callable(self.required) else bool(self.required)


def as_source(cfg: BuildConfig, model: "HMUTransformer | ModelSource | None") -> ModelSource:
    """The build's model source: given, wrapped (a native HMUTransformer), or loaded."""
    from ..model import sources
    from ..model.native import NativeSource

    if isinstance(model, ModelSource):
        return model
    if model is not None:
        return NativeSource(cfg.model, model)
    return sources.load(cfg.model)
