"""Trains the demo model the paper's way, reproducibly from a seed, on a CPU.

Stage 1 trains the whole native HMUTransformer (HMU included) on the VAE's mean path
(noise 0, what generation uses by default): the decoder learns to read the HMU's output.
Stage 2 is the project's own ``finetune``: the base frozen, the HMU alone trained with sampled
noise N(0, 1) and the VAE's KL term, so that noisy generation (``--noise-scale``) still spells
numbers. Exact match on dev and test is measured after each stage with the project's
generator (greedy, torch backend).

``OUT/`` receives ``model/`` (the final checkpoint and tokenizer, what hmu_export/demo/model/
holds), ``stage1/`` (the base checkpoint and its loss log), ``stage2/`` (finetune's HMU weights,
data, log and loss curve), the dev and test JSONL and ``summary.json`` with every figure.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..core.config import BuildConfig, ModelConfig
from ..core.errors import ConfigError, HMUExportError
from ..core.fileio import write_json, write_text
from . import demo_data, demo_tokenizer
from .demo_eval import Accuracy, exact_match, model_generator


@dataclass(frozen=True)
class DemoOptions:
    steps: int = 2400  # stage 1
    batch_size: int = 96
    lr: float = 2e-3
    warmup: int = 150
    hmu_steps: int = 300  # stage 2 (finetune)
    hmu_batch_size: int = 64
    hmu_lr: float = 1e-3
    kl_weight: float = 0.01
    seed: int = 7  # model init (ModelConfig.seed), training order, stage-2 noise
    data_seed: int = demo_data.DATA_SEED  # the dev / test split (the committed sets')
    threads: int = 1  # one thread: the same numbers on any core count, and no contention
    eval_limit: int = 0  # > 0: evaluate on the first N of dev and of test only (quick runs)

    def validate(self) -> None:
        for key in ("steps", "batch_size", "hmu_steps", "hmu_batch_size", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got "
                                  f"{getattr(self, key)}")
        if self.warmup < 0 or self.eval_limit < 0:
            raise ConfigError("--warmup and --eval-limit must be >= 0")
        for key in ("lr", "hmu_lr"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                raise ConfigError(f"--{key.replace('_', '-')} must be a finite number > 0")


def demo_model_config(seed: int) -> ModelConfig:
    """The default architecture (ModelConfig's defaults: d_model 128, 2+2 layers, vocab 512),
    so the trained model is a drop-in for the embedded default."""
    return ModelConfig(seed=seed)


def lr_at(step: int, opts: DemoOptions) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def examples_of(tok: Any, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    src = demo_tokenizer.encode(tok, [s for s, _ in pairs])
    tgt = demo_tokenizer.encode(tok, [t for _, t in pairs])
    return list(zip(src, tgt))


def train_base(model: Any, tok: Any, sampler: demo_data.TrainSampler, opts: DemoOptions,
               on_step: Callable[[int, float], None] | None = None) -> list[dict[str, float]]:
    """Stage 1: every parameter, teacher-forced cross-entropy on the mean path."""
    import torch
    from torch.nn import functional as F

    from .finetune import IGNORE, make_batch

    cfg = model.cfg
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad = True
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=opts.lr, betas=(0.9, 0.98), eps=1e-9)
    model.train()
    history = []
    for step in range(opts.steps):
        lr = lr_at(step, opts)
        for group in opt.param_groups:
            group["lr"] = lr
        b = make_batch(examples_of(tok, sampler.pairs(opts.batch_size)), 1, cfg.pad_id)
        noise = torch.zeros(b.src_ids.shape[0], b.src_ids.shape[1], cfg.latent_dim)
        logits = model(b.src_ids, b.src_mask, b.tgt_in, noise)
        loss = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE)
        if not torch.isfinite(loss):
            raise HMUExportError(f"the loss became non-finite at step {step + 1}: lower --lr "
                                 f"(now {opts.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), "lr": lr})
        if on_step is not None:
            on_step(step + 1, float(loss.detach()))
    return history


def write_ids_jsonl(path: Path, examples: list[tuple[list[int], list[int]]]) -> Path:
    """finetune's data format: {"src": [ids], "tgt": [ids]} per line."""
    return write_text(path, "".join(json.dumps({"src": s, "tgt": t}) + "\n"
                                    for s, t in examples))


def _evaluate(model: Any, tok: Any, sets: dict[str, list[tuple[str, str]]],
              noise: tuple[float, ...] = (0.0,)) -> dict[str, Accuracy]:
    gen = model_generator(model)
    out = {}
    for name, pairs in sets.items():
        for scale in noise:
            key = name if scale == 0 else f"{name}@noise{scale:g}"
            out[key] = exact_match(gen, tok, pairs, noise_scale=scale)
    return out


@dataclass
class DemoResult:
    out: Path
    model_dir: Path
    summary: dict[str, Any]
    stage1_loss: list[float]


def check_out(out: Path) -> None:
    """--out is new, empty, or an earlier train-demo output (its summary.json): never a user's
    folder, whose files the run would replace."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder: choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise ConfigError(f"--out {out} is not empty and holds no train-demo output "
                          "(no summary.json): choose an empty or new folder")


def train_demo(out: Path, opts: DemoOptions = DemoOptions(),
               log: Callable[[str], None] = print, progress: bool = True) -> DemoResult:
    """Both stages into ``out`` (see the module docstring); returns the summary."""
    import torch

    from .finetune import FinetuneOptions, finetune
    from ..model.weights import load_checkpoint, save_checkpoint
    from ..model.transformer import HMUTransformer

    opts.validate()
    out = Path(out)
    check_out(out)
    started = time.perf_counter()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)

    split = demo_data.make_split(opts.data_seed)
    dev = demo_data.pairs_of(split.dev)
    test = demo_data.pairs_of(split.test)
    demo_data.write_pairs(out / "numbers-es.dev.jsonl", dev)
    demo_data.write_pairs(out / "numbers-es.test.jsonl", test)
    sets = {"dev": limit_pairs(dev, opts.eval_limit), "test": limit_pairs(test, opts.eval_limit)}
    vocab = demo_tokenizer.vocabulary(demo_tokenizer.task_words())
    tok = demo_tokenizer.build(vocab)
    mcfg = demo_model_config(opts.seed)
    if len(vocab) > mcfg.vocab_size:
        raise HMUExportError(f"the demo vocabulary ({len(vocab)}) exceeds model.vocab_size "
                             f"{mcfg.vocab_size}")
    log(f"data: split seed {opts.data_seed}, dev {len(dev)}, test {len(test)}, "
        f"vocabulary {len(vocab)} tokens")

    # ---- stage 1: the base encoder-decoder, HMU included, on the mean path
    model = HMUTransformer(mcfg)
    sampler = demo_data.TrainSampler(split, opts.seed)
    t0 = time.perf_counter()
    with _Bar(progress, "stage 1: base", opts.steps) as bar:
        history = train_base(model, tok, sampler, opts, on_step=bar.update)
    stage1_s = time.perf_counter() - t0
    stage1 = out / "stage1"
    weights, _ = save_checkpoint(model.eval(), stage1)
    demo_tokenizer.save(tok, stage1)
    write_text(stage1 / "train.log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    t0 = time.perf_counter()
    acc1 = _evaluate(model, tok, sets, noise=(0.0, 1.0))
    log(f"stage 1: {opts.steps} steps in {stage1_s:.0f} s, loss {history[0]['loss']:.3f} -> "
        f"{_tail_mean(history):.4f}; " + _accuracy_line(acc1))

    # ---- stage 2: the HMU alone on the frozen base, with the project's finetune
    stage2 = out / "stage2"
    fine_sampler = demo_data.TrainSampler(split, opts.seed + 1)
    train2 = write_ids_jsonl(stage2 / "train.jsonl",
                             examples_of(tok, fine_sampler.pairs(opts.hmu_steps
                                                                 * opts.hmu_batch_size)))
    dev2 = write_ids_jsonl(stage2 / "dev.jsonl", examples_of(tok, sets["dev"]))
    model_dir = out / "model"
    t0 = time.perf_counter()
    fine = finetune(BuildConfig(model=replace(mcfg, checkpoint=str(weights))), train2,
                    stage2 / "hmu.safetensors", eval_data=dev2,
                    options=FinetuneOptions(steps=opts.hmu_steps, lr=opts.hmu_lr,
                                            batch_size=opts.hmu_batch_size,
                                            kl_weight=opts.kl_weight, seed=opts.seed),
                    merge_into=model_dir, progress=progress)
    stage2_s = time.perf_counter() - t0
    demo_tokenizer.save(tok, model_dir)
    final = load_checkpoint(model_dir)
    acc2 = _evaluate(final, tok, sets, noise=(0.0, 1.0))
    log(f"stage 2: {opts.hmu_steps} HMU steps in {stage2_s:.0f} s, dev CE (mean path) "
        f"{fine.eval_before:.4f} -> {fine.eval_after:.4f}; " + _accuracy_line(acc2))

    total = time.perf_counter() - started
    weights_bytes = (model_dir / "model.safetensors").stat().st_size
    hmu_params, all_params = final.hmu_parameter_share()
    summary = {
        "options": asdict(opts), "seconds": {"stage1": round(stage1_s, 1),
                                             "stage2": round(stage2_s, 1),
                                             "total": round(total, 1)},
        "data": {"dev": len(dev), "test": len(test), "evaluated": {k: len(v) for k, v in
                                                                   sets.items()},
                 "split_seed": opts.data_seed, "vocabulary": len(vocab)},
        "model": {"config": asdict(final.cfg), "parameters": all_params,
                  "hmu_parameters": hmu_params, "weights_bytes": weights_bytes},
        "stage1": {"loss_first": history[0]["loss"], "loss_last": _tail_mean(history),
                   "accuracy": {k: v.to_dict() for k, v in acc1.items()}},
        "stage2": {"dev_ce_before": fine.eval_before, "dev_ce_after": fine.eval_after,
                   "accuracy": {k: v.to_dict() for k, v in acc2.items()}},
        "versions": _versions(),
    }
    write_json(out / "summary.json", summary)
    log(f"done in {total:.0f} s: {model_dir} ({weights_bytes / 1e6:.2f} MB weights)")
    return DemoResult(out, model_dir, summary, [r["loss"] for r in history])


def limit_pairs(pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """The first ``n`` pairs spread over the whole (sorted) set, or all of them."""
    if not n or n >= len(pairs):
        return pairs
    stride = len(pairs) / n
    return [pairs[int(i * stride)] for i in range(n)]


def _tail_mean(history: list[dict[str, float]], n: int = 50) -> float:
    tail = [r["loss"] for r in history[-n:]]
    return sum(tail) / len(tail)


def _accuracy_line(acc: dict[str, Accuracy]) -> str:
    return ", ".join(f"{k} {v.exact:.2%} ({v.correct}/{v.total})" for k, v in acc.items())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "num2words", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class _Bar:
    """A rich progress bar over the stage's steps, or nothing."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from ..commands import ui
            self.bar = ui.progress(transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, step: int, loss: float) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step,
                            description=f"{self.label}  loss {loss:.4f}")
