"""Third-party generators timed beside our backends by ``bench --generate`` on an hf build.

One job: make each peer generate exactly ``new_tokens`` tokens (greedy, EOS held back until
then) from the same source ids as our loop, and time it the same way (time to first token,
every later step, tokens/s over the whole request).

Peers (each skipped with a one-line reason when its package is missing or it fails to load):
- ``transformers``: Transformers' own ``model.generate`` in PyTorch on the build's base model,
  default attention; with the build's HMU applied to the encoder output when the build has one
  (the encoder, the HMU and ``generate`` are all inside the timed region).
- ``optimum``: Optimum's ``ORTModelForSeq2SeqLM.generate`` on the same base model exported by
  Optimum (HMU off: Optimum has no place for it).
- ``ctranslate2-fp32`` / ``ctranslate2-int8``: CTranslate2's Translator on the same base model
  converted by its Transformers converter (HMU off).

The base model's weights come from the build (``checkpoint/``), saved with ``save_pretrained``
into a temporary folder that the converters read.
"""
from __future__ import annotations

import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from ..model.checkpoint import load_build_source

if TYPE_CHECKING:
    from ..core.build_folder import BuildFolder

#: what ``--peers`` accepts; ctranslate2 gives two rows (fp32 and int8)
PEERS = ("transformers", "optimum", "ctranslate2")
#: the backend of ours that the peer ratios are computed for first (FP32)
OURS = "onnxruntime-opt"
#: every backend of ours that gets peer ratios where the run has it
OURS_BACKENDS = (OURS, "onnxruntime-int8")
#: targets, our tokens/s over the peer's, greedy (issue 10: FP32 at batch 1; issue 17: int8 at
#: batch 1); (ours, peer) pairs not listed have none. A peer name without "-" matches its base.
TARGETS = {(OURS, "transformers"): 3.0, (OURS, "optimum"): 1.5,
           ("onnxruntime-int8", "transformers"): 4.0,
           ("onnxruntime-int8", "ctranslate2-int8"): 1.3}
#: with beam search (issue 17: CTranslate2's own headline setting, batch 32 x beam 4)
BEAM_TARGETS = {("onnxruntime-int8", "ctranslate2-int8"): 1.0}


class PeerUnavailable(Exception):
    """A peer cannot run here (package missing, conversion failed); the message is the reason."""


@dataclass
class PeerRun:
    sequences: list[list[int]]  # new tokens only (no decoder start token)
    seconds: float  # the whole request
    ttft_s: float | None  # None where the peer gives no per-token hook
    token_latencies_s: list[float] | None


class _TokenClock:
    """Wall time of every generated step of one request (first = time to first token)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def run(self, sequences: list[list[int]]) -> PeerRun:
        end = time.perf_counter()
        if not self.stamps:
            return PeerRun(sequences, end - self.t0, None, None)
        marks = [self.t0, *self.stamps]
        return PeerRun(sequences, end - self.t0, self.stamps[0] - self.t0,
                       [b - a for a, b in zip(marks[1:], marks[2:])])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Peer(ABC):
    name: str
    hmu: str = "off"  # "applied" where the peer runs the build's HMU too

    @abstractmethod
    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int,
                 beams: int = 1, until_eos: bool = False) -> PeerRun:
        """Exactly ``new_tokens`` tokens per row of ``ids`` [B, Ls]: greedy, or the best of a
        ``beams``-wide beam search. ``until_eos``: a real request instead (each row stops at
        its EOS, kept; at most ``new_tokens``), for task accuracy."""


@dataclass(frozen=True)
class Ids:
    bos: int  # decoder start token
    eos: int
    pad: int


def _noise(batch: int, src_len: int, latent: int, scale: float) -> np.ndarray:
    """The generation loop's draw (Generator.noise, seed 0): zeros for the mean path."""
    if not scale:
        return np.zeros((batch, src_len, latent), np.float32)
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, src_len, latent)) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- transformers
def _streamer(clock: _TokenClock) -> Any:
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):  # type: ignore[misc]
        """generate() puts the decoder start tokens first, then each step's tokens."""

        def __init__(self) -> None:
            self.first = True

        def put(self, value: Any) -> None:
            if self.first:
                self.first = False
            else:
                clock.tick()

        def end(self) -> None:
            pass

    return Streamer()


