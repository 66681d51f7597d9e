"""Build configuration: dataclasses, TOML loading and validation.

Every key has a default, so an empty file (or no file) builds the embedded default model.
Errors name the offending field as ``section.key`` so a user can fix the file without reading code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from ..shipped.token_rules import TokenRules


SOURCES = ("native", "reference", "hf")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the encoder -> HMU -> decoder Transformer."""

    name: str = "hmu-default"
    # Where the weights and architecture come from (hmu_export/model/sources.py):
    # "native" (this project's model), "reference" (the paper author's code), "hf" (Transformers).
    source: str = "native"
    vocab_size: int = 512
    d_model: int = 128
    n_heads: int = 0  # 0 = d_model // 32, the rule of the paper's reference runs
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 256
    latent_dim: int = 64  # the paper's reference default is d_model // 2
    max_len: int = 128
    dropout: float = 0.0
    seed: int = 7
    use_hmu: bool = True  # False puts an identity where the HMU stands (overhead baselines)
    pad_id: int = 0
    # Scales the seeded weights: random small weights hide FP16 overflow, so FP16 budgets are
    # also measured on a model with realistic (large) activations.
    init_scale: float = 1.0
    checkpoint: str = ""  # safetensors (or weights-only .pt) to export instead of a seeded model
    path: str = ""  # source "hf": a local save_pretrained folder
    hmu_checkpoint: str = ""  # source "hf": trained HMU weights (safetensors); empty = seeded
    hmu_position: str = "after_encoder"  # source "reference": after_encoder | after_decoder
    num_classes: int = 0  # > 0: a classifier (class_logits) instead of a seq2seq model
    pool: str = "mean"  # classifier pooling: "mean" (all positions, as the reference) | "masked_mean"
    # Weights the model recomputes on load, so a checkpoint may leave them out (e.g. the
    # sinusoidal position table of a Hugging Face model saved without it). Every other weight
    # must be in the checkpoint: a missing, unexpected or wrongly shaped key stops the build.
    # Entries are key names or fnmatch patterns ("model.*.embed_positions.weight").
    derived_keys: tuple[str, ...] = ()

    #: the fields holding paths: relative ones are relative to the TOML file (load_config)
    PATH_FIELDS: typing.ClassVar[tuple[str, ...]] = ("checkpoint", "path", "hmu_checkpoint")

    @property
    def heads(self) -> int:
        """Attention heads, with 0 resolved to the reference runs' rule d_model // 32."""
        return self.n_heads or max(1, self.d_model // 32)

    @property
    def is_classifier(self) -> bool:
        return self.num_classes > 0

    def validate(self) -> None:
        positive = ("vocab_size", "d_model", "n_encoder_layers", "d_ff", "latent_dim",
                    "max_len")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.n_decoder_layers < 1:
            raise ConfigError(f"model.n_decoder_layers must be >= 1, got {self.n_decoder_layers}")
        if self.n_heads < 0:
            raise ConfigError(f"model.n_heads must be >= 0 (0 = d_model // 32), got {self.n_heads}")
        # Other sources read d_model from their files and check heads against it themselves
        # (before resolution d_model is still the default, which would name the wrong size).
        if self.source == "native" and self.d_model % self.heads:
            raise ConfigError(
                f"model.n_heads ({self.heads}) must divide model.d_model ({self.d_model})")
        if self.source not in SOURCES:
            raise ConfigError(f"model.source must be one of {', '.join(SOURCES)}, got "
                              f"{self.source!r}")
        if self.hmu_position not in ("after_encoder", "after_decoder"):
            raise ConfigError("model.hmu_position must be after_encoder or after_decoder, got "
                              f"{self.hmu_position!r}")
        if self.pool not in ("mean", "masked_mean"):
            raise ConfigError(f"model.pool must be mean or masked_mean, got {self.pool!r}")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.seed < 2 ** 64:
            raise ConfigError(f"model.seed must be in [0, 2**64), got {self.seed}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"model.pad_id must be in [0, vocab_size), got {self.pad_id}")
        if self.init_scale <= 0:
            raise ConfigError(f"model.init_scale must be > 0, got {self.init_scale}")
        for i, key in enumerate(self.derived_keys):
            if not key or not key.isprintable() or len(key) > 500:
                raise ConfigError(f"model.derived_keys[{i}] must be a key name or pattern "
                                  f"(printable, 1..500 characters), got {key[:80]!r}")
        if (not self.name or any(c in self.name for c in "/\\") or self.name.startswith(".")
                or not self.name.isprintable() or len(self.name) > 100
                or self.name != self.name.strip()):
            raise ConfigError("model.name must be a plain folder name (printable, no '/' or "
                              "'\\', no leading '.' or surrounding spaces, at most 100 "
                              f"characters), got {self.name[:120]!r}")


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of one dynamic axis (a TensorRT optimization-profile triple)."""

    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    def contains(self, n: int) -> bool:
        return self.min <= n <= self.max


@dataclass(frozen=True)
class ProfileConfig:
    """The shape envelope the artifacts promise to serve.

    ``batch``, ``src_len``, ``tgt_len`` bound the full graph; ``past_len`` (cached tokens, min 0)
    and ``new_len`` (tokens fed in one decoder step) bound the decoder-step graph. Left out,
    the two generation axes follow ``tgt_len``: past 0..max-1, new 1..max with opt 1 (one token
    per step).
    """

    batch: tuple[int, int, int] = (1, 4, 8)
    src_len: tuple[int, int, int] = (1, 64, 128)
    tgt_len: tuple[int, int, int] = (1, 32, 64)
    past_len: tuple[int, int, int] | None = None
    new_len: tuple[int, int, int] | None = None

    AXES: typing.ClassVar[tuple[str, ...]] = ("batch", "src_len", "tgt_len")
    ALL_AXES: typing.ClassVar[tuple[str, ...]] = ("batch", "src_len", "tgt_len", "past_len",
                                                  "new_len")

    def __post_init__(self) -> None:
        lo, opt, hi = self.tgt_len
        if self.past_len is None:
            object.__setattr__(self, "past_len", (0, min(max(opt - 1, 0), hi - 1), hi - 1))
        if self.new_len is None:
            object.__setattr__(self, "new_len", (1, 1, hi))

    def axis(self, name: str) -> ShapeRange:
        return ShapeRange(*getattr(self, name))

    def validate(self, section: str = "profile", max_len: int | None = None) -> None:
        for name in self.ALL_AXES:
            lo, opt, hi = getattr(self, name)
            floor = 0 if name == "past_len" else 1
            if lo < floor:
                raise ConfigError(f"{section}.{name}: min must be >= {floor}, got {lo}")
            if lo > opt:
                raise ConfigError(f"{section}.{name}: min ({lo}) > opt ({opt})")
            if opt > hi:
                raise ConfigError(f"{section}.{name}: opt ({opt}) > max ({hi})")
        if max_len is not None:
            for name in ("src_len", "tgt_len", "new_len"):
                if getattr(self, name)[2] > max_len:
                    raise ConfigError(
                        f"{section}.{name}: max ({getattr(self, name)[2]}) exceeds "
                        f"model.max_len ({max_len})")
            if self.past_len[2] + self.new_len[0] > max_len:  # type: ignore[index]
                raise ConfigError(f"{section}.past_len: max ({self.past_len[2]}) + new_len min "  # type: ignore[index]
                                  f"({self.new_len[0]}) exceeds model.max_len ({max_len})")  # type: ignore[index]

    def to_dict(self) -> dict[str, list[int]]:
        return {name: list(getattr(self, name)) for name in self.ALL_AXES}

    def contains(self, batch: int, src_len: int, tgt_len: int) -> bool:
        return all(self.axis(n).contains(v) for n, v in zip(self.AXES, (batch, src_len, tgt_len)))

    def contains_sizes(self, sizes: typing.Mapping[str, int]) -> bool:
        """Whether every named axis size (any of ALL_AXES) lies in its range."""
        return all(self.axis(n).contains(v) for n, v in sizes.items())


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    # Adds encoder_out / hmu_gate / hmu_out outputs for per-stage parity (diagnostic graph).
    diagnostics: bool = False
    # Saves an ONNX Runtime-optimized copy (fusions) next to model.onnx for the CPU path.
    optimize: bool = True
    # Processes that export the other graphs while the main one exports model.onnx
    # (0 = one per spare core; 1 or more caps it; set 1 on a busy machine).
    workers: int = 0

    def validate(self) -> None:
        if not 18 <= self.opset <= 20:
            raise ConfigError(f"export.opset must be 18, 19 or 20, got {self.opset}")
        if self.workers < 0:
            raise ConfigError(f"export.workers must be >= 0 (0 = one per spare core), got "
                              f"{self.workers}")


@dataclass(frozen=True)
class ParityConfig:
    seed: int = 0
    noise_scale: float = 1.0  # std of the shared noise fed to every backend (temperature)
    fp16: bool = True  # add FP16-emulation rows to the grid
    extra_shapes: tuple[tuple[int, int, int], ...] = ()  # [B, Ls, Lt] rows added to the grid
    # Override the FP32 logits max-abs tolerance (the policy's default is 1e-4).
    fp32_max_abs: float = 1e-4
    # ... and the FP16 one (the policy's 0.5); its relative bound, cosine and top-1 stay.
    fp16_max_abs: float = 0.5
    #: FP16 judged on the task set too (where the build has one): exact-match drop (points)
    #: of the FP16 backends against the PyTorch FP32 model
    fp16_max_exact_match_drop: float = 0.5

    def validate(self) -> None:
        if not 0 <= self.seed < 2 ** 64:
            raise ConfigError(f"parity.seed must be in [0, 2**64), got {self.seed}")
        if self.noise_scale < 0:
            raise ConfigError(f"parity.noise_scale must be >= 0, got {self.noise_scale}")
        if self.fp32_max_abs <= 0:
            raise ConfigError(f"parity.fp32_max_abs must be > 0, got {self.fp32_max_abs}")
        if self.fp16_max_abs <= 0:
            raise ConfigError(f"parity.fp16_max_abs must be > 0, got {self.fp16_max_abs}")
        if not 0 <= self.fp16_max_exact_match_drop <= 100:
            raise ConfigError("parity.fp16_max_exact_match_drop must be in [0, 100] (points), "
                              f"got {self.fp16_max_exact_match_drop}")
        for s in self.extra_shapes:
            if len(s) != 3 or min(s) < 1:
                raise ConfigError(f"parity.extra_shapes: each entry is [B, Ls, Lt] >= 1, got {s}")


@dataclass(frozen=True)
class Int8Config:
    """The quantized CPU graphs (int8 weights, int4 weight-only) and the quality they must keep."""

    enabled: bool = True  # write *.int8.onnx (per-channel int8 weights; activations: mode)
    int4: bool = True  # also *.int4.onnx (MatMulNBits, weight-only)
    keep_hmu: bool = True  # the HMU's MatMuls stay FP32 (its nodes are the FP16 pins too)
    keep_lm_head: bool = True  # the output projection stays FP32 (every logit goes through it)
    exclude: tuple[str, ...] = ()  # more node names (or "prefix/") kept FP32
    reduce_range: str = "auto"  # auto (7-bit weights unless the CPU has VNNI) | on | off
    int4_block_size: int = 32
    int4_accuracy_level: int = 4  # MatMulNBits: 4 = int8 compute of the activations
    #: quality budget: exact-match drop (points) vs FP32 on the task set; over it the stage
    #: fails and the quantized graphs are not shipped
    max_exact_match_drop: float = 0.5
    #: how *.int8.onnx quantizes activations: "dynamic" (at run time, per call: a row's tokens
    #: then depend on the other rows of its batch), "static" (QDQ: fixed scales calibrated on
    #: real inputs: batch-invariant) or "auto" (static where the build has calibration data,
    #: ``calibration`` or ``[task] dev``, else dynamic; docs/int8.md)
    mode: str = "auto"
    #: static: JSONL of task-set lines whose sources calibrate (relative to the TOML); empty =
    #: ``[task] dev``, else random in-profile feeds. Never the judged set by default.
    calibration: str = ""
    calibration_method: str = "minmax"  # minmax | entropy | percentile | distribution
    calibration_samples: int = 256  # source examples, generated greedily with the FP32 graphs
    calibration_percentile: float = 99.999  # method "percentile" only
    activation_type: str = "quint8"  # quint8 (x86: u8 x s8 kernels) | qint8 (symmetric)
    #: static: ORT's quant_pre_process (symbolic shape inference + graph optimization) first
    pre_process: bool = False
    #: static: also quantize MatMul / Gemm outputs (QLinearMatMul); off = their outputs stay
    #: FP32 (one rounding less, MatMulIntegerToFloat kernels)
    quantize_outputs: bool = False

    PATH_FIELDS: typing.ClassVar[tuple[str, ...]] = ("calibration",)
    MODES: typing.ClassVar[tuple[str, ...]] = ("auto", "dynamic", "static")
    CALIBRATION_METHODS: typing.ClassVar[tuple[str, ...]] = ("minmax", "entropy", "percentile",
                                                             "distribution")
    ACTIVATION_TYPES: typing.ClassVar[tuple[str, ...]] = ("quint8", "qint8")

    def validate(self) -> None:
        for key, allowed in (("mode", self.MODES), ("calibration_method",
                                                    self.CALIBRATION_METHODS),
                             ("activation_type", self.ACTIVATION_TYPES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"int8.{key} must be {', '.join(allowed[:-1])} or "
                                  f"{allowed[-1]}, got {getattr(self, key)!r}")
        if not 1 <= self.calibration_samples <= 100_000:
            raise ConfigError("int8.calibration_samples must be in [1, 100000], got "
                              f"{self.calibration_samples}")
        if not 50.0 < self.calibration_percentile <= 100.0:
            raise ConfigError("int8.calibration_percentile must be in (50, 100], got "
                              f"{self.calibration_percentile}")
        if self.reduce_range not in ("auto", "on", "off"):
            raise ConfigError(f"int8.reduce_range must be auto, on or off, got {self.reduce_range!r}")
        if self.int4_block_size < 16 or self.int4_block_size & (self.int4_block_size - 1):
            raise ConfigError("int8.int4_block_size must be a power of two >= 16, got "
                              f"{self.int4_block_size}")
        if self.int4_accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError("int8.int4_accuracy_level must be 0..4, got "
                              f"{self.int4_accuracy_level}")
        if not (0 <= self.max_exact_match_drop <= 100):
            raise ConfigError("int8.max_exact_match_drop must be in [0, 100] (points), got "
                              f"{self.max_exact_match_drop}")
        for name in self.exclude:
            if not name.strip():
                raise ConfigError("int8.exclude holds an empty node name")


@dataclass(frozen=True)
class EngineConfig:
    """TensorRT engine options (used where TensorRT exists; the recipe is always written)."""

    fp16: bool = True
    workspace_mib: int = 4096
    builder_optimization_level: int = 3
    # Extra optimization profiles; each lies inside [profile]. The [profile] one is always first.
    extra_profiles: tuple[ProfileConfig, ...] = ()
    pin_softmax: bool = False
    #: more nodes kept FP32 in FP16 builds: node names, or "scope/" for every compute node under
    #: a module path (e.g. "encoder/": docs/fp16.md measured it on the 2x-activation model)
    fp32_pins: tuple[str, ...] = ()
    version_compatible: bool = False
    hardware_compatibility: str = "none"  # none | ampere_plus | same_compute_capability
    require: bool = False  # a missing TensorRT/GPU fails the build instead of skipping

    def validate(self, profile: ProfileConfig) -> None:
        if self.workspace_mib < 1:
            raise ConfigError(f"engine.workspace_mib must be >= 1, got {self.workspace_mib}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ConfigError("engine.builder_optimization_level must be 0..5, got "
                              f"{self.builder_optimization_level}")
        if any(not p.strip() or p.strip() != p for p in self.fp32_pins):
            raise ConfigError(f"engine.fp32_pins: node names or 'scope/' prefixes without "
                              f"surrounding spaces, got {list(self.fp32_pins)}")
        if self.hardware_compatibility not in ("none", "ampere_plus", "same_compute_capability"):
            raise ConfigError("engine.hardware_compatibility must be none, ampere_plus or "
                              f"same_compute_capability, got {self.hardware_compatibility!r}")
        for i, p in enumerate(self.extra_profiles):
            p.validate(f"engine.extra_profiles[{i}]")
            for name in ProfileConfig.ALL_AXES:
                lo, _, hi = getattr(p, name)
                plo, _, phi = getattr(profile, name)
                if lo < plo or hi > phi:
                    raise ConfigError(f"engine.extra_profiles[{i}].{name} [{lo}, {hi}] lies "
                                      f"outside profile.{name} [{plo}, {phi}]")


#: model instances per Triton model: each holds its own sessions (memory), so a value past
#: this is a typo, not a deployment
MAX_INSTANCES = 256


#: precisions a Triton generation model can run: "fp32" the exported encoder / decoder graphs,
#: the others the quantize stage's ``*.int8.onnx`` / ``*.int4.onnx``
GENERATION_PRECISIONS = ("fp32", "int8", "int4")
AUTO = "auto"


@dataclass(frozen=True)
class TritonConfig:
    enabled: bool = True
    max_queue_delay_us: int = 100
    instance_count: int = 1
    #: generation models to serve, one pair per precision: ["auto"] = fp32 plus every quantized
    #: variant the build shipped (a variant the quantize stage removed over its quality budget
    #: gets none); or a list of fp32 / int8 / int4 (one named but not shipped is skipped, and
    #: the skip recorded in the triton stage's notes)
    generation_precisions: tuple[str, ...] = (AUTO,)

    def validate(self, int8: "Int8Config | None" = None) -> None:
        if self.max_queue_delay_us < 0:
            raise ConfigError("triton.max_queue_delay_us must be >= 0")
        if not 1 <= self.instance_count <= MAX_INSTANCES:
            raise ConfigError(f"triton.instance_count must be in [1, {MAX_INSTANCES}], got "
                              f"{self.instance_count}")
        self._validate_precisions(int8 or Int8Config())

    def _validate_precisions(self, int8: "Int8Config") -> None:
        p, key = self.generation_precisions, "triton.generation_precisions"
        if p == (AUTO,):
            return
        known = ", ".join(GENERATION_PRECISIONS)
        if not p:
            raise ConfigError(f"{key} is empty: list some of {known}, or [\"{AUTO}\"]")
        for v in p:
            if v not in GENERATION_PRECISIONS:
                extra = f" (\"{AUTO}\" stands alone)" if v == AUTO else ""
                raise ConfigError(f"{key}: unknown precision {v!r}{extra}; known: {known}, or "
                                  f"[\"{AUTO}\"]")
        dup = sorted({v for v in p if p.count(v) > 1})
        if dup:
            raise ConfigError(f"{key} names {dup[0]!r} twice")
        if ("int8" in p or "int4" in p) and not int8.enabled:
            raise ConfigError(f"{key} names {'int8' if 'int8' in p else 'int4'}, but "
                              "int8.enabled = false writes no quantized graphs")
        if "int4" in p and not int8.int4:
            raise ConfigError(f"{key} names int4, but int8.int4 = false writes no int4 graphs")


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults of the generation loop (hmu_export/generate/generator.py); CLI flags override them."""

    bos_id: int = 1
    eos_id: int = 2
    max_new_tokens: int = 0  # 0 = 32, capped by the profile's tgt_len max
    # HMU noise temperature for generation: 0 = the VAE's mean path (deterministic).
    noise_scale: float = 0.0
    split_graphs: bool = True  # export encoder.onnx + decoder.onnx (KV cache) beside model.onnx
    # Defaults of a request's decoding (what Transformers' generation_config.json holds for an
    # hf source); every loop (Python, Triton, C++) honours them.
    strategy: str = "greedy"  # greedy | sample | beam
    num_beams: int = 4  # beam width when strategy = "beam"
    length_penalty: float = 1.0
    early_stopping: bool = False
    temperature: float = 1.0  # sampling
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    # Token rules (hmu_export/shipped/token_rules.py, Transformers' semantics); neutral by default.
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    min_new_tokens: int = 0
    forced_bos_id: int = -1  # -1 = off
    forced_eos_id: int = -1  # -1 = off
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()

    def token_rules(self) -> "TokenRules":
        from ..shipped.token_rules import TokenRules
        return TokenRules.from_mapping(dataclasses.asdict(self))

    def new_tokens(self, profile: ProfileConfig) -> int:
        """Tokens a generation may add: BOS plus the generated ones fill the decoder positions."""
        return self.max_new_tokens or min(32, profile.tgt_len[2])

    def validate(self, model: ModelConfig, profile: ProfileConfig) -> None:
        for key in ("bos_id", "eos_id"):
            v = getattr(self, key)
            if not 0 <= v < model.vocab_size:
                raise ConfigError(f"generation.{key} must be in [0, vocab_size "
                                  f"{model.vocab_size}), got {v}")
        if self.max_new_tokens and not 1 <= self.max_new_tokens <= profile.tgt_len[2]:
            raise ConfigError(f"generation.max_new_tokens must be in [1, profile.tgt_len max = "
                              f"{profile.tgt_len[2]}], got {self.max_new_tokens}")
        # The request schema every entry point shares (CLI, Python API, Triton parameters).
        from ..shipped import request_options as ro

        values = {k: getattr(self, k) for k in ("strategy", "num_beams", "length_penalty",
                                                "early_stopping", "temperature", "top_k",
                                                "top_p", "noise_scale")}
        try:
            ro.validate(values, batch_max=profile.batch[2])
        except ro.OptionError as exc:
            raise ConfigError(f"generation.{exc}") from None
        for problem in self.token_rules().problems(model.vocab_size):
            raise ConfigError(f"generation.{problem}")


@dataclass(frozen=True)
class TaskConfig:
    """A task set the build's model should solve (JSON lines of source / target texts): parity
    adds exact-match accuracy on it for every backend and precision, and the quantize stage
    judges int8 / int4 by it. Needs a tokenizer in the build (``generate --text``'s)."""

    path: str = ""  # the JSONL; relative to the TOML file; empty = no task accuracy
    #: a held-out split of the same task, never judged: static int8 calibrates on it
    dev: str = ""
    limit: int = 0  # evaluate the first N examples only (0 = all)
    #: the noise sweep (the HMU's controlled variation): accuracy and distinct outputs per
    #: input at each noise scale, ``noise_draws`` noise seeds on the first ``noise_limit``
    noise_scales: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    noise_draws: int = 4
    noise_limit: int = 200

    PATH_FIELDS: typing.ClassVar[tuple[str, ...]] = ("path", "dev")

    def validate(self) -> None:
        if self.limit < 0:
            raise ConfigError(f"task.limit must be >= 0 (0 = all), got {self.limit}")
        if not 1 <= self.noise_draws <= 64:
            raise ConfigError(f"task.noise_draws must be in [1, 64], got {self.noise_draws}")
        if self.noise_limit < 0:
            raise ConfigError(f"task.noise_limit must be >= 0 (0 = no sweep), got "
                              f"{self.noise_limit}")
        if len(self.noise_scales) > 16:
            raise ConfigError("task.noise_scales holds more than 16 scales")
        for i, s in enumerate(self.noise_scales):
            if not 0.0 <= s <= 100.0:
                raise ConfigError(f"task.noise_scales[{i}] must be in [0, 100], got {s}")


@dataclass(frozen=True)
class BuildConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    int8: Int8Config = field(default_factory=Int8Config)
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> "BuildConfig":
        self.model.validate()
        self.profile.validate(max_len=self.model.max_len)
        self.export.validate()
        self.parity.validate()
        self.engine.validate(self.profile)
        self.triton.validate(self.int8)
        self.generation.validate(self.model, self.profile)
        self.int8.validate()
        self.task.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(x) for x in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert lists to tuples / dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {type(value).__name__}")
        return build_section(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} entries (min, opt, max), "
                              f"got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} has the wrong type ({type(value).__name__})")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not -1.7976931348623157e308 <= value <= 1.7976931348623157e308:  # NaN, inf, 1e400
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def coerce_field(cls: Any, key: str, value: Any, where: str) -> Any:
    """``value`` checked against the type of field ``key`` of config dataclass ``cls`` (lists
    become tuples); a one-line ConfigError naming ``where`` otherwise. For values that come from
    other files (a model's generation_config.json) and must meet the TOML's types."""
    hints = typing.get_type_hints(cls)
    if key not in hints:
        raise ConfigError(f"unknown key '{where}'")
    return _coerce(value, hints[key], where)


def build_section(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key '{path}' (known: {known})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> BuildConfig:
    """Validated config from a plain dict (as parsed from TOML or JSON)."""
    return build_section(BuildConfig, data, "").validate()


def load_config(path: str | Path | None) -> BuildConfig:
    """The trained demo model (``demo_config``) when ``path`` is None, else the TOML file's
    config (whose missing keys take the dataclasses' defaults: a seeded model)."""
    if path is None:
        return demo_config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer literal longer than Python converts (4300 digits)
        raise ConfigError(f"config file {p} holds a value Python cannot read: "
                          f"{str(exc).split(':')[0]}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} nests arrays or tables too deeply") from None
    cfg = config_from_dict(data)
    return dataclasses.replace(cfg, model=resolve_paths(cfg.model, p.parent),
                               task=resolve_paths(cfg.task, p.parent),
                               int8=resolve_paths(cfg.int8, p.parent))


def demo_config() -> BuildConfig:
    """The embedded default: the trained demo model shipped in ``hmu_export/demo/model``
    (Spanish numbers to words, docs/demo-model.md) with its test set as the build's task. Its
    architecture is ModelConfig's defaults, so only the weights, the tokenizer's special ids
    and the task differ from a seeded build."""
    from .. import demo

    return BuildConfig(
        model=ModelConfig(checkpoint=str(demo.CHECKPOINT)),
        # A trained model's logits span ~35 (random ones ~10): the absolute bounds scale with
        # them; the relative ones, cosine, top-1 and the task accuracy do not move.
        parity=ParityConfig(fp32_max_abs=DEMO_FP32_MAX_ABS, fp16_max_abs=DEMO_FP16_MAX_ABS),
        task=TaskConfig(path=str(demo.TEST_SET), dev=str(demo.DEV_SET))).validate()


#: the demo's absolute logit bounds (docs/demo-model.md: measured worst FP32 2.7e-4, i.e.
#: 7.9e-6 of the logit range; FP16 0.68, 0.019 of it)
DEMO_FP32_MAX_ABS = 1e-3
DEMO_FP16_MAX_ABS = 1.5


_Section = typing.TypeVar("_Section", ModelConfig, TaskConfig, Int8Config)


def resolve_paths(section: _Section, base: Path) -> _Section:
    """Every path field of ``section`` (its ``PATH_FIELDS``) made absolute: ``~`` is the
    home folder, and a relative path is relative to ``base`` (the TOML file's folder), wherever
    the command runs, as other tools read their config files."""
    fixed = {}
    for key in section.PATH_FIELDS:
        value = getattr(section, key)
        if value:
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = Path(base).absolute() / path
            fixed[key] = os.path.normpath(path)
    return dataclasses.replace(section, **fixed)


def parse_shapes(text: str, sizes: int | None = 3) -> list[tuple[int, ...]]:
    """``"1x8x4,2x16x8"`` -> [(1, 8, 4), (2, 16, 8)] (B x Ls x Lt); ``sizes=None`` takes any
    number of sizes per shape (bench: one per axis of the build's graph, checked there)."""
    form = ("expected BxLSxLT with positive integers, e.g. 2x16x8" if sizes == 3 else
            "expected sizes with positive integers joined by x, e.g. 2x16x8 (B x Ls x Lt) or "
            "2x16 (B x Ls)")
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.lower().split("x")
        if (sizes is not None and len(parts) != sizes) or \
                not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"bad shape '{item}': {form}")
        shapes.append(tuple(int(p) for p in parts))
    if not shapes:
        raise ConfigError("no shapes given: expected BxLSxLT[,BxLSxLT...]" if sizes == 3 else
                          "no shapes given: expected BxLSxLT[,...] (BxLS for a classifier)")
    return shapes
