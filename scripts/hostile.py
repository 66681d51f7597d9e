#!/usr/bin/env python3
"""Hostile run (issues 19 and 21): try every command as a careless or hostile user would.

Each attack is one run of ``python -m hmu_export ...`` in a subprocess (own session, timeout),
in a private work folder, against a copy of ONE tiny build made once per run. Every attack
states what it expects ("error": a refusal; "ok": a correct result; "any": either) and what
must survive it (guarded files, devices, links, the build copy). A run is classified:

- clean: the expected result: exit 0 passing the attack's checks, or a non-zero exit with
  exactly one ``error:`` line on stderr and no traceback;
- traceback: a Python traceback on stderr;
- silent: exit 0 where an error was required, or a result that fails the attack's checks;
- hang: no exit within the attack's timeout (the process group is killed);
- data loss: a guarded file, device or link changed or replaced, or a half-written artifact
  (``*.tmp``, a staging folder) left behind;
- messy: a non-zero exit without exactly one ``error:`` line (two lines, none, a signal);
- refused: a valid request answered with an error;
- broken: the attack itself could not be prepared (a bug of this script).

Usage: ``python scripts/hostile.py [--short] [--jobs N] [--json F] [--md F] [--filter S]``.
Stdlib only (the CLI runs in this interpreter's environment); exit 1 when any run is not clean.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("clean", "traceback", "silent", "hang", "data loss", "messy", "refused", "broken")
BAD = tuple(c for c in CLASSES if c != "clean")
#: lines of stderr that count as the one error line (ours: "error: ..."; argparse's:
#: "python -m hmu_export build: error: ...")
ERROR_LINE = re.compile(r"(^|: )error: ")
#: what a run may leave behind that is half-written (atomic writes and build staging)
LEFTOVER = re.compile(r"(\.tmp$|\.staging|\.partial$|\.journal$)")

#: the tiny model every attack that needs a build reads (a copy each): seconds to build
TINY: dict[str, dict[str, str]] = {
    "model": {"name": '"hmu-tiny"', "vocab_size": "61", "d_model": "32", "n_heads": "4",
              "n_encoder_layers": "1", "n_decoder_layers": "1", "d_ff": "64",
              "latent_dim": "16", "max_len": "32", "seed": "3"},
    "profile": {"batch": "[1, 2, 4]", "src_len": "[1, 8, 16]", "tgt_len": "[1, 4, 8]"},
    "parity": {"fp16": "false"},
    "int8": {"enabled": "false", "int4": "false"},
}
VOCAB, BATCH_MAX, SRC_MAX, TGT_MAX = 61, 4, 16, 8


def toml_text(overrides: dict[str, str | None] | None = None, extra: str = "") -> str:
    """The tiny TOML with ``section.key`` replaced by a raw TOML value (None: left out)."""
    sections = {s: dict(kv) for s, kv in TINY.items()}
    for dotted, raw in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        sections.setdefault(section, {})
        if raw is None:
            sections[section].pop(key, None)
        else:
            sections[section][key] = raw
    lines = []
    for section, kv in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in kv.items()]
    return "\n".join(lines) + "\n" + extra


# --------------------------------------------------------------------------- results
@dataclass
class Run:
    """What one subprocess did."""

    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


@dataclass
class Result:
    """One attack's classified outcome (a row of the JSON report)."""

    command: str
    name: str
    expect: str
    klass: str
    why: str
    rc: int | None
    seconds: float
    stderr_tail: str = ""


def error_lines(stderr: str) -> list[str]:
    """The stderr lines that are error lines (ours or argparse's)."""
    return [line for line in stderr.splitlines() if ERROR_LINE.search(line)]


def classify(expect: str, run: Run, lost: list[str], wrong: list[str]) -> tuple[str, str]:
    """(class, reason) of a run: hang and traceback first (a bug whatever else happened), then
    data loss, then the exit against the expectation. ``lost``: what the run destroyed or left
    half-written; ``wrong``: what its checks found wrong in a successful result."""
    if run.timed_out:
        return "hang", f"no exit within {run.seconds:.0f} s"
    if "Traceback (most recent call last)" in run.stderr:
        last = [line for line in run.stderr.splitlines() if line.strip()][-1:]
        return "traceback", (last[0][:200] if last else "traceback")
    if lost:
        return "data loss", "; ".join(lost)[:300]
    if run.rc == 0:
        if expect == "error":
            return "silent", "exit 0 where an error was required"
        if wrong:
            return "silent", "; ".join(wrong)[:300]
        return "clean", "ok"
    lines = error_lines(run.stderr)
    if len(lines) != 1:
        return "messy", f"exit {run.rc} with {len(lines)} error lines"
    if expect == "ok":
        return "refused", lines[0][:200]
    return "clean", lines[0][:200]


# --------------------------------------------------------------------------- snapshots
def snapshot(path: Path) -> Any:
    """What a path is, without following links: kind plus content hash (files), target
    (links), device number (devices), entries (folders, recursively)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ("missing",)
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return ("link", os.readlink(path))
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return ("device", st.st_rdev)
    if stat.S_ISFIFO(mode):
        return ("fifo",)
    if stat.S_ISDIR(mode):
        return ("dir", tuple((p.name, snapshot(p)) for p in sorted(Path(path).iterdir())))
    if stat.S_ISREG(mode):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return ("file", h.hexdigest())
    return ("other", mode)


def build_problem(root: Path) -> str | None:
    """Why the build at ``root`` no longer verifies against its manifest (None: it does)."""
    sys.path.insert(0, str(REPO))
    from hmu_export.core.build_folder import open_build  # floor 0: no torch
    from hmu_export.core.errors import HMUExportError

    try:
        open_build(root)
    except HMUExportError as exc:
        return f"the build no longer verifies: {str(exc)[:200]}"
    return None


def leftovers(root: Path) -> list[str]:
    """Half-written artifacts under ``root``: temporary files and staging folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if LEFTOVER.search(name):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


# --------------------------------------------------------------------------- attacks
@dataclass
class Env:
    """What every attack shares: the interpreter, the tiny build (made lazily, once)."""

    root: Path
    python: str = sys.executable
    _build: Path | None = None
    _hf: Path | None = None

    def run_cli(self, argv: list[str], cwd: Path, timeout: float,
                stdin: bytes | None = None) -> Run:
        """``python -m hmu_export argv`` (or a raw argv starting with the interpreter)."""
        cmd = argv if argv and argv[0] == self.python else [self.python, "-m", "hmu_export",
                                                            *argv]
        env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(self.root / "home"),
                   XDG_CACHE_HOME=str(self.root / "home" / ".cache"), TMPDIR=str(cwd / "tmp"),
                   COLUMNS="200", PYTHONUNBUFFERED="1")
        (cwd / "tmp").mkdir(exist_ok=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                start_new_session=True)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        return Run(proc.returncode, out.decode("utf-8", "replace"),
                   err.decode("utf-8", "replace"), time.monotonic() - t0, timed_out)

    def build(self) -> Path:
        """The tiny build (made on first use): every attack works on a copy of it."""
        if self._build is None:
            work = self.root / "tiny"
            work.mkdir(parents=True, exist_ok=True)
            (work / "tiny.toml").write_text(toml_text())
            run = self.run_cli(["build", "--config", "tiny.toml", "--out", "build"], work, 900)
            if run.rc != 0:
                raise SystemExit(f"hostile: the tiny build failed (exit {run.rc}):\n"
                                 f"{run.stderr[-3000:]}")
            self._build = work / "build"
        return self._build

    def hf(self) -> Path:
        """A tiny Hugging Face T5 folder (save_pretrained), made on first use."""
        if self._hf is None:
            folder = self.root / "hf-t5"
            code = (
                "import sys, torch, transformers\n"
                "torch.manual_seed(0)\n"
                "c = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64,"
                " num_layers=1, num_decoder_layers=1, num_heads=4,"
                " relative_attention_num_buckets=8, relative_attention_max_distance=12,"
                " dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)\n"
                "c.architectures = ['T5ForConditionalGeneration']\n"
                "transformers.T5ForConditionalGeneration(c).save_pretrained(sys.argv[1])\n")
            run = self.run_cli([self.python, "-c", code, str(folder)], self.root, 300)
            if run.rc != 0:
                raise SystemExit(f"hostile: making the hf folder failed:\n{run.stderr[-3000:]}")
            self._hf = folder
        return self._hf