def _hf_generate(model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int, i: Ids,
                 encode: Callable[[Any, Any], Any] | None = None, beams: int = 1,
                 until_eos: bool = False) -> PeerRun:
    """``model.generate`` forced to ``new_tokens`` tokens (EOS held back until then), greedy
    or beam; ``encode(src, mask)`` gives the encoder outputs when the caller computes them
    itself. Transformers streams no beam search, so beam runs have no per-token times."""
    import torch

    clock = _TokenClock()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=None if until_eos else new_tokens,
              do_sample=False,
              num_beams=beams, decoder_start_token_id=i.bos, eos_token_id=i.eos,
              pad_token_id=i.pad, forced_bos_token_id=None, forced_eos_token_id=None,
              streamer=_streamer(clock) if beams == 1 else None)
    if beams > 1:
        kw.update(early_stopping=False, length_penalty=1.0)
    with torch.no_grad():
        src, att = torch.from_numpy(ids), torch.from_numpy(mask)
        if encode is None:
            out = model.generate(input_ids=src, attention_mask=att, **kw)
        else:
            out = model.generate(encoder_outputs=encode(src, att), attention_mask=att, **kw)
    seqs = out[:, 1:].tolist()  # without the decoder start token
    return clock.run([cut_at_eos(s, i.eos) for s in seqs] if until_eos else seqs)


def cut_at_eos(seq: list[int], eos: int) -> list[int]:
    """A row up to and including its first EOS (what follows is the batch's padding)."""
    return seq[:seq.index(eos) + 1] if eos in seq else seq


class TransformersPeer(Peer):
    name = "transformers"

    def __init__(self, folder: Path, ids: Ids, hmu: Any = None, latent: int = 0,
                 noise_scale: float = 0.0) -> None:
        import torch
        import transformers

        self.model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True).eval()
        self.ids, self.hmu_module, self.latent, self.noise_scale = ids, hmu, latent, noise_scale
        self.hmu = "applied" if hmu is not None else "off"

    def _encode(self, src: Any, att: Any) -> Any:
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        enc = self.model.get_encoder()(input_ids=src, attention_mask=att).last_hidden_state
        noise = _noise(src.shape[0], src.shape[1], self.latent, self.noise_scale)
        return BaseModelOutput(last_hidden_state=self.hmu_module(enc, torch.from_numpy(noise)))

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int,
                 beams: int = 1, until_eos: bool = False) -> PeerRun:
        return _hf_generate(self.model, ids, mask, new_tokens, self.ids,
                            None if self.hmu_module is None else self._encode, beams, until_eos)


# ----------------------------------------------------------------------------- optimum
class OptimumPeer(Peer):
    name = "optimum"

    def __init__(self, folder: Path, ids: Ids, threads: int, model: Any = None) -> None:
        """Optimum's own export of the base model in ``folder`` (its default files and
        decoder), or an ORTModelForSeq2SeqLM already made (``model``: the int8 variant)."""
        try:
            from optimum.onnxruntime import ORTModelForSeq2SeqLM
        except ImportError as exc:
            raise PeerUnavailable(f"optimum-onnx is not installed ({_first_line(exc)}); it pins "
                                  "transformers < 4.58: see docs/huggingface.md") from None
        from ..runners.onnxruntime_runner import session_options

        if model is None:
            try:
                model = ORTModelForSeq2SeqLM.from_pretrained(
                    str(folder), export=True, provider="CPUExecutionProvider",
                    session_options=session_options(threads), local_files_only=True)
            except Exception as exc:  # Optimum raises many types
                raise PeerUnavailable(f"Optimum could not export the base model: "
                                      f"{_first_line(exc)}") from None
        self.model, self.ids = model, ids

    def int8(self, out: Path, threads: int) -> "OptimumPeer":
        """Optimum's own dynamic int8 (ORTQuantizer, per-channel weights, its AVX2 or
        AVX512-VNNI preset as this CPU has VNNI) of every file of this peer's export."""
        peer = OptimumPeer(out, self.ids, threads, _optimum_int8(self.model, out, threads))
        peer.name = "optimum-int8"
        return peer

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int,
                 beams: int = 1, until_eos: bool = False) -> PeerRun:
        return _hf_generate(self.model, ids, mask, new_tokens, self.ids, beams=beams,
                            until_eos=until_eos)


