"""The one backend registry: every way to run a build, for parity, bench, generate and Triton.

A backend is one module of this package. At import it registers what it runs:

- ``@forward(order)``: a function ``(layout, cfg, model, contract, *, threads) -> [Backend]``
  listing named runners of the build's primary graph (parity and bench), each with its label,
  precision, device and whether it can run here (else why not);
- ``step(StepEntry(...))``: a named step backend for the generation loop (generate, generation
  parity and bench), with its precision, device and what it needs.

The registry imports every module of the package once, when first asked, so adding a backend
is one new module and nothing else. Forward entries come in ``order`` (the report order);
step names in theirs (the CLI's ``--backend`` choices).

``uses`` says which consumers want a forward entry: parity leaves out its own reference (torch
FP32), FP16 stand-ins when ``[parity] fp16 = false``, and GPU backends this machine lacks (bench
lists those as skipped, because its default set names them).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from ..core.config import BuildConfig
from ..core.errors import InputError
from ..core.io_contract import GraphContract
from ..core.layout import BuildLayout
from ..runners import Runner

if TYPE_CHECKING:
    from ..generate.stepper import Stepper
    from ..model.interface import ModelSource
    from ..model.transformer import HMUTransformer

#: the source model: the native HMUTransformer (its full graph, diagnostics included) or any
#: ModelSource (the graph module the contract names)
SourceModel = Union["HMUTransformer", "ModelSource"]

PARITY, BENCH = "parity", "bench"
EVERYWHERE = frozenset({PARITY, BENCH})
BENCH_ONLY = frozenset({BENCH})


@dataclass
class Backend:
    """One forward backend of one build, ready to make its Runner (or why it cannot)."""

    label: str  # unique in a report, e.g. "onnxruntime", "onnxruntime-fp16emu", "tensorrt"
    precision: str  # "fp32" | "fp16": selects the tolerance policy
    make: Callable[[], Runner] | None  # None when unavailable
    skip_reason: str = ""
    device: str = "cpu"  # "cpu" | "cuda": where it computes (bench rows say so)
    uses: frozenset[str] = EVERYWHERE

    @property
    def available(self) -> bool:
        return self.make is not None


ForwardFn = Callable[..., list[Backend]]


@dataclass(frozen=True)
class StepRequest:
    """What a step backend gets: the graphs' folder, the build config, runtime threads, and
    how to load the source model (torch backends)."""

    root: Path
    cfg: BuildConfig
    name: str
    threads: int
    load_source: Callable[[], Any] | None

    @property
    def layout(self) -> BuildLayout:
        return BuildLayout(self.root)

    def source(self) -> Any:
        if self.load_source is None:
            raise InputError(f"backend {self.name} needs the build's checkpoint")
        return self.load_source()


@dataclass(frozen=True)
class StepEntry:
    """A named step backend: declared capabilities and its factory."""

    name: str
    order: int  # place in the CLI's --backend choices
    precision: str  # fp32 | fp16
    device: str  # cpu | cuda
    needs: str  # what it runs on, for docs and error lines
    make: Callable[[StepRequest], "Stepper"]
    #: runs on ONNX Runtime's threads (the loop leaves a core for itself); torch ones do not
    ort_threads: bool = False


_FORWARD: list[tuple[int, ForwardFn]] = []
_STEP: dict[str, StepEntry] = {}
_LOADED = False


def forward(order: int) -> Callable[[ForwardFn], ForwardFn]:
    """Register a forward contributor; ``order`` places its entries in reports."""
    def deco(fn: ForwardFn) -> ForwardFn:
        _FORWARD.append((order, fn))
        return fn
    return deco


def step(entry: StepEntry) -> StepEntry:
    """Register a step backend under its name."""
    if entry.name in _STEP and _STEP[entry.name] is not entry:
        raise ValueError(f"step backend {entry.name!r} registered twice")
    _STEP[entry.name] = entry
    return entry


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    pkg = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "registry":
            importlib.import_module(f"{__package__}.{info.name}")


def discover_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                      contract: GraphContract, *, use: str | None = PARITY,
                      threads: int | None = None) -> list[Backend]:
    """Every forward backend of the build for ``use`` (``None``: all of them), in report
    order. ``threads`` sets ONNX Runtime's intra-op threads (None: its default)."""
    _load_all()
    found: list[Backend] = []
    for _, contribute in sorted(_FORWARD, key=lambda e: e[0]):
        found.extend(contribute(layout, cfg, model, contract, threads=threads))
    return [b for b in found if use is None or use in b.uses]


def step_entries() -> list[StepEntry]:
    _load_all()
    return sorted(_STEP.values(), key=lambda e: e.order)


def step_names() -> tuple[str, ...]:
    """Every step backend's name, in the CLI's order."""
    return tuple(e.name for e in step_entries())


def step_entry(name: str) -> StepEntry:
    names = step_names()
    if name not in names:
        raise InputError(f"unknown generation backend {name!r} (use {', '.join(names)})")
    return _STEP[name]


def make_stepper(root: Path, cfg: BuildConfig, backend: str, *, threads: int | None = None,
                 load_source: Callable[[], Any] | None = None) -> "Stepper":
    """A stepper over the graphs in ``root`` (any folder: the build stage uses its staging
    folder) or, for torch backends, over the source ``load_source()`` returns."""
    from ..model.sources import generation_refusal
    from ..runners.onnxruntime_runner import generation_threads

    entry = step_entry(backend)
    refusal = generation_refusal(cfg.model)
    if refusal:
        raise InputError(f"cannot generate: {refusal}")
    req = StepRequest(Path(root), cfg, backend, threads or generation_threads(), load_source)
    return entry.make(req)


def stepper_from_build(root: str | Path, backend: str, *, threads: int | None = None
                       ) -> tuple["Stepper", BuildConfig]:
    """(stepper, build config) for ``backend`` over a build folder."""
    from ..core.build_folder import open_build
    from ..model.checkpoint import load_build_source

    step_entry(backend)
    folder = open_build(root)
    return make_stepper(folder.layout.root, folder.cfg, backend, threads=threads,
                        load_source=lambda: load_build_source(folder)), folder.cfg
