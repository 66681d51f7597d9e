"""HMU-only fine-tuning: the base model frozen, only the HMU (its VAE included) learns.

The paper's recipe: loss = cross-entropy of teacher-forced next-token prediction
(decoder input = [bos] + tgt[:-1], labels = tgt, padding ignored) + kl_weight * the VAE's mean
per-token KL(q(z|v) || N(0, I)) over the real (unpadded) source tokens. The noise is drawn
N(0, 1) every step and passed as the graphs' explicit ``noise`` input.

Works for every source whose model holds the project's ``HMU`` at ``.hmu`` (native, hf): the
loss goes through the source's own full graph (``source.module("full")``) and mu / logvar come
from a forward hook on the HMU's VAE, so what is trained is exactly what is exported.

Outputs, beside ``out``, committed as one unit (core.fileio.FileSet: all new, or all as they
were after a failure, a diverged run or a kill):
- ``out`` (safetensors): the HMU's state dict, keys ``vae.mu.*``, ``vae.logvar.*``,
  ``vae.decoder.*``, ``norm_input.*``, ``norm_latent.*``, ``gate_mlp.0.*``, ``fusion_proj.0.*``,
  ``fusion_proj.2.*`` (no prefix): what ``[model] hmu_checkpoint`` of an hf config reads.
  For the native source, ``merge_into`` writes a full native checkpoint folder
  (model.safetensors + config.json, the HMU's keys being ``hmu.<key>`` there).
- ``<stem>.log.jsonl``: one line per step (step, loss, ce, kl), then one ``eval`` line.
- ``<stem>.loss.png``: the loss curves.

The eval loss is the cross-entropy on the mean path (noise = 0, what generation uses by
default), with the original HMU (as loaded: seeded, or the config's hmu_checkpoint) and with
the trained one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.config import BuildConfig
from ..core.errors import ArtifactError, ConfigError, InputError, TrainingError
from ..core.fileio import (JOURNAL_SUFFIX, FileSet, exclusive_lock, json_lines,
                            recover_file_set)
from ..core.io_contract import FULL
from ..model.hmu import HMU

IGNORE = -100
#: the most steps one run may take (a typo such as 2**63 would otherwise never end)
MAX_STEPS = 10_000_000


@dataclass(frozen=True)
class FinetuneOptions:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    kl_weight: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"--steps must be in [1, {MAX_STEPS:,}], got {self.steps}")
        if not 0 <= self.seed < 2 ** 64:
            raise ConfigError(f"--seed must be in [0, 2**64), got {self.seed}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ConfigError(f"--kl-weight must be a finite number >= 0, got {self.kl_weight}")


@dataclass
class FinetuneResult:
    out: Path
    log: Path
    plot: Path | None
    eval_before: float
    eval_after: float
    eval_on: str  # "eval" or "train" (no --eval given)
    history: list[dict[str, float]] = field(default_factory=list)
    merged: Path | None = None


# ----------------------------------------------------------------------------- data
def _tokenizer(cfg: BuildConfig) -> Any | None:
    """Transformers' tokenizer for text lines when the model's folder ships one (a Transformers
    folder, or the folder of a checkpoint with a tokenizer.json beside it: the demo model's)."""
    from ..model.sources import entry
    from ..model.tokenizer import load_hf_tokenizer, tokenizer_files

    if entry(cfg.model).transformers_folder and cfg.model.path:
        folder = Path(cfg.model.path)
    elif cfg.model.checkpoint:
        folder = Path(cfg.model.checkpoint).parent
    else:
        return None
    return load_hf_tokenizer(folder) if tokenizer_files(folder) else None


#: the longest data line read (bytes, newline excluded): a longer one is an error, so a file
#: without line breaks (``--data /dev/zero``) never grows without bound
MAX_LINE_BYTES = 1 << 20


def read_examples(path: Path, vocab_size: int, max_len: int, tokenizer: Any | None = None
                  ) -> list[tuple[list[int], list[int]]]:
    """(src, tgt) id lists from a JSON-lines file ``{"src": ..., "tgt": ...}``; every problem
    is one InputError naming the file and line number. Blank lines are skipped. A source text
    follows ``generate --text``'s rule (model.tokenizer.source_text_problem)."""
    from ..model.tokenizer import source_text_problem, text_problem

    path = Path(path)
    out: list[tuple[list[int], list[int]]] = []
    for where, obj in json_lines(path, "data file", MAX_LINE_BYTES,
                                 " (is it a JSON-lines file?)"):
        if not isinstance(obj, dict) or "src" not in obj or "tgt" not in obj:
            raise InputError(f'{where}: expected an object {{"src": ..., "tgt": ...}}')
        unknown = sorted(set(obj) - {"src", "tgt"})
        if unknown:  # e.g. a per-example weight this trainer would silently ignore
            raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                             '(a line holds "src" and "tgt" only)')
        pair = []
        for key in ("src", "tgt"):
            value = obj[key]
            if isinstance(value, str):
                problem = source_text_problem(value) if key == "src" else text_problem(value)
                if problem:
                    raise InputError(f"{where}: {key} text {problem}")
                if tokenizer is None:
                    raise InputError(f"{where}: {key} is text, which needs a tokenizer "
                                     "(tokenizer.json in the hf model folder or beside the "
                                     "native checkpoint); give id lists instead")
                enc = (tokenizer(value) if key == "src" else tokenizer(text_target=value))
                value = [int(t) for t in enc["input_ids"]]
            elif not (isinstance(value, list)
                      and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
                raise InputError(f"{where}: {key} must be a list of token ids or a string")
            if not value:
                raise InputError(f"{where}: {key} is empty")
            bad = next((t for t in value if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InputError(f"{where}: {key} id {bad} is outside the vocabulary "
                                 f"[0, {vocab_size})")
            if len(value) > max_len:
                raise InputError(f"{where}: {key} has {len(value)} tokens, more than the "
                                 f"model's max_len {max_len}")
            pair.append(value)
        out.append((pair[0], pair[1]))
    if not out:
        raise InputError(f"data file {path} holds no examples")
    return out


@dataclass
class Batch:
    src_ids: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: torch.Tensor
    labels: torch.Tensor


def make_batch(examples: list[tuple[list[int], list[int]]], bos_id: int, pad_id: int) -> Batch:
    """Right-padded tensors; decoder input [bos] + tgt[:-1], labels tgt (padding = IGNORE)."""
    b = len(examples)
    ls = max(len(s) for s, _ in examples)
    lt = max(len(t) for _, t in examples)
    src = torch.full((b, ls), pad_id, dtype=torch.int64)
    mask = torch.zeros((b, ls), dtype=torch.int64)
    tgt_in = torch.full((b, lt), pad_id, dtype=torch.int64)
    labels = torch.full((b, lt), IGNORE, dtype=torch.int64)
    for i, (s, t) in enumerate(examples):
        src[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        tgt_in[i, :len(t)] = torch.tensor([bos_id] + t[:-1])
        labels[i, :len(t)] = torch.tensor(t)
    return Batch(src, mask, tgt_in, labels)


# ----------------------------------------------------------------------------- model
class _VAECapture:
    """Forward hook on the HMU's VAE: keeps the last (mu, logvar)."""

    def __init__(self, vae: nn.Module) -> None:
        self.mu: torch.Tensor | None = None
        self.logvar: torch.Tensor | None = None
        self.handle = vae.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        _, self.mu, self.logvar = output

    def close(self) -> None:
        self.handle.remove()


def _hmu_of(source: Any) -> HMU:
    if source.cfg.is_classifier:
        raise ConfigError("finetune trains a seq2seq model; this config is a classifier "
                          "(model.num_classes > 0)")
    if not source.cfg.use_hmu:
        raise ConfigError("model.use_hmu is false: there is no HMU to fine-tune")
    hmu = getattr(source.torch_module(), "hmu", None)
    if not isinstance(hmu, HMU):
        raise ConfigError(f'finetune supports the sources "native" and "hf"; source '
                          f'"{source.source}" has no trainable HMU at .hmu')
    return hmu


def _bos_id(cfg: BuildConfig, source: Any) -> int:
    return int(source.generation_defaults().get("bos_id", cfg.generation.bos_id))


def _ce(full: nn.Module, batch: Batch, noise: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed CE over real target tokens, their count)."""
    logits = full(batch.src_ids, batch.src_mask, batch.tgt_in, noise)[0]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(),
                         ignore_index=IGNORE, reduction="sum")
    return ce, int((batch.labels != IGNORE).sum())


@torch.no_grad()
def eval_ce(full: nn.Module, batches: list[Batch], latent_dim: int) -> float:
    """Token-weighted mean CE on the mean path (noise = 0)."""
    total, count = 0.0, 0
    for b in batches:
        noise = torch.zeros(b.src_ids.shape[0], b.src_ids.shape[1], latent_dim)
        ce, n = _ce(full, b, noise)
        total += float(ce)
        count += n
    return total / max(count, 1)


def _batches(examples: list[tuple[list[int], list[int]]], size: int, bos: int, pad: int
             ) -> list[Batch]:
    return [make_batch(examples[i:i + size], bos, pad) for i in range(0, len(examples), size)]


# ----------------------------------------------------------------------------- training
def finetune(cfg: BuildConfig, data: Path, out: Path, eval_data: Path | None = None,
             options: FinetuneOptions = FinetuneOptions(), merge_into: Path | None = None,
             progress: bool = True, plot: bool = True) -> FinetuneResult:
    """Train the HMU, then write its outputs as one unit (``_write_outputs``): the weights,
    the log, the plot and the merged checkpoint are all new, or (on any failure, a diverged
    run included) all as they were. One finetune per output at a time (a lock beside it)."""
    options.validate()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must name a .safetensors file, got {out}")
    if merge_into is not None and cfg.model.source != "native":
        raise ConfigError(f'--merge-into writes a native checkpoint; source "{cfg.model.source}" '
                          "reads the HMU from [model] hmu_checkpoint instead")
    if merge_into is not None and Path(merge_into).exists() and not Path(merge_into).is_dir():
        raise ConfigError(f"--merge-into {merge_into} exists and is not a folder")
    journal = _journal_name(out)
    files = _output_files(out, merge_into)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot write to {out.absolute().parent}: "
                            f"{exc.strerror or exc}") from None
    with exclusive_lock(out.absolute().parent / f".{out.name}.lock",
                        f"the finetune output {out}"):
        for folder in {f.absolute().parent for f in files.values() if f is not None}:
            recover_file_set(folder / journal)  # a commit a kill interrupted: finish it
        with FileSet(journal) as staged:
            for name, final in files.items():  # refuse unwritable places before training
                if final is not None:
                    staged.path(final)
            result = _train(cfg, data, eval_data, options, progress)
            return _write_outputs(result, staged, files, merge_into, plot)


def _journal_name(out: Path) -> str:
    return f".{out.name}{JOURNAL_SUFFIX}"


def _output_files(out: Path, merge_into: Path | None) -> dict[str, Path | None]:
    files: dict[str, Path | None] = {"weights": out, "log": _stem(out, ".log.jsonl"),
                                     "plot": _stem(out, ".loss.png"),
                                     "merged_weights": None, "merged_config": None}
    if merge_into is not None:
        from ..model.weights import CONFIG_FILE, WEIGHTS_FILE
        files["merged_weights"] = Path(merge_into) / WEIGHTS_FILE
        files["merged_config"] = Path(merge_into) / CONFIG_FILE
    return files


@dataclass
class _Trained:
    cfg: BuildConfig
    model: nn.Module
    hmu_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    summary: dict[str, Any]
    before: float
    after: float
    eval_on: str


def _diverged(when: str, what: str, options: FinetuneOptions) -> TrainingError:
    return TrainingError(f"training diverged {when}: {what} became non-finite (NaN "
                         f"or Inf); nothing was written and earlier outputs are kept; lower "
                         f"--lr (now {options.lr:g})")


def _train(cfg: BuildConfig, data: Path, eval_data: Path | None, options: FinetuneOptions,
           progress: bool) -> _Trained:
    from ..model import sources

    mcfg = sources.resolve(cfg.model)
    cfg = replace(cfg, model=mcfg)
    tok = _tokenizer(cfg)
    train = read_examples(Path(data), mcfg.vocab_size, mcfg.max_len, tok)
    evals = (read_examples(Path(eval_data), mcfg.vocab_size, mcfg.max_len, tok)
             if eval_data is not None else train)

    torch.manual_seed(options.seed)
    source = sources.load(mcfg)
    model = source.torch_module()
    hmu = _hmu_of(source)
    full = source.module(FULL)
    bos, pad = _bos_id(cfg, source), mcfg.pad_id

    # Freeze everything but the HMU, in every source alike.
    hmu_ids = {id(p) for p in hmu.parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in hmu_ids
    model.eval()  # no dropout in the frozen base; the HMU has none
    params = [p for p in hmu.parameters()]

    eval_batches = _batches(evals, options.batch_size, bos, pad)
    before = eval_ce(full, eval_batches, mcfg.latent_dim)

    gen = torch.Generator().manual_seed(options.seed)
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    capture = _VAECapture(hmu.vae)
    history: list[dict[str, float]] = []
    order: list[int] = []
    started = time.perf_counter()
    try:
        bar = _bar(progress)
        with bar:
            task = bar.add_task("finetune HMU", total=options.steps)
            for step in range(1, options.steps + 1):
                picked = []
                for _ in range(min(options.batch_size, len(train))):
                    if not order:
                        order = torch.randperm(len(train), generator=gen).tolist()
                    picked.append(train[order.pop()])
                b = make_batch(picked, bos, pad)
                noise = torch.randn(b.src_ids.shape[0], b.src_ids.shape[1], mcfg.latent_dim,
                                    generator=gen)
                ce_sum, n_tok = _ce(full, b, noise)
                ce = ce_sum / max(n_tok, 1)
                assert capture.mu is not None and capture.logvar is not None
                kl_tok = hmu.kl_divergence(capture.mu, capture.logvar)  # [B, Ls]
                m = b.src_mask.to(kl_tok.dtype)
                kl = (kl_tok * m).sum() / m.sum().clamp_min(1.0)
                loss = ce + options.kl_weight * kl
                if not torch.isfinite(loss):
                    raise _diverged(f"at step {step}", "the loss", options)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                try:
                    opt.step()
                except RuntimeError as exc:  # torch: lr x update overflows float32
                    if "overflow" not in str(exc):
                        raise
                    raise _diverged(f"at step {step}", "the optimizer's update",
                                    options) from None
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    raise _diverged(f"at step {step}", "the HMU's weights", options)
                rec = {"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()),
                       "kl": float(kl.detach())}
                history.append(rec)
                bar.update(task, advance=1,
                           description=f"finetune HMU  loss {rec['loss']:.3f}  ce "
                                       f"{rec['ce']:.3f}  kl {rec['kl']:.3f}")
    finally:
        capture.close()
    seconds = time.perf_counter() - started

    after = eval_ce(full, eval_batches, mcfg.latent_dim)
    if not math.isfinite(after):
        raise _diverged(f"after step {options.steps}", "the eval loss of the trained HMU",
                             options)
    trained = {k: v.detach().contiguous().clone() for k, v in hmu.state_dict().items()}
    eval_on = "eval" if eval_data is not None else "train"
    summary = {"eval": {"on": eval_on, "examples": len(evals), "ce_original_hmu": before,
                        "ce_trained_hmu": after},
               "steps": options.steps, "lr": options.lr, "batch_size": options.batch_size,
               "kl_weight": options.kl_weight, "seed": options.seed, "seconds": seconds,
               "source": mcfg.source, "train_examples": len(train)}
    return _Trained(cfg, model, trained, history, summary, before, after, eval_on)


def _write_outputs(t: _Trained, staged: FileSet, files: dict[str, Path | None],
                   merge_into: Path | None, plot: bool) -> FinetuneResult:
    """Every output written into its staging copy, then all committed together."""
    from safetensors.torch import save_file

    from ..model.weights import write_checkpoint_config, write_checkpoint_weights

    mcfg = t.cfg.model
    out, log, png = files["weights"], files["log"], files["plot"]
    assert out is not None and log is not None and png is not None
    try:
        save_file(t.hmu_state, str(staged.path(out)),
                  metadata={"format": "pt", "producer": "hmu_export finetune",
                            "d_model": str(mcfg.d_model), "latent_dim": str(mcfg.latent_dim)})
        merged = None
        if merge_into is not None:
            mw, mc = files["merged_weights"], files["merged_config"]
            assert mw is not None and mc is not None
            write_checkpoint_weights(t.model, staged.path(mw))  # type: ignore[arg-type]
            write_checkpoint_config(t.model, staged.path(mc))  # type: ignore[arg-type]
            merged = mw
        staged.path(log).write_text("".join(json.dumps(r) + "\n" for r in t.history)
                                    + json.dumps(t.summary) + "\n", encoding="utf-8")
        drew = _plot(t.history, staged.path(png), t.before, t.after) if plot else None
        if drew is None:  # an old plot beside new weights would describe another run
            staged.remove(png)
    except OSError as exc:  # a full disk, an I/O error: nothing was put in place
        raise ArtifactError(f"cannot write the finetune outputs beside {out}: "
                            f"{exc.strerror or exc}; earlier outputs are kept") from None
    staged.commit()
    return FinetuneResult(out, log, png if drew is not None else None, t.before, t.after,
                          t.eval_on, t.history, merged)


def _stem(out: Path, suffix: str) -> Path:
    return out.with_name(out.name[:-len(".safetensors")] + suffix)


class _NoBar:
    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        return None


def _bar(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from ..commands import ui
    return ui.progress(transient=False)


def _plot(history: list[dict[str, float]], target: Path, before: float, after: float
          ) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is optional: the log still has every number
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in history]
    for key in ("loss", "ce", "kl"):
        ax.plot(steps, [r[key] for r in history], label=key, linewidth=1)
    ax.axhline(before, color="grey", linestyle="--", linewidth=0.8,
               label=f"eval CE, original HMU ({before:.3f})")
    ax.axhline(after, color="black", linestyle=":", linewidth=0.8,
               label=f"eval CE, trained HMU ({after:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("HMU-only fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(target), format="png")
    return target
