"""The demo task trained into a tiny Transformers T5: the Hugging Face twin of the demo model.

Same data, split and tokenizer as the native model (hmu_export/train/demo_data.py,
demo_tokenizer.py), a plain T5 (no HMU: Transformers, Optimum and CTranslate2 run it as it
is; ``[model] source = "hf"`` inserts the HMU). T5 conventions: the decoder starts from the pad
token (id 0), EOS is ``</s>`` (id 2). The folder is what ``save_pretrained`` writes, plus the
tokenizer (a PreTrainedTokenizerFast over tokenizer.json), generation_config.json and
``training.json`` with the figures (test accuracy with ``model.generate``, greedy).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.errors import ConfigError, HMUExportError
from ..core.fileio import write_json
from . import demo_data, demo_tokenizer

EVAL_BATCH = 256
MAX_NEW_TOKENS = 24  # the longest target has 14 words + EOS


@dataclass(frozen=True)
class T5Options:
    steps: int = 4000
    batch_size: int = 96
    lr: float = 2e-3
    warmup: int = 150
    seed: int = 7
    data_seed: int = demo_data.DATA_SEED
    threads: int = 1
    eval_limit: int = 0
    d_model: int = 128
    d_ff: int = 256
    layers: int = 2  # encoder and decoder each
    heads: int = 4

    def validate(self) -> None:
        for key in ("steps", "batch_size", "threads", "d_model", "d_ff", "layers", "heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.d_model % self.heads:
            raise ConfigError(f"heads ({self.heads}) must divide d_model ({self.d_model})")


@dataclass
class T5Result:
    folder: Path
    summary: dict[str, Any]
    losses: list[float]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise HMUExportError("the T5 twin needs transformers: pip install "
                             "'hmu-export[hf,train]'") from None
    return transformers


def t5_config(opts: T5Options, vocab_size: int) -> Any:
    tf = _transformers()
    cfg = tf.T5Config(vocab_size=vocab_size, d_model=opts.d_model, d_kv=opts.d_model // opts.heads,
                      d_ff=opts.d_ff, num_layers=opts.layers, num_decoder_layers=opts.layers,
                      num_heads=opts.heads, relative_attention_num_buckets=64,
                      relative_attention_max_distance=64, dropout_rate=0.0,
                      feed_forward_proj="relu", tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    cfg.architectures = ["T5ForConditionalGeneration"]
    return cfg


def _tensors(tok: Any, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """input_ids / attention_mask / labels (padding -100), right-padded."""
    import torch

    src = demo_tokenizer.encode(tok, [s for s, _ in pairs])
    tgt = demo_tokenizer.encode(tok, [t for _, t in pairs])
    ls, lt = max(map(len, src)), max(map(len, tgt))
    ids = torch.zeros((len(pairs), ls), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(pairs), lt), -100, dtype=torch.int64)
    for i, (s, t) in enumerate(zip(src, tgt)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, :len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def t5_accuracy(model: Any, tok: Any, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Exact match of Transformers' ``generate`` (greedy) over ``pairs``, per digit count."""
    import torch

    model.eval()
    correct, by, misses = 0, {}, []
    for i in range(0, len(pairs), EVAL_BATCH):
        chunk = pairs[i:i + EVAL_BATCH]
        t = _tensors(tok, chunk)
        with torch.inference_mode():
            out = model.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                 do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS)
        texts = tok.decode_batch(out.tolist(), skip_special_tokens=True)
        for (src, want), got in zip(chunk, texts):
            ok = got.strip() == want
            correct += ok
            cell = by.setdefault(str(len(src)), [0, 0])
            cell[0] += ok
            cell[1] += 1
            if not ok and len(misses) < 10:
                misses.append([src, want, got])
    return {"exact": round(correct / len(pairs), 6), "correct": correct, "total": len(pairs),
            "by_digits": dict(sorted(by.items(), key=lambda kv: int(kv[0]))),
            "misses": misses}


