"""`bench --task`: exact match and speed of real requests on a task set, ours beside the peers.

Where ``bench --generate`` forces every generator to the same number of tokens (a speed test on
any weights), this runs what a user would: every source of the task set through the build's
tokenizer, greedy, each row stopping at its EOS, the decoded text compared with the target. One
table then answers both questions a deployment engineer asks of a trained model: does each
artifact still solve the task, and how fast does it answer.

Rows: our generation backends (FP32, int8, int4: the HMU on its mean path) and, on an hf build,
the peers on the same ids (bench/peers.py): Transformers with the build's HMU applied and
without it, Optimum FP32 and its dynamic int8, CTranslate2 FP32 and int8 (Optimum and
CTranslate2 have no place for the HMU: they run the base model, so their accuracy is the base
model's). tokens/s counts generated tokens up to and including each row's EOS over the wall
time of the whole set (after one warm-up batch), ``batch`` rows per call.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import HMUExportError, InputError

DEFAULT_TASK_BACKENDS = ("onnxruntime", "onnxruntime-opt", "onnxruntime-int8", "onnxruntime-int4")


@dataclass
class TaskBenchRow:
    backend: str
    hmu: str  # "applied" (mean path) or "off"
    correct: int
    total: int
    tokens: int
    seconds: float
    peer: bool = False

    @property
    def exact(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TaskBenchReport:
    model: dict[str, Any]
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[TaskBenchRow] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "settings": self.settings,
                "rows": [dict(asdict(r), exact=round(r.exact, 6),
                              tokens_per_s=round(r.tokens_per_s, 2)) for r in self.rows],
                "skipped": self.skipped}


def run_task_bench(root: Path, *, task: Path | None = None,
                   backends: Sequence[str] = DEFAULT_TASK_BACKENDS,
                   peers: Sequence[str] | None = None, batch: int = 8, limit: int = 0,
                   threads: int | None = None, progress: Callable[[str], None] | None = None
                   ) -> TaskBenchReport:
    """``task``: a JSONL task set (default: the build's ``[task] path``); ``peers``: None = all
    of them on an hf build, none otherwise."""
    from ..core.build_folder import open_build
    from ..generate.generator import Generator
    from ..model.tokenizer import TOKENIZER_DIR, Tokenizer, load_hf_tokenizer, tokenizer_files
    from ..runners.onnxruntime_runner import generation_threads
    from ..verify.task_accuracy import load_task
    from .machine import machine_info
    from .peers import resolve_peers, versions

    build = open_build(root)
    cfg = build.cfg
    if not tokenizer_files(build.layout.root / TOKENIZER_DIR):
        raise InputError(f"{build.layout.root} has no tokenizer ({TOKENIZER_DIR}/): a task "
                         "set is text")
    path = Path(task) if task is not None else (Path(cfg.task.path) if cfg.task.path else None)
    if path is None:
        raise InputError("the build names no task set ([task] path): give --task FILE.jsonl")
    if not 1 <= batch <= cfg.profile.batch[2]:
        raise InputError(f"batch {batch} is outside the build's profile (1.."
                         f"{cfg.profile.batch[2]})")
    peers = resolve_peers(peers, cfg.model.source)
    tok = Tokenizer(load_hf_tokenizer(build.layout.root / TOKENIZER_DIR))
    # every target checked against the tokenizer (one that it cannot encode could never match)
    pairs = load_task(replace(cfg, task=replace(cfg.task, path=str(path), limit=limit)), tok)
    sources = tok.encode([s for s, _ in pairs])
    targets = [t.strip() for _, t in pairs]
    longest = max(len(s) for s in sources)
    if longest > cfg.profile.src_len[2]:
        raise InputError(f"{path}: a source is {longest} tokens, over the profile's src_len "
                         f"max {cfg.profile.src_len[2]}")
    threads = threads or generation_threads()
    import torch
    torch.set_num_threads(threads)
    max_new = cfg.generation.new_tokens(cfg.profile)  # 0 in the config: the default
    report = TaskBenchReport(
        model={"name": cfg.model.name, "source": cfg.model.source},
        machine=machine_info(threads),
        settings={"task": str(path), "examples": len(pairs), "batch": batch,
                  "max_new_tokens": max_new, "threads": threads, "strategy": "greedy",
                  "noise_scale": 0.0, "peers": list(peers),
                  "peer_versions": versions() if peers else {}})

    def score(name: str, hmu: str, run: Callable[[list[list[int]]], list[list[int]]],
              peer: bool) -> None:
        if progress:
            progress(f"{name}: {len(pairs)} examples")
        run(sources[:batch])  # warm-up
        seqs: list[list[int]] = []
        t0 = time.perf_counter()
        for i in range(0, len(sources), batch):
            seqs += run(sources[i:i + batch])
        seconds = time.perf_counter() - t0
        texts = tok.decode(seqs)
        correct = sum(t.strip() == want for t, want in zip(texts, targets))
        report.rows.append(TaskBenchRow(name, hmu, correct, len(pairs),
                                        sum(len(s) for s in seqs), round(seconds, 4), peer))

    for name in backends:
        try:
            gen = Generator.from_build(root, name, threads=threads)
        except HMUExportError as exc:
            report.skipped.append({"backend": name, "reason": str(exc)})
            continue
        score(name, "applied", lambda rows, g=gen: [list(s) for s in g.generate(
            rows, strategy="greedy", noise_scale=0.0, max_new_tokens=max_new).sequences],
            False)
    if peers:
        from ..model.checkpoint import load_build_source
        from .peers import load_peers

        pad = int(cfg.model.pad_id)
        with tempfile.TemporaryDirectory(prefix="hmu-task-peers-") as tmp:
            loaded, skipped = load_peers(load_build_source(build), cfg, peers, Path(tmp),
                                         threads, progress, variants=True)
            report.skipped += skipped
            for p in loaded:
                def run(rows: list[list[int]], p: Any = p) -> list[list[int]]:
                    ids, mask = _padded(rows, pad)
                    return p.generate(ids, mask, max_new, until_eos=True).sequences
                score(p.name, p.hmu, run, True)
    return report


def _padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def to_markdown(report: TaskBenchReport) -> str:
    s = report.settings
    ref = next((r for r in report.rows if r.backend == "onnxruntime"), None)
    lines = [f"# Task benchmark: {report.model['name']}", "",
             f"{s['examples']} examples of `{Path(s['task']).name}`, greedy, each row until its "
             f"EOS (at most {s['max_new_tokens']} tokens), batch {s['batch']}, "
             f"{s['threads']} threads; {report.machine.get('cpu', '')}. tokens/s: generated "
             "tokens (EOS included) over the wall time of the whole set.", "",
             "| backend | HMU | exact match | correct | tokens/s | x onnxruntime | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in report.rows:
        rel = f"{r.tokens_per_s / ref.tokens_per_s:.2f}" if ref and ref.tokens_per_s else "-"
        name = f"{r.backend} (peer)" if r.peer else r.backend
        lines.append(f"| {name} | {r.hmu} | {100 * r.exact:.2f}% | {r.correct}/{r.total} | "
                     f"{r.tokens_per_s:.1f} | {rel} | {r.seconds:.2f} |")
    for sk in report.skipped:
        lines.append(f"\nSkipped `{sk['backend']}`: {sk['reason']}")
    return "\n".join(lines) + "\n"


def write_outputs(report: TaskBenchReport, out_dir: Path, json_path: Path | None = None
                  ) -> dict[str, Path]:
    from ..core.fileio import write_json, write_text

    out_dir = Path(out_dir)
    paths = {"json": Path(json_path) if json_path else out_dir / "task_bench.json",
             "markdown": out_dir / "task_bench.md"}
    write_json(paths["json"], report.to_dict())
    write_text(paths["markdown"], to_markdown(report))
    return paths
