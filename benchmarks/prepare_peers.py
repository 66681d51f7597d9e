"""Random Hugging Face models at the peers' benchmark shapes, built with int8 / int4 graphs.

Speed does not depend on the weights' values (every generator is forced to the same number of
tokens), so these models keep Transformers' own initialisation:

- ``t5-small``: T5 with t5-small's shapes (d_model 512, d_ff 2048, 6+6 layers, vocab 32128);
  profile batch 1..4, source / target 1..64.
- ``opus-mt``: Marian with OPUS-MT's shapes (d_model 512, 8 heads, d_ff 2048, 6+6 layers,
  vocab 58,101, tied embeddings, final_logits_bias); profile batch 1..128 (batch 32 x beam 4),
  source / target 1..32 (the build skips the memory preflight: it sizes a parity grid these
  stages do not run).

Each is saved with ``save_pretrained`` into ``OUT/<name>/hf`` and built into ``OUT/<name>/build``
with the checkpoint, export, optimize and quantize stages. The int8 graphs quantize the LM head
too (``[int8] keep_lm_head = false``), as CTranslate2's int8 does, so the two int8 rows compare
like with like; the HMU stays FP32.

Usage: python benchmarks/prepare_peers.py OUT [t5-small] [opus-mt]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

PROFILES = {"t5-small": {"batch": [1, 2, 4], "src_len": [1, 32, 64], "tgt_len": [1, 32, 64]},
            "opus-mt": {"batch": [1, 32, 128], "src_len": [1, 32, 32],
                        "tgt_len": [1, 32, 32]}}


def make_model(name: str):  # noqa: ANN201 (a transformers model)
    import torch
    import transformers

    torch.manual_seed(0)
    if name == "t5-small":
        cfg = transformers.T5Config(
            vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
            num_decoder_layers=6, num_heads=8, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="relu",
            tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        cfg.architectures = ["T5ForConditionalGeneration"]
        return transformers.T5ForConditionalGeneration(cfg).eval()
    if name == "opus-mt":  # Helsinki-NLP/opus-mt-en-de's config.json, random weights
        cfg = transformers.MarianConfig(
            vocab_size=58101, decoder_vocab_size=58101, d_model=512, encoder_layers=6,
            decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
            encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish",
            max_position_embeddings=512, scale_embedding=True, share_encoder_decoder_embeddings=True,
            tie_word_embeddings=True, pad_token_id=58100, eos_token_id=0,
            decoder_start_token_id=58100, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0)
        cfg.architectures = ["MarianMTModel"]
        return transformers.MarianMTModel(cfg).eval()
    raise SystemExit(f"unknown model {name!r} (use t5-small or opus-mt)")


def build(name: str, out: Path) -> int:
    from hmu_export.build.pipeline import run_build
    from hmu_export.build.preflight import preflight
    from hmu_export.core.config import config_from_dict

    hf = out / name / "hf"
    if not (hf / "config.json").exists():
        make_model(name).save_pretrained(hf)
    cfg = config_from_dict({"model": {"name": f"{name}-random-hmu", "source": "hf",
                                      "path": str(hf.resolve())},
                            "profile": PROFILES[name],
                            "int8": {"keep_lm_head": False}})
    t0 = time.perf_counter()
    dest = out / name / "build"
    if name == "opus-mt":
        # The memory preflight sizes the parity grid's largest shape (128 x 32 x 32 x 58,101
        # logits, ~27 GiB estimated); these stages run no parity grid, so it does not apply.
        import hmu_export.build.preflight as pf
        pf.check_memory = lambda cfg: None
    outcome = run_build(cfg, dest, model=preflight(cfg, dest),
                        only=["checkpoint", "export", "optimize", "quantize"], force=True)
    for stage, res in outcome.stages.items():
        print(f"{name} {stage}: {res.status} {res.reason} ({res.seconds:.1f} s)")
    print(f"{name}: {time.perf_counter() - t0:.0f} s")
    if not outcome.ok:
        print(outcome.failure, file=sys.stderr)
    return 0 if outcome.ok else 1


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    out = Path(argv[0])
    names = argv[1:] or list(PROFILES)
    return max(build(n, out) for n in names)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
