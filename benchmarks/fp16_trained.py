"""FP16 budget on a *trained* model: random small weights hide FP16 trouble (issue 3).

Trains the default-architecture model (``ModelConfig()`` defaults) on a synthetic seq2seq task,
fine-tunes the HMU alone (the paper's recipe: ``freeze_all_but_hmu``, CE + beta * KL), saves the
checkpoint, builds it through the real pipeline (``run_build`` with ``model.checkpoint``) and
prints, per parity backend, the worst logits error over the grid, next to the activation
magnitudes of the trained and the random (seeded) model.

Task ("stride-2 copy"): source = 1..128 random tokens over 64 content symbols (ids 2..65),
target = the source's tokens at even positions (1..64 tokens: the profile's maxima), teacher
forcing with ``tgt_ids = [BOS] + target[:-1]``, padded rows masked; a curriculum of short
sources (<= 32) first. It needs both content and position (cross-attention must learn a 2:1
alignment), so attention is not near-uniform as in a random model. With all 510 symbols the
model barely leaves chance in this budget (each token seen ~once a step; measured: 1.2% token
accuracy after 600 steps), hence the 64. The parity suite still feeds random ids over the
whole vocabulary: the trained LM head pushes unused ids down, which widens the logit range
(as in a real LM).

CPU only, torch on 2 threads; about 2-4 minutes for training plus ~20 s for the build.
Seeded: the same command prints the same figures on the same machine and library versions.

    PYTHONPATH=. python benchmarks/fp16_trained.py [--out /tmp/hmu-trained] [--steps 1000]
        [--hmu-steps 150] [--beta 0.01] [--symbols 64]

Not a test (too slow for CI): docs/fp16.md records its figures ("Trained model").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hmu_export.core.config import BuildConfig, ModelConfig
from hmu_export.core.io_contract import make_feeds
from hmu_export.model import HMU, HMUTransformer, save_checkpoint
from hmu_export.core.grid import derive_grid
from hmu_export.build.pipeline import run_build
from hmu_export.core.tolerance import FP16, FP32

BOS = 1
FIRST_TOKEN = 2  # 0 = pad, 1 = BOS; content tokens are 2..vocab-1
BACKENDS = ("onnxruntime", "onnxruntime-opt", "onnxruntime-fp16emu", "torch-fp16")


# ----------------------------------------------------------------------------- data
@dataclass
class Batch:
    src: torch.Tensor  # [B, Ls] int64, pad 0
    mask: torch.Tensor  # [B, Ls] int64
    tgt_in: torch.Tensor  # [B, Lt] int64: BOS + target[:-1], pad 0
    tgt_out: torch.Tensor  # [B, Lt] int64: target, -100 where padded


def make_batch(cfg: ModelConfig, batch: int, max_src: int, gen: torch.Generator,
               symbols: int = 0) -> Batch:
    """Random sources of random lengths 1..max_src over ``symbols`` content tokens (0: the
    whole vocabulary); target = the tokens at even positions."""
    lens = torch.randint(1, max_src + 1, (batch,), generator=gen)
    ls = int(lens.max())
    lt = (ls + 1) // 2
    top = cfg.vocab_size if symbols <= 0 else min(cfg.vocab_size, FIRST_TOKEN + symbols)
    src = torch.randint(FIRST_TOKEN, top, (batch, ls), generator=gen)
    pos = torch.arange(ls)
    mask = (pos[None, :] < lens[:, None]).long()
    src = src * mask  # pad id 0
    tgt = src[:, 0::2]  # [B, lt]
    tgt_len = (lens + 1) // 2
    tgt_valid = torch.arange(lt)[None, :] < tgt_len[:, None]
    tgt_out = torch.where(tgt_valid, tgt, torch.full_like(tgt, -100))
    tgt_in = torch.cat([torch.full((batch, 1), BOS), tgt[:, :-1]], dim=1) * torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), tgt_valid[:, 1:].long()], dim=1)
    return Batch(src, mask, tgt_in, tgt_out)


# ----------------------------------------------------------------------------- training
def hmu_forward(model: HMUTransformer, b: Batch, noise: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the per-token KL (sampled z when ``noise`` is None), for training."""
    v = model.encode(b.src, b.mask)
    assert isinstance(model.hmu, HMU)
    tr = model.hmu.trace(v, noise)
    logits = model.decode(tr.out, b.mask, b.tgt_in)
    kl = HMU.kl_divergence(tr.mu, tr.logvar)  # [B, Ls]
    kl_mean = (kl * b.mask).sum() / b.mask.sum()
    return logits, kl_mean