def _optimum_int8(model: Any, out: Path, threads: int) -> Any:
    """Optimum's dynamic int8 of its own seq2seq export, loaded back as ORTModelForSeq2SeqLM."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from ..export.quantize import cpu_has_vnni
    from ..runners.onnxruntime_runner import session_options

    fp32 = out / "fp32"
    try:
        model.save_pretrained(str(fp32))
        preset = (AutoQuantizationConfig.avx512_vnni if cpu_has_vnni()
                  else AutoQuantizationConfig.avx2)
        qcfg = preset(is_static=False, per_channel=True)
        names = {}
        for f in sorted(fp32.glob("*.onnx")):
            ORTQuantizer.from_pretrained(str(fp32), file_name=f.name).quantize(
                quantization_config=qcfg, save_dir=str(out))
            names[f.stem] = f"{f.stem}_quantized.onnx"
        for extra in fp32.iterdir():  # config.json, generation_config.json
            if extra.suffix == ".json" and not (out / extra.name).exists():
                (out / extra.name).write_bytes(extra.read_bytes())
        return ORTModelForSeq2SeqLM.from_pretrained(
            str(out), encoder_file_name=names["encoder_model"],
            decoder_file_name=names["decoder_model"],
            decoder_with_past_file_name=names.get("decoder_with_past_model"),
            provider="CPUExecutionProvider", session_options=session_options(threads),
            local_files_only=True)
    except Exception as exc:  # Optimum raises many types
        raise PeerUnavailable(f"Optimum could not quantize its export: "
                              f"{_first_line(exc)}") from None


# ----------------------------------------------------------------------------- ctranslate2
class _IdTokenizer:
    """What CTranslate2's Transformers converter reads from a tokenizer, with one token string
    per id (``<i>``), so the converted model takes the same ids as our loop as strings."""

    def __init__(self, vocab: int, ids: Ids, unk: int) -> None:
        self.vocab = vocab
        # Marian's pad is the last id and is named "<pad>": CTranslate2's Marian converter
        # drops that row (its decoder starts from a zero embedding instead); never a source id
        self.names = {ids.pad: "<pad>"} if ids.pad == vocab - 1 else {}
        self.pad_token, self.eos_token = self.name(ids.pad), self.name(ids.eos)
        self.unk_token, self.bos_token = self.name(unk), self.name(ids.bos)

    @staticmethod
    def tok(i: int) -> str:
        return f"<{i}>"

    def name(self, i: int) -> str:
        return self.names.get(i) or self.tok(i)

    def get_vocab(self) -> dict[str, int]:
        return {self.name(i): i for i in range(self.vocab)}

    def convert_ids_to_tokens(self, i: Any) -> Any:
        return [self.name(int(x)) for x in i] if isinstance(i, (list, tuple)) else \
            self.name(int(i))

    def __len__(self) -> int:
        return self.vocab


def convert_ctranslate2(folder: Path, out: Path, vocab: int, ids: Ids, unk: int,
                        quantization: str | None = None) -> Path:
    """CTranslate2's conversion of the base model (``quantization``: its stored weight type;
    None keeps FP32, and ``compute_type`` picks the precision at load)."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError as exc:
        raise PeerUnavailable(f"ctranslate2 is not installed ({_first_line(exc)}); "
                              "install it with the project's peers extra") from None

    class Converter(TransformersConverter):  # type: ignore[misc]
        def load_tokenizer(self, tokenizer_class: Any, path: Any, **kw: Any) -> Any:
            return _IdTokenizer(vocab, ids, unk)

    try:
        Converter(str(folder)).convert(str(out), quantization=quantization, force=True)
    except Exception as exc:  # the converter raises many types
        raise PeerUnavailable(f"CTranslate2 could not convert the base model: "
                              f"{_first_line(exc)}") from None
    return out


