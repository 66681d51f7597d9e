"""The build folder's layout: one place that names every artifact a build can write."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("engines")


@dataclass(frozen=True)
class BuildLayout:
    root: Path

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    @property
    def onnx(self) -> Path:
        return self.root / "model.onnx"

    def graph(self, name: str, variant: str = "") -> Path:
        """``<stem>[.<variant>].onnx`` of a graph: variant "" (exported), "opt", "fp16"."""
        from .graph_kinds import GRAPH_FILES

        stem = GRAPH_FILES[name][:-len(".onnx")]
        return self.root / (f"{stem}.{variant}.onnx" if variant else f"{stem}.onnx")

    def split_graphs(self) -> list[str]:
        """Split generation graphs present in the folder (encoder + decoder step)."""
        from .io_contract import DECODER, ENCODER

        return [g for g in (ENCODER, DECODER) if self.graph(g).is_file()]

    @property
    def onnx_optimized(self) -> Path:
        """ONNX Runtime-optimized copy for the CPU path (fusions baked in)."""
        return self.root / "model.opt.onnx"

    @property
    def onnx_fp16(self) -> Path:
        """FP16 copy with the pinned nodes kept in FP32 (FP16 emulation on CPU)."""
        return self.root / "model.fp16.onnx"

    @property
    def engine(self) -> Path:
        return self.root / "model.fp16.plan"

    @property
    def timing_cache(self) -> Path:
        return self.root / "timing.cache"

    @property
    def recipe(self) -> Path:
        return self.root / "build_engine.sh"

    @property
    def parity_dir(self) -> Path:
        return self.root / "parity"

    @property
    def triton_dir(self) -> Path:
        return self.root / "triton"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"
