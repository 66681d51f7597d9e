"""A build's ``checkpoint/`` for any model source: each source saves itself
(``ModelSource.save``), and the sources registry rebuilds it (``sources.load_saved``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import sources
from .weights import WEIGHTS_FILE, read_checkpoint_config

if TYPE_CHECKING:
    from ..core.build_folder import BuildFolder
    from .interface import ModelSource


def save_source_checkpoint(source: "ModelSource", folder: Path) -> tuple[Path, Path]:
    """A build's ``checkpoint/``: the source's weights (its own key names) and its resolved
    config, so later commands rebuild the same model with ``load_source_checkpoint``."""
    return source.save(folder)


def load_source_checkpoint(folder: Path) -> "ModelSource":
    """The model source saved in a build's ``checkpoint/`` (any source)."""
    cfg = read_checkpoint_config(folder)
    return sources.load_saved(cfg, folder / WEIGHTS_FILE)


def load_build_source(build: "BuildFolder") -> "ModelSource":
    """The model source of an opened build (from its checkpoint/)."""
    return load_source_checkpoint(build.layout.checkpoint_dir)