class Ctx:
    """One attack's private work folder and what it registers: guarded paths (must survive
    unchanged) and checks (of a successful result)."""

    def __init__(self, env: Env, work: Path) -> None:
        self.env, self.work = env, work
        self.guards: list[Path] = []
        self.checks: list[Callable[[Run], str | None]] = []
        self.after: list[Callable[[], str | None]] = []  # data-loss checks of any exit
        self.stdin: bytes | None = None

    def file(self, name: str, data: str | bytes, guard: bool = True) -> Path:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str)
                         else data)
        if guard:
            self.guards.append(path)
        return path

    def toml(self, overrides: dict[str, str | None] | None = None, extra: str = "",
             raw: str | bytes | None = None) -> str:
        """A config file (the tiny one with overrides, or ``raw``): its relative name."""
        self.file("config.toml", toml_text(overrides, extra) if raw is None else raw)
        return "config.toml"

    def build(self, guard: bool = True, name: str = "build", verify: bool = False) -> str:
        """A private copy of the tiny build; guarded (must stay byte-identical) by default.
        ``verify``: for commands that write reports into the build (parity, bench), it must
        instead still verify against its manifest after the run, whatever the exit."""
        shutil.copytree(self.env.build(), self.work / name, symlinks=True)
        if verify:
            self.after.append(lambda: build_problem(self.work / name))
        elif guard:
            self.guards.append(self.work / name)
        return name

    def guard(self, *paths: Path | str) -> None:
        self.guards += [self.work / p for p in paths]

    def check(self, fn: Callable[[Run], str | None]) -> None:
        self.checks.append(fn)

    def userdir(self, name: str = "mine") -> str:
        """A folder of a user's own files (guarded)."""
        self.file(f"{name}/notes.txt", "my notes, not a build\n")
        self.guard(name)
        return name

    def nulldev(self, name: str = "null") -> str:
        """A character device like /dev/null inside the work folder (guarded): renaming over
        it is data loss that this run can see without touching the system's /dev/null."""
        os.mknod(self.work / name, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        self.guard(name)
        return name

    def fifo(self, name: str = "fifo") -> str:
        os.mkfifo(self.work / name)
        self.guard(name)
        return name

    def link(self, name: str, target: str) -> str:
        os.symlink(target, self.work / name)
        self.guard(name)
        return name

    def json_out(self, name: str, rows: int) -> str:
        """``name`` must hold a generate result of ``rows`` rows of ids inside the vocabulary."""
        def check(_: Run) -> str | None:
            try:
                data = json.loads((self.work / name).read_text())
            except (OSError, ValueError) as exc:
                return f"no readable result in {name}: {exc}"
            seqs = data.get("sequences")
            if not isinstance(seqs, list) or len(seqs) != rows:
                return f"{name}: {rows} rows expected, got {seqs!r:.80}"
            for s in seqs:
                if not s or not all(isinstance(t, int) and 0 <= t < VOCAB for t in s):
                    return f"{name}: a row outside the vocabulary or empty: {s!r:.80}"
            return None
        self.check(check)
        return name


@dataclass(frozen=True)
class Attack:
    """One hostile attempt: ``prepare`` fills the work folder and returns the CLI argv."""

    command: str
    name: str
    expect: str  # "error" | "ok" | "any"
    prepare: Callable[[Ctx], list[str]]
    timeout: float = 180.0
    short: bool = False


def run_attack(attack: Attack, env: Env) -> Result:
    """Prepare, snapshot the guarded paths, run, classify."""
    safe = re.sub(r"[^A-Za-z0-9]+", "-", f"{attack.command}-{attack.name}")[:80]
    work = Path(tempfile.mkdtemp(prefix=f"{safe}.", dir=env.root / "runs"))
    ctx = Ctx(env, work)
    try:
        argv = attack.prepare(ctx)
    except Exception as exc:  # a bug of this script, not of the package: shown, not hidden
        return Result(attack.command, attack.name, attack.expect, "broken",
                      f"the attack could not be prepared: {type(exc).__name__}: {exc}"[:300],
                      None, 0.0)
    before = {p: snapshot(p) for p in ctx.guards}
    run = env.run_cli(argv, work, attack.timeout, ctx.stdin)
    lost = [f"{p.relative_to(work)} changed ({before[p][0]} -> {snapshot(p)[0]})"
            for p in ctx.guards if snapshot(p) != before[p]]
    lost += [f"left behind: {x}" for x in leftovers(work)]
    lost += [p for fn in ctx.after for p in [fn()] if p]
    wrong = [w for fn in ctx.checks if run.rc == 0 for w in [fn(run)] if w]
    klass, why = classify(attack.expect, run, lost, wrong)
    if klass == "clean":
        shutil.rmtree(work, ignore_errors=True)
    return Result(attack.command, attack.name, attack.expect, klass, why, run.rc,
                  round(run.seconds, 2), "" if klass == "clean" else run.stderr[-1500:])


def attacks_of(items: Iterable[tuple[str, str, Callable[[Ctx], list[str]]]], command: str,
               short: Iterable[str] = (), timeout: float = 180.0) -> list[Attack]:
    """Attacks from (name, expect, prepare) rows; names in ``short`` join the short mode."""
    keep = set(short)
    return [Attack(command, n, e, p, timeout, n in keep) for n, e, p in items]


# --------------------------------------------------------------------------- the catalogue
ROW = [5, 6, 7]
Prep = Callable[[Ctx], list[str]]


def _in(c: Ctx, rows: int = 1) -> str:
    """A valid --input file of ``rows`` rows."""
    c.file("in.json", json.dumps({"src_ids": [ROW] * rows}))
    return "in.json"


def flip(path: Path, at: float = 0.5) -> None:
    """Change one byte of ``path`` (tampering that keeps the size)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _safetensors_edit(c: Ctx, folder: str, code: str) -> None:
    """Edit ``folder/model.safetensors`` with ``code`` acting on the dict ``t`` (numpy)."""
    script = ("import sys, numpy as np\nfrom safetensors.numpy import load_file, save_file\n"
              "p = sys.argv[1]\nt = load_file(p)\n" + code + "\nsave_file(t, p)\n")
    run = c.env.run_cli([c.env.python, "-c", script, str(c.work / folder / "model.safetensors")],
                        c.work, 120)
    if run.rc != 0:
        raise RuntimeError(f"editing the safetensors failed: {run.stderr[-500:]}")


def build_attacks() -> list[Attack]:
    """`build`: hostile TOMLs (types, ranges, syntax), config paths, outputs, hf folders."""
    bad: list[tuple[str, dict[str, str | None]]] = []
    for key, values in {
        "vocab_size": ["0", "-1", '"61"', "61.5", "true", "1_000_000_000_000", "[61]"],
        "d_model": ["0", "30", "-32", "1099511627776"],
        "n_heads": ["-1", "5", "64"],
        "n_encoder_layers": ["0", "-1", "1_000_000_000"],
        "n_decoder_layers": ["0", "-3"],
        "d_ff": ["0", "-64"],
        "latent_dim": ["0", "-1"],
        "max_len": ["0", "4"],
        "seed": ["-1", "18446744073709551616"],
        "dropout": ["1.0", "-0.1", "nan"],
        "init_scale": ["0.0", "-1.0", "inf", "nan"],
        "name": ['"a/b"', '".."', '"two\\nlines"', '"nul\\u0000"', '""', '" padded"',
                 '"' + "x" * 300 + '"', '"\\u202eevil"'],
        "source": ['"bogus"', '"HF"', "1"],
        "pad_id": ["61", "-1"],
        "hmu_position": ['"middle"'],
        "pool": ['"max"'],
        "num_classes": ["-1"],
        "use_hmu": ['"yes"'],
        "derived_keys": ['[""]', '"not-a-list"'],
        "checkpoint": ['"missing.safetensors"', '"."', '"/dev/zero"', '"/dev/null"'],
        "unknown_key": ["1"],
    }.items():
        bad += [(f"model.{key}={v[:40]}", {f"model.{key}": v}) for v in values]
    for section, key, values in [
        ("profile", "batch", ["[0, 1, 2]", "[2, 1, 4]", "[1, 4, 2]", "[1, 2]", "[1, 2, 3, 4]",
                              '["a", 1, 2]', "1", "[-1, 1, 2]"]),
        ("profile", "src_len", ["[1, 8, 100]", "[1, 8, 1e3]"]),
        ("profile", "tgt_len", ["[1, 4, 64]", "[0, 0, 0]"]),
        ("profile", "past_len", ["[0, 0, 100]", "[-1, 0, 3]"]),
        ("profile", "new_len", ["[0, 1, 1]"]),
        ("export", "opset", ["17", "21", '"18"']),
        ("export", "workers", ["-1"]),
        ("parity", "seed", ["-1"]),
        ("parity", "noise_scale", ["-1.0", "nan"]),
        ("parity", "fp32_max_abs", ["0.0", "-1.0"]),
        ("parity", "extra_shapes", ["[[0, 1, 1]]", "[[1, 2]]"]),
        ("engine", "workspace_mib", ["0"]),
        ("engine", "builder_optimization_level", ["6", "-1"]),
        ("engine", "hardware_compatibility", ['"x"']),
        ("triton", "max_queue_delay_us", ["-1"]),
        ("triton", "instance_count", ["0"]),
        ("generation", "bos_id", ["61"]),
        ("generation", "eos_id", ["-1"]),
        ("generation", "max_new_tokens", ["1000", "-1"]),
        ("generation", "strategy", ['"bogus"']),
        ("generation", "num_beams", ["0"]),
        ("generation", "length_penalty", ["1e308", "-400.0", "nan"]),
        ("generation", "temperature", ["1e-310", "0.0", "-1.0", "inf"]),
        ("generation", "top_k", ["-1"]),
        ("generation", "top_p", ["0.0", "2.0", "nan"]),
        ("generation", "noise_scale", ["1e39", "-1.0"]),
        ("generation", "suppress_tokens", ['"abc"', "[1000]", "[-1]"]),
        ("generation", "bad_words_ids", ['"oops"', "[[]]", "[[1000]]"]),
        ("generation", "forced_bos_id", ["1000"]),
        ("generation", "repetition_penalty", ["0.0", "nan"]),
        ("generation", "no_repeat_ngram_size", ["-1"]),
        ("generation", "min_new_tokens", ["-1"]),
        ("generation", "early_stopping", ['"yes"']),
        ("generation", "max_length", ["5"]),
        ("int8", "reduce_range", ['"x"']),
        ("int8", "int4_block_size", ["3", "8"]),
        ("int8", "int4_accuracy_level", ["5"]),
        ("int8", "max_exact_match_drop", ["101.0"]),
        ("int8", "exclude", ['[""]']),
        ("bogus_section", "x", ["1"]),
    ]:
        bad += [(f"{section}.{key}={v[:40]}", {f"{section}.{key}": v}) for v in values]

    def toml_attack(ov: dict[str, str | None]) -> Prep:
        return lambda c: ["build", "--config", c.toml(ov), "--out", "out"]

    rows: list[tuple[str, str, Prep]] = [(n, "error", toml_attack(ov)) for n, ov in bad]
    rows += [(f"generation: beam with num_beams {v}", "error",
              toml_attack({"generation.strategy": '"beam"', "generation.num_beams": v}))
             for v in ("5", "100")]  # above the profile's batch max: every generate would fail

    def raw(text: str | bytes) -> Prep:
        return lambda c: ["build", "--config", c.toml(raw=text), "--out", "out"]

    base = toml_text()
    rows += [
        ("toml: unclosed table", "error", raw("[model\nname = 'x'\n")),
        ("toml: key without value", "error", raw("[model]\nname =\n")),
        ("toml: binary garbage", "error", raw(bytes(range(256)) * 8)),
        ("toml: invalid UTF-8 in a string", "error", raw(b'[model]\nname = "\xff\xfe"\n')),
        ("toml: duplicate key", "error", raw(base + '[model]\nname = "again"\n')),
        ("toml: 100k nested arrays", "error", raw("[model]\nx = " + "[" * 100_000 +
                                                  "]" * 100_000 + "\n")),
        ("toml: 100k nested inline tables", "error",
         raw("[model]\nx = " + "{a = " * 20_000 + "1" + "}" * 20_000 + "\n")),
        ("toml: NUL byte", "error", raw(b"[model]\nname = \"a\x00b\"\n")),
        ("toml: 20 MB string", "error",
         raw('[model]\nname = "' + "x" * 20_000_000 + '"\n')),
        ("toml: integer of 5000 digits", "error", raw("[model]\nseed = " + "9" * 5000 + "\n")),
        ("toml: a table where a value goes", "error", raw("[model.vocab_size]\nx = 1\n")),
        ("toml: array of tables", "error", raw("[[model]]\nname = 'x'\n")),
    ]

    def checkpoint(data: bytes, name: str = "ck.safetensors") -> Prep:
        def prep(c: Ctx) -> list[str]:
            c.file(name, data)
            return ["build", "--config", c.toml({"model.checkpoint": f'"{name}"'}), "--out", "o"]
        return prep

    huge_header = (2 ** 62).to_bytes(8, "little") + b"{}"
    rows += [
        ("checkpoint: text file", "error", checkpoint(b"not weights\n")),
        ("checkpoint: empty file", "error", checkpoint(b"")),
        ("checkpoint: header of 2**62 bytes", "error", checkpoint(huge_header)),
        ("checkpoint: header not JSON", "error",
         checkpoint((10).to_bytes(8, "little") + b"not json!!")),
        ("checkpoint: a pickle that runs code", "error",
         checkpoint(b"cos\nsystem\n(S'touch pwned'\ntR.", "ck.pt")),
        ("checkpoint: another model's weights", "error", _other_checkpoint),
        ("checkpoint: symlink loop", "error", _loop_checkpoint),
        ("checkpoint: a FIFO", "error", _fifo_checkpoint),
    ]

    def cfg_path(make: Callable[[Ctx], str], out: str = "out") -> Prep:
        return lambda c: ["build", "--config", make(c), "--out", out]

    rows += [
        ("--config missing", "error", cfg_path(lambda c: "nope.toml")),
        ("--config a folder", "error", cfg_path(lambda c: c.userdir())),
        ("--config /dev/zero", "error", cfg_path(lambda c: "/dev/zero")),
        ("--config a FIFO", "error", cfg_path(lambda c: c.fifo())),
        ("--config a symlink loop", "error", cfg_path(lambda c: c.link("loop.toml", "loop.toml"))),
        ("--config /dev/null with --out a user file", "error",
         lambda c: (c.file("out", "user data\n"), ["build", "--config", "/dev/null",
                                                   "--out", "out"])[1]),
    ]

    def out_attack(make: Callable[[Ctx], str]) -> Prep:
        return lambda c: ["build", "--config", c.toml(), "--out", make(c)]

    rows += [
        ("--out a user's file", "error", out_attack(lambda c: (c.file("f.txt", "mine\n"),
                                                              "f.txt")[1])),
        ("--out a user's folder", "error", out_attack(lambda c: c.userdir())),
        ("--out a symlink to a user's folder", "error",
         out_attack(lambda c: c.link("ln", c.userdir()))),
        ("--out a dangling symlink (builds where it points)", "ok", _dangling_out),
        ("--out a character device", "error", out_attack(lambda c: c.nulldev())),
        ("--out a FIFO", "error", out_attack(lambda c: c.fifo())),
        ("--out below a user's file", "error",
         out_attack(lambda c: (c.file("f.txt", "mine\n"), "f.txt/sub")[1])),
        ("--out . (the user's folder)", "error", out_attack(lambda c: (c.userdir(), ".")[1])),
        ("--out /proc/self", "error", out_attack(lambda c: "/proc/self")),
        ("--out /dev/null", "error", out_attack(lambda c: "/dev/null")),
    ]
    rows += hf_rows()
    slow = {"hf: auto_map remote code never runs", "--out a dangling symlink (builds where it "
            "points)"}  # these two may build whole models
    return [dataclasses.replace(a, timeout=600.0) if a.name in slow else a
            for a in attacks_of(rows, "build", short={
        "model.vocab_size=0", "generation.length_penalty=1e308", "generation.temperature=1e-310",
        "toml: 100k nested arrays", "checkpoint: a pickle that runs code", "--config /dev/zero",
        "--out a user's folder", "--out a character device", "hf: missing weight",
        "hf: model_type contradicts architectures"})]


def _other_checkpoint(c: Ctx) -> list[str]:
    """A checkpoint of another (wider) model: the config's model is not this one."""
    code = ("import sys\nfrom hmu_export.core.config import config_from_dict\n"
            "from hmu_export.model import build_model, save_checkpoint\n"
            "m = build_model(config_from_dict({'model': {'vocab_size': 61, 'd_model': 64,"
            " 'n_heads': 4, 'n_encoder_layers': 1, 'n_decoder_layers': 1, 'd_ff': 64,"
            " 'latent_dim': 16, 'max_len': 32}, 'profile': {'batch': [1, 2, 4],"
            " 'src_len': [1, 8, 16], 'tgt_len': [1, 4, 8]}}).model)\n"
            "from pathlib import Path\nsave_checkpoint(m, Path(sys.argv[1]))\n")
    run = c.env.run_cli([c.env.python, "-c", code, str(c.work / "other")], c.work, 120)
    if run.rc != 0:
        raise RuntimeError(run.stderr[-500:])
    c.guard("other")
    return ["build", "--config", c.toml({"model.checkpoint": '"other/model.safetensors"'}),
            "--out", "o"]


def _dangling_out(c: Ctx) -> list[str]:
    """A link to a folder not made yet: the build goes where it points, the link stays."""
    c.link("ln", "nowhere")
    c.check(lambda r: None if (c.work / "nowhere" / "manifest.json").is_file() else
            "no build where the link points")
    return ["build", "--config", c.toml(), "--out", "ln"]


def _loop_checkpoint(c: Ctx) -> list[str]:
    os.symlink("a.safetensors", c.work / "b.safetensors")
    os.symlink("b.safetensors", c.work / "a.safetensors")
    return ["build", "--config", c.toml({"model.checkpoint": '"a.safetensors"'}), "--out", "o"]


def _fifo_checkpoint(c: Ctx) -> list[str]:
    return ["build", "--config", c.toml({"model.checkpoint": f'"{c.fifo("ck.safetensors")}"'}),
            "--out", "o"]


def hf_rows() -> list[tuple[str, str, Prep]]:
    """`build` from Hugging Face folders that are not what they claim (source = "hf")."""
    def hf(edit: Callable[[Ctx], object] | None, overrides: dict[str, str | None] | None = None
           ) -> Prep:
        def prep(c: Ctx) -> list[str]:
            shutil.copytree(c.env.hf(), c.work / "t5")
            if edit is not None:
                edit(c)
            c.guard("t5")
            ov: dict[str, str | None] = {
                "model.source": '"hf"', "model.path": '"t5"', "model.vocab_size": None,
                "model.d_model": None, "model.n_heads": None, "model.n_encoder_layers": None,
                "model.n_decoder_layers": None, "model.d_ff": None, "model.latent_dim": None,
                "model.max_len": None, "profile.src_len": "[1, 7, 12]",
                "profile.tgt_len": "[1, 4, 8]"}
            return ["build", "--config", c.toml(ov | (overrides or {})), "--out", "o"]
        return prep

    def cfg_edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Ctx], object]:
        def edit(c: Ctx) -> None:
            p = c.work / "t5" / "config.json"
            d = json.loads(p.read_text())
            new = fn(d)
            p.write_text(new if isinstance(new, str) else json.dumps(d if new is None else new))
        return edit

    def write(name: str, data: str) -> Callable[[Ctx], object]:
        return lambda c: (c.work / "t5" / name).write_text(data)

    def remove(name: str) -> Callable[[Ctx], object]:
        return lambda c: (c.work / "t5" / name).unlink()

    bias = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    return [
        ("hf: missing weight", "error",
         hf(lambda c: _safetensors_edit(c, "t5", f"del t['{bias}']"))),
        ("hf: unexpected weight", "error",
         hf(lambda c: _safetensors_edit(c, "t5", "t['extra.weight'] = np.zeros(3, np.float32)"))),
        ("hf: wrongly shaped weight", "error",
         hf(lambda c: _safetensors_edit(c, "t5", f"t['{bias}'] = np.zeros((3, 3), np.float32)"))),
        ("hf: NaN weight", "error",
         hf(lambda c: _safetensors_edit(c, "t5", f"t['{bias}'][0, 0] = np.nan"))),
        ("hf: model_type contradicts architectures", "error",
         hf(cfg_edit(lambda d: d.update(model_type="gpt2")))),
        ("hf: bart model_type, T5 architecture", "error",
         hf(cfg_edit(lambda d: d.update(model_type="bart")))),
        ("hf: config.json garbage", "error", hf(write("config.json", "{not json"))),
        ("hf: config.json a list", "error", hf(write("config.json", "[1, 2]"))),
        ("hf: config.json 100k deep", "error",
         hf(write("config.json", "[" * 100_000 + "]" * 100_000))),
        ("hf: config.json vocab_size -1", "error", hf(cfg_edit(lambda d: d.update(vocab_size=-1)))),
        ("hf: config.json d_model a string", "error",
         hf(cfg_edit(lambda d: d.update(d_model="32")))),
        ("hf: no config.json", "error", hf(remove("config.json"))),
        ("hf: no weights", "error", hf(remove("model.safetensors"))),
        ("hf: index.json pointing outside the folder", "error", hf(_index_outside)),
        ("hf: auto_map remote code never runs", "any", hf(_remote_code)),
        ("hf: path missing", "error", hf(None, {"model.path": '"no-such-folder"'})),
        ("hf: path a file", "error", hf(None, {"model.path": '"t5/config.json"'})),
        ("hf: hmu_checkpoint missing", "error", hf(None, {"model.hmu_checkpoint": '"nope.st"'})),
        ("hf: hmu_checkpoint garbage", "error",
         hf(lambda c: c.file("hmu.safetensors", b"garbage"),
            {"model.hmu_checkpoint": '"hmu.safetensors"'})),
        ("hf: generation_config suppress_tokens 'abc'", "error",
         hf(write("generation_config.json", '{"suppress_tokens": "abc"}'))),
        ("hf: generation_config bad_words_ids 'oops'", "error",
         hf(write("generation_config.json", '{"bad_words_ids": "oops"}'))),
        ("hf: generation_config length_penalty 1e308", "error",
         hf(write("generation_config.json", '{"num_beams": 2, "length_penalty": 1e308}'))),
        ("hf: generation_config num_beams 8", "error",
         hf(write("generation_config.json", '{"num_beams": 8}'))),
        ("hf: generation_config eos list", "error",
         hf(write("generation_config.json", '{"eos_token_id": [1, 77]}'))),
        ("hf: generation_config garbage", "error", hf(write("generation_config.json", "]["))),
        ("hf: tokenizer.json garbage", "error", hf(write("tokenizer.json", "{garbage"))),
    ]