def train_t5(out: Path, opts: T5Options = T5Options(), log: Callable[[str], None] = print
             ) -> T5Result:
    """Train, evaluate on dev and test, save the folder into ``out``."""
    import torch

    from .demo_trainer import limit_pairs

    opts.validate()
    tf = _transformers()
    out = Path(out)
    started = time.perf_counter()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    split = demo_data.make_split(opts.data_seed)
    dev = limit_pairs(demo_data.pairs_of(split.dev), opts.eval_limit)
    test = limit_pairs(demo_data.pairs_of(split.test), opts.eval_limit)
    vocab = demo_tokenizer.vocabulary(demo_tokenizer.task_words())
    tok = demo_tokenizer.build(vocab)
    model = tf.T5ForConditionalGeneration(t5_config(opts, len(vocab)))
    sampler = demo_data.TrainSampler(split, opts.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                               {"params": rest, "weight_decay": 0.0}],
                              lr=opts.lr, betas=(0.9, 0.98), eps=1e-9)
    model.train()
    losses: list[float] = []
    for step in range(opts.steps):
        lr = _lr(step, opts)
        for group in optim.param_groups:
            group["lr"] = lr
        loss = model(**_tensors(tok, sampler.pairs(opts.batch_size))).loss
        if not torch.isfinite(loss):
            raise HMUExportError(f"the loss became non-finite at step {step + 1}: lower --lr")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 500 == 0:
            log(f"T5 step {step + 1}/{opts.steps}: loss {sum(losses[-50:]) / 50:.4f}")
    train_s = time.perf_counter() - started
    model.eval()
    acc = {"dev": t5_accuracy(model, tok, dev), "test": t5_accuracy(model, tok, test)}
    log(f"T5: {opts.steps} steps in {train_s:.0f} s; dev {acc['dev']['exact']:.2%}, test "
        f"{acc['test']['exact']:.2%} (Transformers generate, greedy)")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=demo_tokenizer.PAD,
                                      eos_token=demo_tokenizer.EOS, unk_token=demo_tokenizer.UNK,
                                      bos_token=demo_tokenizer.BOS,
                                      model_max_length=demo_tokenizer.MAX_LENGTH)
    fast.save_pretrained(str(out))
    portable_tokenizer_config(out / "tokenizer_config.json")
    tf.GenerationConfig(decoder_start_token_id=0, eos_token_id=2, pad_token_id=0,
                        max_new_tokens=MAX_NEW_TOKENS).save_pretrained(str(out))
    weights = out / "model.safetensors"
    summary = {"options": asdict(opts), "seconds": round(time.perf_counter() - started, 1),
               "train_seconds": round(train_s, 1),
               "parameters": sum(p.numel() for p in model.parameters()),
               "weights_bytes": weights.stat().st_size if weights.is_file() else None,
               "loss_first": losses[0], "loss_last": sum(losses[-50:]) / len(losses[-50:]),
               "accuracy": acc, "evaluated_with": "transformers generate, greedy, "
                                                  f"max_new_tokens {MAX_NEW_TOKENS}",
               "versions": {"transformers": tf.__version__, "torch": torch.__version__}}
    write_json(out / "training.json", summary)
    return T5Result(out, summary, losses)


def _lr(step: int, opts: T5Options) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train_t5_hmu(folder: Path, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
                 kl_weight: float = 0.01, seed: int = 7, eval_limit: int = 0,
                 log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Stage 2 of the twin, the paper's way: an HMU inserted after the trained T5's encoder
    (``[model] source = "hf"``) and fine-tuned alone on the frozen T5 with the project's
    ``finetune`` (sampled noise, KL term), into ``folder/hmu.safetensors``. The build then
    reads it as ``hmu_checkpoint`` (examples/t5-numbers-es/build.toml)."""
    from ..core.config import BuildConfig, ModelConfig
    from .demo_trainer import examples_of, limit_pairs, write_ids_jsonl
    from .finetune import FinetuneOptions, finetune

    folder = Path(folder)
    split = demo_data.make_split(demo_data.DATA_SEED)
    tok = demo_tokenizer.load(folder)
    sampler = demo_data.TrainSampler(split, seed + 1)
    work = folder / "hmu-train"
    train = write_ids_jsonl(work / "train.jsonl",
                            examples_of(tok, sampler.pairs(steps * batch_size)))
    dev = write_ids_jsonl(work / "dev.jsonl",
                          examples_of(tok, limit_pairs(demo_data.pairs_of(split.dev), eval_limit)))
    t0 = time.perf_counter()
    cfg = BuildConfig(model=ModelConfig(source="hf", path=str(folder))).validate()
    fine = finetune(cfg, train, folder / "hmu.safetensors", eval_data=dev,
                    options=FinetuneOptions(steps=steps, lr=lr, batch_size=batch_size,
                                            kl_weight=kl_weight, seed=seed),
                    progress=progress)
    seconds = time.perf_counter() - t0
    import shutil
    shutil.rmtree(work, ignore_errors=True)  # regenerated from the seed; not part of the model
    log(f"T5 HMU: {steps} steps in {seconds:.0f} s, dev CE (mean path) {fine.eval_before:.4f} "
        f"(seeded HMU) -> {fine.eval_after:.4f}")
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight,
            "seconds": round(seconds, 1), "dev_ce_seeded_hmu": fine.eval_before,
            "dev_ce_trained_hmu": fine.eval_after}


def portable_tokenizer_config(path: Path) -> None:
    """Transformers 5 names the class ``TokenizersBackend``, which Transformers 4 (what Optimum
    pins) cannot load; ``PreTrainedTokenizerFast`` over the same tokenizer.json loads in both."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
