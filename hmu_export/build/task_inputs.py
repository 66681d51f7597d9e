"""What the stages that measure task accuracy (quantize, parity) need from the build in
progress: its tokenizer and a generator per step backend over the staging folder."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..core.errors import ConfigError

if TYPE_CHECKING:
    from ..model.tokenizer import Tokenizer
    from .context import BuildContext


def task_tokenizer(ctx: "BuildContext") -> "Tokenizer | None":
    """The build's tokenizer when the config names a task set (None when it names none); a
    task set without a tokenizer to read it is a config error."""
    return build_tokenizer(ctx, "task.path", ctx.cfg.task.path)


def build_tokenizer(ctx: "BuildContext", key: str, path: str) -> "Tokenizer | None":
    """The build's tokenizer to read the texts of ``path`` (config key ``key``); None when
    ``path`` is empty, a config error when the model has no tokenizer."""
    from ..model.tokenizer import TOKENIZER_DIR, Tokenizer, load_hf_tokenizer, tokenizer_files

    if not path:
        return None
    folder = ctx.layout.root / TOKENIZER_DIR
    if not tokenizer_files(folder):
        raise ConfigError(f"{key} is set ({path}) but the model has no tokenizer to read it "
                          "(a native checkpoint carries one in its folder, an hf folder its own)")
    return Tokenizer(load_hf_tokenizer(folder))


def task_generators(ctx: "BuildContext") -> Callable[[str], Any]:
    """Step backend name -> Generator over the staging folder (torch: the build's source)."""
    from ..backends.registry import make_stepper
    from ..generate.generator import Generator

    source = ctx.source

    def make(name: str) -> Generator:
        return Generator(make_stepper(ctx.layout.root, ctx.cfg, name,
                                      load_source=lambda: source), ctx.cfg)
    return make