def _remote_code(c: Ctx) -> None:
    """config.json's auto_map names code in the folder that leaves a mark when imported: the
    build may refuse it or ignore it (and then builds the T5), never run it."""
    folder = c.work / "t5"
    (folder / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name("
                                    "'PWNED').write_text('ran')\nfrom transformers import "
                                    "T5ForConditionalGeneration as Model\n")
    conf = json.loads((folder / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForSeq2SeqLM": "evil.Model", "AutoConfig": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(conf))
    c.check(lambda r: "the folder's code ran" if (folder / "PWNED").exists() else None)


def _index_outside(c: Ctx) -> None:
    """A sharded-weights index naming a file outside the model folder."""
    folder = c.work / "t5"
    (folder / "model.safetensors").rename(c.work / "outside.safetensors")
    c.guard("outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"shared.weight": "../outside.safetensors"}}))


# ------------------------------------------------------------------ tampered and odd builds
def _tampers() -> list[tuple[str, Callable[[Ctx], str]]]:
    """Ways a build folder is not a good build: each returns the --artifacts argument."""
    def tampered(edit: Callable[[Path], object]) -> Callable[[Ctx], str]:
        def make(c: Ctx) -> str:
            b = c.build(guard=False)
            edit(c.work / b)
            c.guard(b)
            return b
        return make

    def failed(c: Ctx) -> str:
        """A failed build as the pipeline keeps it: ``<out>.failed/``, its manifest says so."""
        b = c.build(guard=False)
        manifest = c.work / b / "manifest.json"
        m = json.loads(manifest.read_text())
        m["ok"] = False
        m["stages"]["parity"] = {"status": "failed", "reason": "logits differ by 3.2"}
        manifest.write_text(json.dumps(m))
        (c.work / b).rename(c.work / "build.failed")
        c.guard("build.failed")
        return "build.failed"

    def write(name: str, data: str) -> Callable[[Path], object]:
        return lambda b: (b / name).write_text(data)

    return [
        ("decoder.onnx changed", tampered(lambda b: flip(b / "decoder.onnx"))),
        ("encoder.onnx truncated", tampered(
            lambda b: (b / "encoder.onnx").write_bytes((b / "encoder.onnx").read_bytes()[:999]))),
        ("model.onnx removed", tampered(lambda b: (b / "model.onnx").unlink())),
        ("weights changed", tampered(lambda b: flip(b / "checkpoint" / "model.safetensors", .9))),
        ("manifest removed", tampered(lambda b: (b / "manifest.json").unlink())),
        ("manifest removed after changing decoder.onnx", tampered(_flip_then_unmanifest)),
        ("manifest garbage", tampered(write("manifest.json", "{garbage"))),
        ("manifest 100k deep", tampered(write("manifest.json", "[" * 100_000 + "]" * 100_000))),
        ("manifest names ../../etc/passwd", tampered(_manifest_escape)),
        ("a .failed build", failed),
        ("an empty folder", _empty_folder),
        ("a user's folder", lambda c: c.userdir()),
        ("a regular file", lambda c: (c.file("f.txt", "mine\n"), "f.txt")[1]),
        ("/dev/null", lambda c: "/dev/null"),
        ("a missing path", lambda c: "no-such-build"),
    ]


def _flip_then_unmanifest(b: Path) -> None:
    flip(b / "decoder.onnx")
    (b / "manifest.json").unlink()


def _empty_folder(c: Ctx) -> str:
    (c.work / "empty").mkdir()
    c.guard("empty")
    return "empty"


def _manifest_escape(b: Path) -> None:
    m = json.loads((b / "manifest.json").read_text())
    arts = m["artifacts"]
    key = next(iter(arts)) if isinstance(arts, dict) else None
    if key is not None:
        arts["../../etc/passwd"] = arts.pop(key)
    else:
        arts.append({"path": "../../etc/passwd", "sha256": "0" * 64})
    (b / "manifest.json").write_text(json.dumps(m))


READERS: dict[str, Callable[[str, Ctx], list[str]]] = {
    "info": lambda b, c: ["info", "--artifacts", b],
    "generate": lambda b, c: ["generate", "--artifacts", b, "--input", _in(c)],
    "parity": lambda b, c: ["parity", "--artifacts", b, "--shapes", "1x2x2"],
    "bench": lambda b, c: ["bench", "--artifacts", b, "--quick", "--shapes", "1x2x2",
                           "--no-hmu-overhead", "--json", "r.json"],
    "export": lambda b, c: ["export", "--artifacts", b],
    "engine": lambda b, c: ["engine", "--artifacts", b],
    "triton": lambda b, c: ["triton", "--artifacts", b, "--out", "repo"],
    "debug-precision": lambda b, c: ["debug-precision", "--artifacts", b, "--shapes", "1x2x2"],
}


def _reader(argv: Callable[[str, Ctx], list[str]], make: Callable[[Ctx], str]) -> Prep:
    return lambda c: argv(make(c), c)


def tamper_attacks() -> list[Attack]:
    """Every command that reads a build, on every kind of bad build: each must refuse."""
    out = []
    for command, argv in READERS.items():
        for name, make in _tampers():
            short = command in ("info", "generate") and name in (
                "manifest removed after changing decoder.onnx", "a .failed build",
                "decoder.onnx changed")
            out.append(Attack(command, f"build: {name}", "error",
                              _reader(argv, make), 180.0, short))
    return out


# --------------------------------------------------------------------------- generate
def generate_attacks() -> list[Attack]:
    """`generate`: request flags at and beyond the schema's edges, inputs, texts, outputs."""
    def gen(flags: list[str], expect: str, rows: int = 1) -> Prep:
        def prep(c: Ctx) -> list[str]:
            argv = ["generate", "--artifacts", c.build(), "--input", _in(c, rows), *flags]
            if expect != "error":
                argv += ["--json", c.json_out("out.json", rows)]
            return argv
        return prep

    beam, sample = ["--strategy", "beam", "--num-beams", "2"], ["--strategy", "sample"]
    grid: list[tuple[str, list[str], str]] = []
    for v, e in [("-1", "error"), (str(2 ** 64), "error"), (str(2 ** 64 - 1), "ok"),
                 ("abc", "error"), ("1e3", "error"), ("0x10", "error"), ("", "error"),
                 ("nan", "error"), ("9" * 5000, "error")]:
        grid.append((f"--seed {v[:24]} (sample)", [*sample, "--seed", v], e))
    for v in ("-1", str(2 ** 64)):
        grid.append((f"--seed {v} with noise", ["--noise-scale", "1", "--seed", v], "error"))
    for v, e in [("1e308", "error"), ("-400", "error"), ("400", "error"), ("-1e308", "error"),
                 ("nan", "error"), ("inf", "error"), ("-inf", "error"), ("x", "error"),
                 ("1e-310", "ok"), ("0", "ok"), ("-10", "ok"), ("10", "ok")]:
        grid.append((f"--length-penalty {v} (beam)", [*beam, "--length-penalty", v], e))
    for v, e in [("1e39", "error"), ("-1", "error"), ("nan", "error"), ("inf", "error"),
                 ("100", "ok"), ("101", "error"), ("1e-320", "ok")]:
        grid.append((f"--noise-scale {v}", ["--noise-scale", v], e))
    for v, e in [("1e-310", "error"), ("1e-320", "error"), ("0", "error"), ("-1", "error"),
                 ("nan", "error"), ("inf", "error"), ("1000", "ok"), ("1001", "error"),
                 ("0.001", "ok"), ("0x1p-1074", "error")]:
        grid.append((f"--temperature {v} (sample)", [*sample, "--temperature", v], e))
    for v, e in [("-1", "error"), (str(2 ** 63), "any"), ("1.5", "error"), ("0", "ok"),
                 ("1000", "any")]:
        grid.append((f"--top-k {v} (sample)", [*sample, "--top-k", v], e))
    for v, e in [("0", "error"), ("-0.1", "error"), ("1.1", "error"), ("nan", "error"),
                 ("1e-320", "any"), ("0.5", "ok")]:
        grid.append((f"--top-p {v} (sample)", [*sample, "--top-p", v], e))
    for v, e in [("0", "error"), ("-1", "error"), ("5", "error"), (str(2 ** 64), "error"),
                 ("two", "error"), ("1", "ok"), ("4", "ok")]:
        grid.append((f"--num-beams {v} (beam)", ["--strategy", "beam", "--num-beams", v], e))
    for v, e in [("0", "error"), ("-1", "error"), ("9", "error"), (str(2 ** 64), "error"),
                 ("8.0", "error"), ("1", "ok"), ("7", "ok")]:
        grid.append((f"--max-new-tokens {v}", ["--max-new-tokens", v], e))
    for v, e in [("bogus", "error"), ("", "error"), ("GREEDY", "error"), ("beam ", "ok")]:
        grid.append((f"--strategy {v!r}", ["--strategy", v], e))  # spaces are trimmed
    for v in ("0", "-1", "10000", "x"):
        grid.append((f"--threads {v}", ["--threads", v], "error"))
    for v in ("bogus", "tensorrt", "torch-cuda"):
        grid.append((f"--backend {v}", ["--backend", v], "error"))
    grid += [
        ("sample with a beam width", [*sample, "--num-beams", "3"], "any"),
        ("beam with batch 2 x 4 beams", ["--strategy", "beam", "--num-beams", "4"], "any"),
        ("--early-stopping with greedy", ["--early-stopping"], "ok"),
    ]
    rows: list[tuple[str, str, Prep]] = [(n, e, gen(f, e)) for n, f, e in grid]
    rows.append(("beam over 2 rows x 2 beams", "ok", gen(beam, "ok", rows=2)))
    rows += input_rows() + text_rows() + generate_output_rows()
    return attacks_of(rows, "generate", short={
        "--seed -1 (sample)", f"--seed {2 ** 64} (sample)", "--length-penalty 1e308 (beam)",
        "--length-penalty -400 (beam)", "--noise-scale 1e39", "--temperature 1e-310 (sample)",
        "--length-penalty 10 (beam)", "input: 100k nested lists", "input: unknown key",
        "--text lone surrogate", "--json a character device", "--json a symlink to a file",
        "input: /dev/zero", "input: a FIFO"})


def input_rows() -> list[tuple[str, str, Prep]]:
    """`generate --input`: files that are not a request."""
    def inp(data: str | bytes | None, expect: str = "error", path: str = "in.json",
            make: Callable[[Ctx], str] | None = None) -> Prep:
        def prep(c: Ctx) -> list[str]:
            name = make(c) if make else (c.file(path, data), path)[1] if data is not None \
                else path
            return ["generate", "--artifacts", c.build(), "--input", name]
        return prep

    big = '{"src_ids": [[5]], "pad": "' + "x" * (65 * 2 ** 20) + '"}'
    return [
        ("input: missing", "error", inp(None, path="nope.json")),
        ("input: a folder", "error", inp(None, make=lambda c: c.userdir())),
        ("input: /dev/zero", "error", inp(None, path="/dev/zero")),
        ("input: /dev/null", "error", inp(None, path="/dev/null")),
        ("input: a FIFO", "error", inp(None, make=lambda c: c.fifo())),
        ("input: 100k nested lists", "error", inp('{"src_ids": ' + "[" * 100_000 +
                                                  "]" * 100_000 + "}")),
        ("input: 100k nested objects", "error", inp('{"a": ' * 100_000 + "1" + "}" * 100_000)),
        ("input: unknown key", "error", inp('{"src_ids": [[5, 6]], "max_new_tokens": 1}')),
        ("input: src_ids a string", "error", inp('{"src_ids": "5 6 7"}')),
        ("input: empty src_ids", "error", inp('{"src_ids": []}')),
        ("input: an empty row", "error", inp('{"src_ids": [[]]}')),
        ("input: strings as ids", "error", inp('{"src_ids": [["5", "6"]]}')),
        ("input: negative id", "error", inp('{"src_ids": [[5, -1]]}')),
        ("input: id = vocab", "error", inp('{"src_ids": [[5, 61]]}')),
        ("input: id 2**64", "error", inp('{"src_ids": [[5, 18446744073709551616]]}')),
        ("input: float id", "error", inp('{"src_ids": [[5, 1.5]]}')),
        ("input: bool id", "error", inp('{"src_ids": [[5, true]]}')),
        ("input: NaN id", "error", inp('{"src_ids": [[5, NaN]]}')),
        ("input: 10k-digit id", "error", inp('{"src_ids": [[' + "9" * 10_000 + "]]}")),
        ("input: row longer than the profile", "error", inp(json.dumps(
            {"src_ids": [[5] * (SRC_MAX + 1)]}))),
        ("input: more rows than the profile", "error", inp(json.dumps(
            {"src_ids": [ROW] * (BATCH_MAX + 1)}))),
        ("input: ragged rows", "ok", lambda c: ["generate", "--artifacts", c.build(), "--input",
                                                 c.file("in.json", '{"src_ids": [[5], [5, 6, 7]]}')
                                                 and "in.json", "--json",
                                                 c.json_out("out.json", 2)]),
        ("input: invalid UTF-8", "error", inp(b'{"src_ids": [[5]], "\xff": 1}')),
        ("input: UTF-16", "error", inp('{"src_ids": [[5]]}'.encode("utf-16"))),
        ("input: top-level list", "error", inp("[[5, 6]]")),
        ("input: duplicate key", "any", inp('{"src_ids": [[5]], "src_ids": [[6]]}')),
        ("input: lone surrogate key", "error", inp('{"src_ids": [[5]], "\\ud800": 1}')),
        ("input: 65 MB", "error", inp(big)),
    ]


def text_rows() -> list[tuple[str, str, Prep]]:
    """`generate --text` on a build without a tokenizer and with hostile strings."""
    def text(*values: str | bytes) -> Prep:
        def prep(c: Ctx) -> list[str]:
            argv = ["generate", "--artifacts", c.build()]
            for v in values:
                argv += ["--text", v if isinstance(v, str)
                         else v.decode("utf-8", "surrogateescape")]
            return argv
        return prep

    return [
        ("--text without a tokenizer", "error", text("hello")),
        ("--text lone surrogate", "error", text(b"\xed\xa0\x80")),
        ("--text invalid UTF-8", "error", text(b"abc\xff")),
        ("--text empty", "error", text("")),
        ("--text 100 KB", "error", text("x" * 100_000)),
        ("--text control characters", "error", text("\x01\x1b[31m\x7f")),
        ("--text 5 rows", "error", text(*["a"] * 5)),
    ]


def generate_output_rows() -> list[tuple[str, str, Prep]]:
    """`generate --json`: outputs that are devices, links, folders."""
    def out(expect: str, make: Callable[[Ctx], str]) -> Prep:
        def prep(c: Ctx) -> list[str]:
            return ["generate", "--artifacts", c.build(), "--input", _in(c), "--json", make(c)]
        return prep

    def linked_file(c: Ctx) -> str:
        c.file("target.json", "old\n", guard=False)
        name = c.link("ln.json", "target.json")
        c.json_out("target.json", 1)
        return name

    def existing(c: Ctx) -> str:
        c.file("old.json", "old\n", guard=False)
        c.json_out("old.json", 1)
        return "old.json"

    return [
        ("--json a character device", "ok", out("ok", lambda c: c.nulldev())),
        ("--json a symlink to a file", "ok", out("ok", linked_file)),
        ("--json an existing file", "ok", out("ok", existing)),
        ("--json a dangling symlink", "error", out("error", lambda c: c.link("ln", "nowhere"))),
        ("--json a folder", "error", out("error", lambda c: c.userdir())),
        ("--json /dev/full", "error", out("error", lambda c: "/dev/full")),
        ("--json a FIFO without reader", "error", out("error", lambda c: c.fifo())),
        ("--json below a file", "error", out("error", lambda c: (c.file("f", "x\n"), "f/o.json")[1])),
        ("--json /proc/self/status", "error", out("error", lambda c: "/proc/self/status")),
        ("--json a new folder path", "ok",
         out("ok", lambda c: c.json_out("new/sub/o.json", 1))),
    ]


# --------------------------------------------------------------------------- finetune
def finetune_attacks() -> list[Attack]:
    """`finetune`: data files, training options and outputs."""
    good = "\n".join(json.dumps({"src": [5, 6, 7], "tgt": [8, 9]}) for _ in range(4)) + "\n"

    def ft(data: str | bytes | Callable[[Ctx], str], *flags: str, expect: str = "error",
           out: Callable[[Ctx], str] | None = None) -> Prep:
        def prep(c: Ctx) -> list[str]:
            name = data(c) if callable(data) else (c.file("d.jsonl", data), "d.jsonl")[1]
            target = out(c) if out else "hmu.safetensors"
            if expect != "error" and out is None:
                c.check(lambda r: None if (c.work / target).is_file() else
                        f"{target} not written")
            return ["finetune", "--config", c.toml(), "--data", name, "--out", target,
                    "--steps", "2", "--batch-size", "2", *flags]
        return prep

    def old_outputs(c: Ctx) -> str:
        """An earlier run's outputs, which a failed run must keep."""
        for name in ("hmu.safetensors", "hmu.log.jsonl", "hmu.loss.png"):
            c.file(name, f"earlier run: {name}\n")
        return "hmu.safetensors"

    rows: list[tuple[str, str, Prep]] = [
        ("data: /dev/zero", "error", ft(lambda c: "/dev/zero")),
        ("data: /dev/null", "error", ft(lambda c: "/dev/null")),
        ("data: missing", "error", ft(lambda c: "nope.jsonl")),
        ("data: a folder", "error", ft(lambda c: c.userdir())),
        ("data: a FIFO", "error", ft(lambda c: c.fifo())),
        ("data: empty file", "error", ft("")),
        ("data: garbage lines", "error", ft("not json\n{\n")),
        ("data: empty texts", "error", ft('{"src": "", "tgt": ""}\n' * 3)),
        ("data: empty id lists", "error", ft('{"src": [], "tgt": []}\n' * 3)),
        ("data: texts without a tokenizer", "error", ft('{"src": "uno", "tgt": "one"}\n')),
        ("data: lone surrogate", "error", ft('{"src": "\\ud800", "tgt": "x"}\n')),
        ("data: invalid UTF-8", "error", ft(b'{"src": [5], "tgt": [6]}\n\xff\xfe\n')),
        ("data: a 2 MB line", "error", ft('{"src": [' + "5, " * 700_000 + '5], "tgt": [6]}\n')),
        ("data: ids outside the vocabulary", "error", ft('{"src": [5, 999], "tgt": [6]}\n')),
        ("data: negative ids", "error", ft('{"src": [5, -2], "tgt": [6]}\n')),
        ("data: rows longer than max_len", "error",
         ft(json.dumps({"src": [5] * 40, "tgt": [6]}) + "\n")),
        ("data: unknown key", "error", ft('{"src": [5], "tgt": [6], "weight": 2}\n')),
        ("data: 100k nested", "error", ft('{"src": ' + "[" * 100_000 + "]" * 100_000 + "}\n")),
        ("--lr 1e30 keeps the old outputs", "error", ft(good, "--lr", "1e30", out=old_outputs)),
        ("--lr nan", "error", ft(good, "--lr", "nan")),
        ("--lr -1", "error", ft(good, "--lr", "-1")),
        ("--lr 0", "error", ft(good, "--lr", "0")),
        ("--steps 0", "error", ft(good, "--steps", "0")),
        ("--steps -1", "error", ft(good, "--steps", "-1")),
        ("--steps 2**63", "error", ft(good, "--steps", str(2 ** 63))),
        ("--batch-size 0", "error", ft(good, "--batch-size", "0")),
        ("--batch-size 10**9", "any", ft(good, "--batch-size", str(10 ** 9), expect="any")),
        ("--kl-weight nan", "error", ft(good, "--kl-weight", "nan")),
        ("--kl-weight -1", "error", ft(good, "--kl-weight", "-1")),
        ("--seed -1", "error", ft(good, "--seed", "-1")),
        ("--seed 2**64", "error", ft(good, "--seed", str(2 ** 64))),
        ("--out a folder", "error", ft(good, out=lambda c: c.userdir())),
        ("--out a character device", "error", ft(good, out=lambda c: c.nulldev())),
        ("--out a dangling symlink", "error", ft(good, out=lambda c: c.link("ln", "nowhere"))),
        ("--out below a file", "error",
         ft(good, out=lambda c: (c.file("f", "x\n"), "f/hmu.safetensors")[1])),
        ("--out with the log path a folder", "error",
         ft(good, out=lambda c: (c.userdir("hmu.log.jsonl"), "hmu.safetensors")[1])),
        ("--out with the plot path a folder", "error",
         ft(good, out=lambda c: (c.userdir("hmu.loss.png"), "hmu.safetensors")[1])),
        ("--eval missing", "error", ft(good, "--eval", "nope.jsonl")),
        ("--eval /dev/zero", "error", ft(good, "--eval", "/dev/zero")),
        ("--merge-into a folder of the user's other files", "ok", _merge_into_user(good)),
        ("--config a garbage TOML", "error", lambda c: ["finetune", "--config",
                                                        c.toml(raw="[model"), "--data",
                                                        c.file("d.jsonl", good).name,
                                                        "--out", "h.safetensors"]),
        ("two good steps", "ok", ft(good, expect="ok")),
    ]
    return attacks_of(rows, "finetune", timeout=240.0, short={
        "data: /dev/zero", "--lr 1e30 keeps the old outputs", "data: empty texts",
        "data: lone surrogate", "--out a character device"})


def _merge_into_user(good: str) -> Prep:
    """--merge-into writes its two checkpoint files into the folder; the user's others stay."""
    def prep(c: Ctx) -> list[str]:
        c.file("mine/notes.txt", "my notes\n")
        c.check(lambda r: None if all((c.work / "mine" / n).is_file() for n in (
            "model.safetensors", "config.json")) else "no checkpoint written in the folder")
        return ["finetune", "--config", c.toml(), "--data", c.file("d.jsonl", good).name,
                "--out", "h.safetensors", "--steps", "2", "--batch-size", "2",
                "--merge-into", "mine"]
    return prep


# --------------------------------------------------------------------------- other commands
def reader_flag_attacks() -> list[Attack]:
    """Bad arguments for the commands that read a build (the build itself is good)."""
    def cmd(command: str, *flags: str, expect: str = "error",
            extra: Callable[[Ctx], list[str]] | None = None) -> Prep:
        def prep(c: Ctx) -> list[str]:
            return [command, "--artifacts", c.build(verify=True), *flags,
                    *(extra(c) if extra else [])]
        return prep

    def js(make: Callable[[Ctx], str]) -> Callable[[Ctx], list[str]]:
        return lambda c: ["--json", make(c)]

    bad_shapes = ["0x1x1", "1x1", "axbxc", "100x1x1", "1x100x1", "-1x2x3", "1x2x3x", "",
                  "1e3x1x1"]
    parity = [(f"--shapes {s[:20]!r}", "error", cmd("parity", "--shapes", s)) for s in bad_shapes]
    # lenient but right: a repeated shape, a trailing comma, Unicode digits (int("١") == 1)
    parity += [(f"--shapes {s[:20]!r}", "any", cmd("parity", "--shapes", s))
               for s in (",".join(["1x2x2"] * 5000), "1x2x2,", "١x2x2")]
    parity += [
        ("--backends bogus", "error", cmd("parity", "--backends", "bogus")),
        ("--backends empty", "error", cmd("parity", "--backends", ",")),
        ("--backends tensorrt (absent)", "error", cmd("parity", "--backends", "tensorrt")),
        ("--json a folder", "error", cmd("parity", "--shapes", "1x2x2",
                                         extra=js(lambda c: c.userdir()))),
        ("--json a dangling symlink", "error",
         cmd("parity", "--shapes", "1x2x2", extra=js(lambda c: c.link("ln", "nowhere")))),
        ("--json a character device", "ok",
         cmd("parity", "--shapes", "1x2x2", "--backends", "onnxruntime", expect="ok",
             extra=js(lambda c: c.nulldev()))),
        ("--json below a file", "error", cmd("parity", "--shapes", "1x2x2",
                                             extra=js(lambda c: (c.file("f", "x"), "f/r")[1]))),
    ]
    dp = [(f"--shapes {s[:20]!r}", "error", cmd("debug-precision", "--shapes", s))
          for s in ["0x1x1", "axb", "1x100x1", "100x1x1"]]
    dp += [(f"{f} {v}", "error", cmd("debug-precision", "--shapes", "1x2x2", f, v))
           for f, v in [("--max-abs", "nan"), ("--max-abs", "-1"), ("--max-rel-range", "inf"),
                        ("--min-top1", "2"), ("--min-top1", "-0.5")]]
    dp += [("--include '' (every node)", "any",
            cmd("debug-precision", "--shapes", "1x2x2", "--include", "")),
           ("--json a folder", "error", cmd("debug-precision", "--shapes", "1x2x2",
                                            extra=js(lambda c: c.userdir())))]
    bench = [(f"{f} {v}", "error", cmd("bench", "--quick", "--shapes", "1x2x2",
                                       "--no-hmu-overhead", f, v))
             for f, v in [("--threads", "-1"), ("--threads", "10000"), ("--min-seconds", "nan"),
                          ("--min-seconds", "-1"), ("--settle-seconds", "nan"),
                          ("--settle-seconds", "-1"),
                          ("--backends", "bogus"), ("--backends", ""), ("--shapes", "0x0x0"),
                          ("--compare", "nope.json"), ("--current", "nope.json")]]
    bench.append(("--settle-seconds 1e308 (a bound: settled rows stop)", "any",
                  cmd("bench", "--quick", "--shapes", "1x2x2", "--no-hmu-overhead",
                      "--settle-seconds", "1e308")))
    bench += [(f"--compare auto --compare-threshold {v}", "error",
               cmd("bench", "--quick", "--shapes", "1x2x2", "--no-hmu-overhead", "--compare",
                   "auto", "--compare-threshold", v)) for v in ("nan", "-5", "100")]
    bench += [(f"--generate {f} {v}", "error", cmd("bench", "--generate", "--no-peers", f, v))
              for f, v in [("--new-tokens", "0"), ("--new-tokens", "-1"),
                           ("--new-tokens", str(10 ** 9)), ("--src-len", "0"),
                           ("--src-len", str(10 ** 9)), ("--batches", "0"), ("--batches", "x"),
                           ("--batches", ""), ("--runs", "0"), ("--runs", "-1"),
                           ("--peers", "bogus")]]
    bench += [
        ("--compare garbage JSON", "error",
         lambda c: ["bench", "--artifacts", c.build(verify=True), "--compare",
                    c.file("b.json", "{garbage").name, "--current",
                    c.file("r.json", "[]").name]),
        ("--compare 100k deep JSON", "error",
         lambda c: ["bench", "--compare", c.file("b.json", "[" * 100_000 + "]" * 100_000).name,
                    "--current", c.file("r.json", "[" * 100_000 + "]" * 100_000).name]),
        ("--json a folder", "error", cmd("bench", "--quick", "--shapes", "1x2x2",
                                         "--no-hmu-overhead", extra=js(lambda c: c.userdir()))),
    ]
    export = [
        ("--opset 17", "error", cmd("export", "--opset", "17")),
        ("--opset 21", "error", cmd("export", "--opset", "21")),
        ("--opset x", "error", cmd("export", "--opset", "x")),
        ("--artifacts and --config", "error",
         lambda c: ["export", "--artifacts", c.build(), "--config", c.toml()]),
        ("--config bad, --out a user's file", "error",
         lambda c: ["export", "--config", c.toml({"model.d_model": "0"}), "--out",
                    (c.file("f", "x\n"), "f")[1]]),
        ("--config, --out a user's folder", "error",
         lambda c: ["export", "--config", c.toml(), "--out", c.userdir()]),
        ("--config, --out a character device", "error",
         lambda c: ["export", "--config", c.toml(), "--out", c.nulldev()]),
    ]
    engine = [
        ("--require-engine without TensorRT", "error", cmd("engine", "--require-engine")),
        ("no arguments", "error", lambda c: ["engine"]),
    ]
    triton = [(f"{f} {v}", "error", cmd("triton", f, v, extra=lambda c: ["--out", "repo"]))
              for f, v in [("--max-queue-delay-us", "-1"), ("--max-queue-delay-us", "x"),
                           ("--instances", "0"), ("--instances", "-1")]]
    triton.append(("--instances 10**9", "error",
                   cmd("triton", "--instances", str(10 ** 9), extra=lambda c: ["--out", "repo"])))
    triton += [
        ("--out a user's file", "error", cmd("triton", extra=lambda c: [
            "--out", (c.file("f", "mine\n"), "f")[1]])),
        ("--out a user's folder", "error", cmd("triton", extra=lambda c: ["--out", c.userdir()])),
        ("--out a character device", "error", cmd("triton", extra=lambda c: ["--out",
                                                                            c.nulldev()])),
        ("--out a symlink to a user's folder", "error", cmd("triton", extra=lambda c: [
            "--out", c.link("ln", c.userdir())])),
        ("--out the build itself", "error", lambda c: ["triton", "--artifacts", c.build(),
                                                       "--out", "build"]),
        ("--smoke without a server", "any", cmd("triton", "--smoke",
                                                extra=lambda c: ["--out", "repo"])),
    ]
    info = [("no --artifacts", "error", lambda c: ["info"]),
            ("a symlink to a good build", "ok",
             lambda c: ["info", "--artifacts", c.link("ln", c.build())])]
    return (attacks_of(parity, "parity", short={"--shapes '100x1x1'"})
            + attacks_of(dp, "debug-precision") + attacks_of(bench, "bench")
            + attacks_of(export, "export") + attacks_of(engine, "engine")
            + attacks_of(triton, "triton", short={"--out a user's folder"})
            + attacks_of(info, "info"))


def deploy_attacks() -> list[Attack]:
    """`deploy`: repositories, targets, names and quantities that Kubernetes refuses."""
    def dep(*flags: str, repo: Callable[[Ctx], str] | None = None,
            out: Callable[[Ctx], str] | None = None) -> Prep:
        def prep(c: Ctx) -> list[str]:
            r = repo(c) if repo else f"{c.build()}/triton"
            return ["deploy", "--repository", r, "--target", "kserve", "--out",
                    out(c) if out else "k8s", "--storage-uri", "gs://bucket/repo", *flags]
        return prep

    rows: list[tuple[str, str, Prep]] = [
        ("--repository missing", "error", dep(repo=lambda c: "nope")),
        ("--repository a user's folder", "error", dep(repo=lambda c: c.userdir())),
        ("--repository a file", "error", dep(repo=lambda c: (c.file("f", "x"), "f")[1])),
        ("--repository a tampered repo", "error", _deploy_tampered),
        ("--target bogus", "error", lambda c: ["deploy", "--repository", "r", "--target", "x",
                                               "--out", "o"]),
        ("--out a user's file", "error", dep(out=lambda c: (c.file("f", "mine\n"), "f")[1])),
        ("--out a user's folder", "error", dep(out=lambda c: c.userdir())),
        ("--out a character device", "error", dep(out=lambda c: c.nulldev())),
    ]
    rows.append(("--image '' (the default image)", "any", dep("--image", "")))
    for f, v in [("--storage-uri", "not a uri"), ("--storage-uri", ""),
                 ("--pvc", "a/../b"), ("--pvc", "Bad_Claim"), ("--models", "bogus"),
                 ("--models", ""), ("--name", "Bad_Name!"), ("--name", "x" * 300),
                 ("--namespace", "UPPER"), ("--image", "a b"),
                 ("--cpu", "abc"), ("--cpu", "-1"), ("--memory", "lots"),
                 ("--min-replicas", "-1"), ("--max-replicas", "0"),
                 ("--queue-target-us", "0"), ("--queue-target-us", "-1"),
                 ("--cpu-target-percent", "0"), ("--cpu-target-percent", "101"),
                 ("--credentials-secret", "bad secret"), ("--service-account", "A_B"),
                 ("--adapter-namespace", "")]:
        rows.append((f"{f} {v[:20]!r}", "error", dep(f, v)))
    rows.append(("--max-replicas below --min-replicas", "error",
                 dep("--min-replicas", "5", "--max-replicas", "2")))
    return attacks_of(rows, "deploy", short={"--cpu 'abc'", "--out a character device"})


def _deploy_tampered(c: Ctx) -> list[str]:
    b = c.build(guard=False)
    cfgs = sorted((c.work / b / "triton").glob("*/config.pbtxt"))
    cfgs[0].write_text("garbage {{{\n")
    c.guard(b)
    return ["deploy", "--repository", f"{b}/triton", "--target", "kserve", "--out", "k8s",
            "--storage-uri", "gs://bucket/repo"]


def train_demo_attacks() -> list[Attack]:
    """`train-demo`: options and outputs it must refuse before training."""
    def td(*flags: str, out: Callable[[Ctx], str] | None = None) -> Prep:
        return lambda c: ["train-demo", "--out", out(c) if out else "demo", *flags]

    rows: list[tuple[str, str, Prep]] = [
        (f"{f} {v}", "error", td(f, v)) for f, v in [
            ("--steps", "0"), ("--steps", "-1"), ("--hmu-steps", "0"), ("--batch-size", "0"),
            ("--lr", "nan"), ("--lr", "inf"), ("--seed", "x"), ("--threads", "0"),
            ("--threads", "100000"), ("--eval-limit", "-1")]]
    rows += [
        ("--out a user's file", "error", td(out=lambda c: (c.file("f", "mine\n"), "f")[1])),
        ("--out a user's folder", "error", td(out=lambda c: c.userdir())),
        ("--out a character device", "error", td(out=lambda c: c.nulldev())),
        ("--out a symlink to a user's folder", "error",
         td(out=lambda c: c.link("ln", c.userdir()))),
        ("--out /dev/null", "error", td(out=lambda c: "/dev/null")),
    ]
    return attacks_of(rows, "train-demo", short={"--out a user's folder"})


def loadtest_attacks() -> list[Attack]:
    """`loadtest`: repositories, rates and task sets it must refuse before starting a server."""
    def lt(*flags: str, repo: Callable[[Ctx], str] | None = None) -> Prep:
        def prep(c: Ctx) -> list[str]:
            r = repo(c) if repo else f"{c.build()}/triton"
            return ["loadtest", "--repository", r, "--out", "lt", *flags]
        return prep

    rows: list[tuple[str, str, Prep]] = [
        ("--repository missing", "error", lt(repo=lambda c: "nope")),
        ("--repository a file", "error", lt(repo=lambda c: (c.file("f", "x"), "f")[1])),
        ("--repository a user's folder", "error", lt(repo=lambda c: c.userdir())),
    ]
    for f, v in [("--rates", "0"), ("--rates", "-4"), ("--rates", "nan"), ("--rates", "inf"),
                 ("--rates", ""), ("--rates", "a,b"), ("--duration", "0"),
                 ("--duration", "-1"), ("--requests", "-1"), ("--modes", "bogus"),
                 ("--modes", ","), ("--new-tokens", "x"), ("--new-tokens", "1"),
                 ("--sample-share", "2"), ("--sample-share", "nan"),
                 ("--model", "nope_generate_stream")]:
        rows.append((f"{f} {v!r}", "error", lt(f, v)))
    rows += [
        ("--task missing", "error", lt("--task", "nope.jsonl")),
        ("--task not JSON", "error", lambda c: (c.file("t.jsonl", "{oops\n"),
                                                lt("--task", "t.jsonl")(c))[1]),
        ("--task /dev/zero", "error", lt("--task", "/dev/zero")),
    ]
    return attacks_of(rows, "loadtest", short={"--rates 'nan'"})


def selftest_attacks(inject: str | None) -> list[Attack]:
    """A planted bad attack (``--inject``): the run must report it, proving it can fail."""
    py = sys.executable
    planted: dict[str, tuple[str, Prep, float]] = {
        "traceback": ("error", lambda c: [py, "-c", "raise RuntimeError('planted')"], 30.0),
        "silent": ("error", lambda c: [py, "-c", "print('looks fine')"], 30.0),
        "hang": ("error", lambda c: [py, "-c", "import time; time.sleep(60)"], 2.0),
        "data-loss": ("error", lambda c: [py, "-c", "import os; os.remove('f'); "
                                                   "raise SystemExit('error: planted')"]
                      if c.file("f", "mine\n") else [], 30.0),
    }
    if inject is None:
        return []
    expect, prep, timeout = planted[inject]
    return [Attack("selftest", f"planted {inject}", expect, prep, timeout, True)]


def all_attacks(inject: str | None = None) -> list[Attack]:
    """Every attack of the catalogue (and a planted one when asked)."""
    return (build_attacks() + tamper_attacks() + generate_attacks() + finetune_attacks()
            + reader_flag_attacks() + deploy_attacks() + train_demo_attacks()
            + loadtest_attacks() + selftest_attacks(inject))


# --------------------------------------------------------------------------- reporting
def table(results: list[Result]) -> dict[str, dict[str, int]]:
    """Counts per command x class (plus a "total" row)."""
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        for row in (r.command, "total"):
            counts.setdefault(row, {c: 0 for c in CLASSES})[r.klass] += 1
    total = counts.pop("total", {c: 0 for c in CLASSES})
    return dict(sorted(counts.items())) | {"total": total}


def render(counts: dict[str, dict[str, int]], markdown: bool = False) -> str:
    """The table as text (or a Markdown table)."""
    head = ["command", *CLASSES, "runs"]
    rows = [[cmd, *(str(c[k]) for k in CLASSES), str(sum(c.values()))]
            for cmd, c in counts.items()]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def machine() -> str:
    return (f"{platform.node() or 'host'}: {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="the representative subset (CI)")
    p.add_argument("--jobs", type=int, default=2, help="attacks run at once (default 2)")
    p.add_argument("--filter", action="append", default=[], metavar="TEXT",
                   help="only attacks whose 'command name' holds TEXT (repeatable: any)")
    p.add_argument("--inject", choices=("traceback", "silent", "hang", "data-loss"),
                   help="add one planted bad attack (to see the run fail)")
    p.add_argument("--rerun", type=Path, metavar="REPORT.json",
                   help="only the attacks that were not clean in this earlier --json report")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")
    p.add_argument("--json", type=Path, help="write every result here")
    p.add_argument("--md", type=Path, help="write the table (Markdown) here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--build", type=Path, help="reuse this build of the tiny config (scripts/"
                                              "hostile.py's TINY) instead of making one")
    args = p.parse_args(argv)

    chosen = [a for a in all_attacks(inject=args.inject)
              if (not args.short or a.short or a.command == "selftest")
              and (not args.filter or any(t in f"{a.command} {a.name}" for t in args.filter))]
    if args.rerun:
        again = {(r["command"], r["name"]) for r in json.loads(args.rerun.read_text())["results"]
                 if r["klass"] != "clean"}
        chosen = [a for a in chosen if (a.command, a.name) in again]
    names = [(a.command, a.name) for a in chosen]
    assert len(names) == len(set(names)), "attack names must be distinct per command"
    if args.list:
        for a in chosen:
            print(f"{a.command:16} {a.expect:6} {a.name}")
        print(f"{len(chosen)} attacks")
        return 0
    root = Path(tempfile.mkdtemp(prefix="hmu-hostile-"))
    (root / "runs").mkdir()
    (root / "home").mkdir()
    env = Env(root, _build=args.build.resolve() if args.build else None)
    t0 = time.monotonic()
    try:
        if any(a.command != "selftest" for a in chosen):
            env.build()
        print(f"hostile: {len(chosen)} attacks, {args.jobs} at a time (work: {root})",
              file=sys.stderr)
        results: list[Result] = []
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for r in pool.map(lambda a: run_attack(a, env), chosen):
                results.append(r)
                if len(results) % 50 == 0:
                    print(f"  {len(results)} of {len(chosen)} done", file=sys.stderr)
                if r.klass != "clean":
                    print(f"  {r.klass:9} {r.command} {r.name}: {r.why}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    counts = table(results)
    print(render(counts))
    seconds = time.monotonic() - t0
    print(f"{len(results)} attacks in {seconds:.0f} s on {machine()}")
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "short": args.short, "seconds": round(seconds, 1), "counts": counts,
              "results": [dataclasses.asdict(r) for r in results]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.md:
        args.md.write_text(render(counts, markdown=True) + "\n")
    return 0 if counts["total"]["clean"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