def ce_loss(logits: torch.Tensor, b: Batch) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.tgt_out.reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def evaluate(model: HMUTransformer, batches: list[Batch], noise_std: float, seed: int
             ) -> dict[str, float]:
    """Teacher-forced token accuracy and whole-sequence accuracy on held-out batches."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = total = seq_ok = seqs = 0
    loss_sum = 0.0
    for b in batches:
        noise = torch.randn(*b.src.shape, model.cfg.latent_dim, generator=gen) * noise_std
        logits, _ = hmu_forward(model, b, noise)
        loss_sum += float(ce_loss(logits, b))
        valid = b.tgt_out != -100
        hit = (logits.argmax(-1) == b.tgt_out) & valid
        correct += int(hit.sum())
        total += int(valid.sum())
        seq_ok += int(((hit | ~valid).all(dim=1)).sum())
        seqs += b.src.shape[0]
    model.train()
    return {"loss": loss_sum / len(batches), "token_acc": correct / total,
            "seq_acc": seq_ok / seqs}


def train(model: HMUTransformer, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed)
    held_gen = torch.Generator().manual_seed(args.seed + 1000)  # disjoint stream: held out
    cfg = model.cfg
    held = [make_batch(cfg, 64, args.max_src, held_gen, args.symbols) for _ in range(4)]
    log: dict[str, Any] = {"phase1": [], "phase2": []}
    model.train()

    # Phase 1: the whole model, CE only, z sampled (noise=None) as in training.
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(
        0.1, 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        # Curriculum: short sequences first (the 2:1 alignment is learnt there, fast), then
        # lengths up to the profile's maximum.
        max_src = args.short if step <= args.short_steps else args.max_src
        b = make_batch(cfg, args.batch, max_src, gen, args.symbols)
        logits, _ = hmu_forward(model, b, None)
        loss = ce_loss(logits, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            ev = evaluate(model, held, 1.0, args.seed)
            ev.update(step=step, train_loss=loss.item(), seconds=time.perf_counter() - t0)
            log["phase1"].append(ev)
            print(f"[train] step {step:4d}  train CE {loss.item():.3f}  held-out CE "
                  f"{ev['loss']:.3f}  token acc {ev['token_acc']:.3f}  seq acc "
                  f"{ev['seq_acc']:.3f}  ({ev['seconds']:.0f} s)", flush=True)

    # Phase 2: the paper's recipe, HMU alone: CE + beta * KL, z sampled.
    model.freeze_all_but_hmu()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr / 2, betas=(0.9, 0.98))
    for step in range(1, args.hmu_steps + 1):
        b = make_batch(cfg, args.batch, args.max_src, gen, args.symbols)
        logits, kl = hmu_forward(model, b, None)
        ce = ce_loss(logits, b)
        loss = ce + args.beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.hmu_steps:
            ev = evaluate(model, held, 1.0, args.seed)
            ev.update(step=step, train_ce=ce.item(), train_kl=kl.item(),
                      seconds=time.perf_counter() - t0)
            log["phase2"].append(ev)
            print(f"[hmu]   step {step:4d}  train CE {ce.item():.3f}  KL/token {kl.item():.2f}"
                  f"  held-out token acc {ev['token_acc']:.3f}  seq acc {ev['seq_acc']:.3f}"
                  f"  ({ev['seconds']:.0f} s)", flush=True)
    for p in model.parameters():
        p.requires_grad = True
    model.eval()
    log["held_out"] = {"noise_std_1": evaluate(model, held, 1.0, args.seed),
                       "mean_path": evaluate(model, held, 0.0, args.seed)}
    log["train_seconds"] = time.perf_counter() - t0
    return log


# ----------------------------------------------------------------------------- activations
@torch.no_grad()
def activation_stats(model: HMUTransformer, cfg: BuildConfig) -> dict[str, Any]:
    """Magnitudes on the parity suite's own feeds (grid, parity seed and noise): max |x| of the
    encoder output, HMU output, logits; the largest logit range; the largest output of any
    Linear / LayerNorm / GELU module (FFN hidden layers are where FP16 overflows first)."""
    model.eval()
    biggest: dict[str, float] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(_m, _i, out):  # type: ignore[no-untyped-def]
            if isinstance(out, torch.Tensor):
                biggest[name] = max(biggest.get(name, 0.0), float(out.abs().max()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GELU))]
    stats = {"encoder_out": 0.0, "hmu_out": 0.0, "logits": 0.0, "logit_range": 0.0}
    try:
        for shape in derive_grid(cfg.profile, cfg.parity.extra_shapes):
            f = make_feeds(cfg.model, *shape, seed=cfg.parity.seed,
                           noise_scale=cfg.parity.noise_scale)
            t = {k: torch.from_numpy(v) for k, v in f.items()}
            out = model.forward_all(t["src_ids"], t["src_mask"], t["tgt_ids"], t["noise"])
            real = t["src_mask"].bool()
            stats["encoder_out"] = max(stats["encoder_out"],
                                       float(out["encoder_out"][real].abs().max()))
            stats["hmu_out"] = max(stats["hmu_out"], float(out["hmu_out"][real].abs().max()))
            lg = out["logits"]
            stats["logits"] = max(stats["logits"], float(lg.abs().max()))
            stats["logit_range"] = max(stats["logit_range"], float(lg.max() - lg.min()))
    finally:
        for h in handles:
            h.remove()
    name = max(biggest, key=biggest.__getitem__)
    stats["max_module_output"] = biggest[name]
    stats["max_module"] = name
    return stats


# ----------------------------------------------------------------------------- parity figures
def worst_per_backend(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in report["results"]:
        if r["output"] != "logits":
            continue
        w = out.setdefault(r["backend"], {"precision": r["precision"], "max_abs": 0.0,
                                          "worst_shape": None, "max_rel_range": 0.0,
                                          "min_cosine": 1.0, "min_top1": 1.0, "rows": 0,
                                          "rows_passed": 0})
        if r["max_abs"] >= w["max_abs"]:
            w["max_abs"], w["worst_shape"] = r["max_abs"], "x".join(map(str, r["shape"]))
        w["max_rel_range"] = max(w["max_rel_range"], r["max_rel_range"])
        w["min_cosine"] = min(w["min_cosine"], r["cosine"])
        if r["top1_agreement"] is not None:
            w["min_top1"] = min(w["min_top1"], r["top1_agreement"])
        w["rows"] += 1
        w["rows_passed"] += int(r["passed"])
    return out


@torch.no_grad()
def all_position_top1(model: HMUTransformer, cfg: BuildConfig) -> dict[str, float]:
    """Top-1 agreement of PyTorch half (CPU) vs FP32 at *every* position (the report counts
    decisive positions only), worst over the grid: how many near-ties flip."""
    half = HMUTransformer(model.cfg)
    half.load_state_dict(model.state_dict())
    half = half.half().eval()
    worst = 1.0
    for shape in derive_grid(cfg.profile, cfg.parity.extra_shapes):
        f = make_feeds(cfg.model, *shape, seed=cfg.parity.seed, noise_scale=cfg.parity.noise_scale)
        t = {k: torch.from_numpy(v) for k, v in f.items()}
        ref = model(t["src_ids"], t["src_mask"], t["tgt_ids"], t["noise"])
        got = half(t["src_ids"], t["src_mask"], t["tgt_ids"], t["noise"].half()).float()
        worst = min(worst, float((ref.argmax(-1) == got.argmax(-1)).float().mean()))
    return {"torch-fp16": worst}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/hmu-trained"))
    ap.add_argument("--steps", type=int, default=1000, help="phase 1: whole model")
    ap.add_argument("--short-steps", type=int, default=500,
                    help="phase 1 steps on short sources (curriculum)")
    ap.add_argument("--short", type=int, default=32, help="max source length of those steps")
    ap.add_argument("--symbols", type=int, default=64,
                    help="content tokens used by the task (0: the whole vocabulary)")
    ap.add_argument("--hmu-steps", type=int, default=150, help="phase 2: HMU alone")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.01, help="KL weight in phase 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = BuildConfig().validate()
    args.max_src = base.profile.src_len[2]
    assert (args.max_src + 1) // 2 <= base.profile.tgt_len[2], "target exceeds tgt_len max"

    model = HMUTransformer(ModelConfig())  # default architecture, seeded init
    log = train(model, args)
    ho = log["held_out"]
    print(f"held-out ({4 * 64} sequences): token acc {ho['noise_std_1']['token_acc']:.4f} "
          f"(noise std 1), {ho['mean_path']['token_acc']:.4f} (mean path); seq acc "
          f"{ho['noise_std_1']['seq_acc']:.4f} / {ho['mean_path']['seq_acc']:.4f}; "
          f"chance 1/{args.symbols or model.cfg.vocab_size - FIRST_TOKEN}")

    weights, _ = save_checkpoint(model, args.out / "checkpoint")
    cfg = replace(base, model=replace(base.model, checkpoint=str(weights))).validate()

    acts = {"random": activation_stats(HMUTransformer(ModelConfig()).eval(), base),
            "trained": activation_stats(model, cfg)}
    print("\nactivations on the parity grid's feeds (max |x|):")
    print(f"{'model':8s} {'encoder_out':>12s} {'hmu_out':>9s} {'logits':>8s} "
          f"{'logit range':>12s} {'max module output':>18s}")
    for name, a in acts.items():
        print(f"{name:8s} {a['encoder_out']:12.2f} {a['hmu_out']:9.2f} {a['logits']:8.2f} "
              f"{a['logit_range']:12.2f} {a['max_module_output']:10.2f} ({a['max_module']})")

    t0 = time.perf_counter()
    outcome = run_build(cfg, args.out / "build")
    print(f"\nbuild: {'ok' if outcome.ok else 'FAILED: ' + outcome.failure} in "
          f"{time.perf_counter() - t0:.0f} s -> {outcome.out_dir}")
    for name, res in outcome.stages.items():
        print(f"  {name}: {res.status} {res.reason}")
    report_path = outcome.out_dir / "parity" / "report.json"
    if not report_path.is_file():
        print(f"no parity report at {report_path}", file=sys.stderr)
        return 1
    report = json.loads(report_path.read_text())
    worst = worst_per_backend(report)
    print(f"\nparity ({len(report['grid'])} shapes; logits vs PyTorch FP32; top-1 at decisive "
          f"positions): policy FP32 {FP32.to_dict()}\n                   policy FP16 "
          f"{FP16.to_dict()}")
    print(f"{'backend':22s} {'prec':5s} {'max_abs':>9s} {'at':>9s} {'rel_range':>10s} "
          f"{'min cos':>10s} {'min top1':>9s} {'rows ok':>8s}")
    for backend in [b for b in BACKENDS if b in worst] + [b for b in worst if b not in BACKENDS]:
        w = worst[backend]
        print(f"{backend:22s} {w['precision']:5s} {w['max_abs']:9.3g} {w['worst_shape']:>9s} "
              f"{w['max_rel_range']:10.3g} {w['min_cosine']:10.7f} {w['min_top1']:9.4f} "
              f"{w['rows_passed']:>4d}/{w['rows']}")
    for label, reason in report.get("skipped_backends", {}).items():
        print(f"{label:22s} skipped: {reason}")
    failed = [c for c in report["checks"] if not c["passed"]]
    print(f"HMU checks: {len(report['checks']) - len(failed)}/{len(report['checks'])} passed")
    for c in failed:
        print(f"  FAILED {c['backend']} {c['name']}: {c['detail']}")
    top1_all = all_position_top1(model, cfg)
    print(f"top-1 at ALL positions, torch-fp16 (worst shape): {top1_all['torch-fp16']:.4f}")

    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "training": log, "activations": acts, "build_ok": outcome.ok,
               "build_failure": outcome.failure, "worst": worst, "top1_all_positions": top1_all,
               "failed_checks": failed, "torch": torch.__version__}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