class CTranslate2Peer(Peer):
    def __init__(self, model_dir: Path, compute_type: str, threads: int) -> None:
        import ctranslate2

        self.name = f"ctranslate2-{'fp32' if compute_type == 'float32' else compute_type}"
        try:
            self.translator = ctranslate2.Translator(str(model_dir), device="cpu",
                                                     compute_type=compute_type,
                                                     intra_threads=threads, inter_threads=1)
        except Exception as exc:
            raise PeerUnavailable(f"CTranslate2 cannot load the model as {compute_type}: "
                                  f"{_first_line(exc)}") from None

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int,
                 beams: int = 1, until_eos: bool = False) -> PeerRun:
        """CTranslate2 calls back per token in greedy search only: beam runs are timed whole."""
        clock = _TokenClock()
        seen = [-1]

        def on_token(step: Any) -> bool:  # once per row and step: tick on a new step
            if step.step > seen[0]:
                seen[0] = step.step
                clock.tick()
            return False

        source = [[_IdTokenizer.tok(int(t)) for t, m in zip(row, mrow) if m]
                  for row, mrow in zip(ids, mask)]
        res = self.translator.translate_batch(
            source, beam_size=beams, max_decoding_length=new_tokens,
            min_decoding_length=0 if until_eos else new_tokens, return_end_token=True,
            callback=on_token if beams == 1 else None, max_batch_size=0, length_penalty=1.0)
        seqs = [[int(t[1:-1]) for t in r.hypotheses[0]] for r in res]
        return clock.run(seqs)


# ----------------------------------------------------------------------------- running
def resolve_peers(peers: Sequence[str] | None, source: str) -> Sequence[str]:
    """The peers a run times: None = all of them on an hf build, none otherwise; peers on a
    build that is not hf, or unknown names, are one-line errors."""
    from ..core.errors import InputError

    if peers is None:
        return PEERS if source == "hf" else ()
    if peers and source != "hf":
        raise InputError(f"peers ({', '.join(peers)}) need a build whose [model] source is "
                         f"hf, this one's is {source}")
    if set(peers) - set(PEERS):
        raise InputError(f"unknown peer(s) {', '.join(sorted(set(peers) - set(PEERS)))} "
                         f"(use {', '.join(PEERS)})")
    return peers


def versions() -> dict[str, str | None]:
    """Installed versions of the peers' packages (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("transformers", "optimum-onnx", "optimum", "ctranslate2"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _available(name: str) -> str:
    """'' when the peer's package imports, else the reason it does not."""
    mod = {"transformers": "transformers", "optimum": "optimum.onnxruntime",
           "ctranslate2": "ctranslate2"}[name]
    try:
        __import__(mod)
    except ImportError as exc:
        extra = {"optimum": "; optimum-onnx pins transformers < 4.58, so it lives in a separate "
                            "venv: see docs/huggingface.md",
                 "ctranslate2": "; install it with the project's peers extra"}.get(name, "")
        return f"{mod} is not importable ({_first_line(exc)}){extra}"
    return ""


def load_peers(source: Any, cfg: Any, names: Sequence[str], work: Path, threads: int,
               progress: Callable[[str], None] | None = None, variants: bool = False
               ) -> tuple[list[Peer], list[dict[str, str]]]:
    """(peers ready to time, skipped rows) for ``names`` over the build's base model.
    ``variants``: also Transformers on the base model alone (HMU off, as every other peer) and
    Optimum's dynamic int8."""
    import torch

    peers: list[Peer] = []
    skipped: list[dict[str, str]] = []
    gen = cfg.generation
    ids = Ids(int(gen.bos_id), int(gen.eos_id), int(cfg.model.pad_id))
    folder = work / "base"
    reasons = {n: _available(n) for n in names}
    if any(not r for r in reasons.values()):
        if progress:
            progress("peers: saving the base model")
        source.hf_model.save_pretrained(str(folder))
    for name in names:
        if reasons[name]:
            rows = ["ctranslate2-fp32", "ctranslate2-int8"] if name == "ctranslate2" else [name]
            skipped += [{"backend": r, "reason": reasons[name]} for r in rows]
            continue
        if progress:
            progress(f"peers: preparing {name}")
        try:
            if name == "transformers":
                hmu = source.model.hmu if source.cfg.use_hmu else None
                with torch.no_grad():
                    peers.append(TransformersPeer(folder, ids, hmu, source.cfg.latent_dim,
                                                  gen.noise_scale))
                if variants and hmu is not None:
                    peers.append(TransformersPeer(folder, ids))
                    peers[-1].name = "transformers-hmu-off"
            elif name == "optimum":
                optimum = OptimumPeer(folder, ids, threads)
                peers.append(optimum)
                if variants:
                    try:
                        peers.append(optimum.int8(work / "optimum-int8", threads))
                    except PeerUnavailable as exc:
                        skipped.append({"backend": "optimum-int8", "reason": str(exc)})
            else:
                hc = source.hf_model.config
                unk = getattr(hc, "unk_token_id", None)
                model_dir = convert_ctranslate2(folder, work / "ct2", cfg.model.vocab_size, ids,
                                                2 if unk is None else int(unk))
                for compute in ("float32", "int8"):
                    try:
                        peers.append(CTranslate2Peer(model_dir, compute, threads))
                    except PeerUnavailable as exc:
                        skipped.append({"backend": f"ctranslate2-{compute}", "reason": str(exc)})
        except PeerUnavailable as exc:
            rows = ["ctranslate2-fp32", "ctranslate2-int8"] if name == "ctranslate2" else [name]
            skipped += [{"backend": r, "reason": str(exc)} for r in rows]
    return peers, skipped


