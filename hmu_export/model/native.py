"""The project's own HMUTransformer as a model source."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core.config import ModelConfig
from ..core.io_contract import DECODER, ENCODER, FULL, CacheLayout
from .interface import ModelSource
from .transformer import DiagnosticsWrapper, HMUTransformer


class _Full(nn.Module):
    """Full teacher-forced graph: (src_ids, src_mask, tgt_ids, noise) -> (logits,)."""

    def __init__(self, model: HMUTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask, tgt_ids, noise):  # type: ignore[no-untyped-def]
        return (self.model(src_ids, src_mask, tgt_ids, noise),)


class _Encoder(nn.Module):
    """Encoder + HMU graph: (src_ids, src_mask, noise) -> (memory, cross_key.0, cross_value.0,
    cross_key.1, ...), the order of io_contract.encoder_contract."""

    def __init__(self, model: HMUTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask, noise):  # type: ignore[no-untyped-def]
        memory, cross = self.model.encode_with_cache(src_ids, src_mask, noise)
        return (memory, *cross)


class _Decoder(nn.Module):
    """Decoder step graph: (tgt_ids, src_mask, positions, past_mask, cross_key.0,
    cross_value.0, ..., past_key.0,
    past_value.0, ...) -> (logits, present_key.0, present_value.0, ...), the order of
    io_contract.decoder_contract.

    ``forward`` has one named parameter per contract input (``cross_key_0``, ...), not
    ``*args``: torch.export then takes a flat ``dynamic_shapes`` tuple in contract order."""

    def __init__(self, model: HMUTransformer) -> None:
        super().__init__()
        self.model = model
        self.layers = model.cfg.n_decoder_layers

    def step(self, tgt_ids, src_mask, positions, past_mask, *kv):  # type: ignore[no-untyped-def]
        n = 2 * self.layers
        if len(kv) != 2 * n:
            raise TypeError(f"decoder step takes {2 * n} cache tensors, got {len(kv)}")
        logits, present = self.model.decode_step(tgt_ids, src_mask, list(kv[:n]), list(kv[n:]),
                                                 positions, past_mask)
        return (logits, *present)


def _decoder_class(layers: int) -> type[_Decoder]:
    """A _Decoder subclass whose forward spells out every cache input of ``layers`` layers."""
    names = [f"{kind}_{part}_{i}" for kind in ("cross", "past") for i in range(layers)
             for part in ("key", "value")]
    args = ", ".join(names)
    src = (f"def forward(self, tgt_ids, src_mask, positions, past_mask, {args}):\n"
           f"    return self.step(tgt_ids, src_mask, positions, past_mask, {args})\n")
    scope: dict = {}
    exec(src, scope)  # noqa: S102 - fixed template, names built from integers only
    return type(f"_Decoder{layers}", (_Decoder,), {"forward": scope["forward"]})


class NativeSource(ModelSource):
    source = "native"

    def __init__(self, cfg: ModelConfig, model: HMUTransformer | None = None) -> None:
        super().__init__(cfg)
        self.model = model if model is not None else HMUTransformer(cfg)

    def torch_module(self) -> nn.Module:
        return self.model

    def save(self, folder: Path) -> tuple[Path, Path]:
        from .tokenizer import TOKENIZER_DIR, copy_tokenizer
        from .weights import save_checkpoint
        saved = save_checkpoint(self.model, folder)
        # A tokenizer beside the checkpoint (the demo model's) travels with the build, where
        # `generate --text` and the Triton text models find it (as an hf folder's does).
        if self.cfg.checkpoint:
            copy_tokenizer(Path(self.cfg.checkpoint).parent, Path(folder) / TOKENIZER_DIR.name)
        return saved

    def cache_layout(self) -> CacheLayout:
        return CacheLayout(self.cfg.n_decoder_layers, self.cfg.heads,
                           self.cfg.d_model // self.cfg.heads)

    def module(self, graph: str, diagnostics: bool = False) -> nn.Module:
        if graph == FULL:
            return DiagnosticsWrapper(self.model) if diagnostics else _Full(self.model)
        if graph == ENCODER:
            return _Encoder(self.model)
        if graph == DECODER:
            return _decoder_class(self.cfg.n_decoder_layers)(self.model)
        raise KeyError(f"native source has no '{graph}' graph")


# ------------------------------------------------------------------ registry functions
def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """The native config names every size itself: nothing to read from files."""
    return cfg


def load_source(cfg: ModelConfig) -> NativeSource:
    from .weights import build_model
    source = NativeSource(cfg, build_model(cfg))
    if cfg.checkpoint:  # its tokenizer must fit the model: checked now, not at generate
        from .tokenizer import check_tokenizer, tokenizer_files
        folder = Path(cfg.checkpoint).parent
        if tokenizer_files(folder):
            check_tokenizer(folder, cfg.vocab_size, ())
    return source


def load_saved(cfg: ModelConfig, weights: Path) -> NativeSource:
    """The native source saved in a build's checkpoint/ (``cfg``: its config.json, read)."""
    from .weights import load_weights
    model = HMUTransformer(cfg)
    load_weights(model, Path(weights))
    return NativeSource(cfg, model.eval())


def reference_model(source: ModelSource) -> "HMUTransformer | ModelSource":
    """What parity and bench run as the PyTorch reference: the native HMUTransformer itself
    (its own path: ``forward_all``, diagnostics, analytic FLOPs), any other source as it is."""
    return source.model if isinstance(source, NativeSource) else source
