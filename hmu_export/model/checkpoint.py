"""A build's ``checkpoint/`` for any model source: each source saves itself
(``ModelSource.save``), and the sources registry rebuilds it (``sources.load_saved``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..core.config import ModelConfig, build_section
from ..core.errors import CheckpointError, ConfigError
from ..core.fileio import read_json_object
from . import sources
from .weights import CONFIG_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    from ..core.build_folder import BuildFolder
    from .interface import ModelSource


def save_source_checkpoint(source: "ModelSource", folder: Path) -> tuple[Path, Path]:
    """A build's ``checkpoint/``: the source's weights (its own key names) and its resolved
    config, so later commands rebuild the same model with ``load_source_checkpoint``."""
    return source.save(folder)


def load_source_checkpoint(folder: Path) -> "ModelSource":
    """The model source saved in a build's ``checkpoint/`` (any source)."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"checkpoint config not found: {config}")
    data = read_json_object(config, CheckpointError, "checkpoint config")
    try:
        cfg = build_section(ModelConfig, data, "model")
        cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint config {config}: {exc}") from None
    return sources.load_saved(cfg, folder / WEIGHTS_FILE)


def load_build_source(build: "BuildFolder") -> "ModelSource":
    """The model source of an opened build (from its checkpoint/)."""
    return load_source_checkpoint(build.layout.checkpoint_dir)