def time_peer(peer: Peer, ids: np.ndarray, new_tokens: int, runs: int, warmup: int,
              beams: int = 1) -> list[PeerRun] | str:
    """``runs`` timed requests after ``warmup``; a reason string when the peer did not make
    exactly ``new_tokens`` tokens on every row (its figures would not compare)."""
    mask = np.ones_like(ids)
    out = []
    for k in range(warmup + runs):
        res = peer.generate(ids, mask, new_tokens, beams)
        made = sorted({len(s) for s in res.sequences})
        if made != [new_tokens] or len(res.sequences) != ids.shape[0]:
            return f"made {made} tokens per row, not {new_tokens}: not comparable"
        if k >= warmup:
            out.append(res)
    return out


def run_peers(build: "BuildFolder", names: Sequence[str], batches: Sequence[int],
              sources: Callable[[int], list[list[int]]], *, src_len: int, new_tokens: int,
              runs: int, warmup: int, threads: int, row: Callable[..., dict[str, Any]],
              beams: int = 1, progress: Callable[[str], None] | None = None
              ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Result rows (made by ``row``, the bench's own row builder) and skipped peers of the
    (already opened and verified) ``build``."""
    source = load_build_source(build)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hmu-peers-") as tmp:
        peers, skipped = load_peers(source, build.cfg, names, Path(tmp), threads, progress)
        for peer in peers:
            for b in batches:
                if progress:
                    progress(f"{peer.name} batch {b}")
                ids = np.asarray(sources(b), dtype=np.int64)
                got = time_peer(peer, ids, new_tokens, runs, warmup, beams)
                if isinstance(got, str):
                    skipped.append({"backend": peer.name, "reason": f"batch {b}: {got}"})
                    continue
                ttft = [r.ttft_s for r in got]
                lat = [x for r in got for x in (r.token_latencies_s or [])]
                tps = [b * new_tokens / r.seconds for r in got]
                results.append({**row(peer.name, b, src_len, new_tokens,
                                      None if None in ttft else ttft, lat or None, tps, runs),
                                "peer": True, "hmu": peer.hmu})
    return results, skipped


def peer_ratios(results: Sequence[dict[str, Any]], beams: int = 1) -> list[dict[str, Any]]:
    """tokens/s of each of our backends in OURS_BACKENDS (where the run has it) over each peer
    row's, per batch, with the issue's target for that pair."""
    targets = BEAM_TARGETS if beams > 1 else TARGETS
    out = []
    for ours in OURS_BACKENDS:
        mine = {r["batch"]: r for r in results if r["backend"] == ours and not r.get("peer")}
        for r in results:
            if not r.get("peer") or r["batch"] not in mine:
                continue
            target = targets.get((ours, r["backend"]),
                                 targets.get((ours, r["backend"].split("-")[0])))
            ratio = mine[r["batch"]]["tokens_per_s"] / r["tokens_per_s"]
            out.append({"ours": ours, "peer": r["backend"], "batch": r["batch"],
                        "ours_tokens_per_s": mine[r["batch"]]["tokens_per_s"],
                        "peer_tokens_per_s": r["tokens_per_s"], "ratio": ratio,
                        "target": target,
                        "meets_target": None if target is None else ratio >= target})
    return out
