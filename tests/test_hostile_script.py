"""scripts/hostile.py (issues 19 and 21): its classifier on made-up runs, its guards, planted bad
attacks that must make a run fail, and the short mode (CI): every attack clean.

The classes and their rules are written here from the issues (a traceback, exit 0 where an
error was required, a hang, a destroyed or half-written file are failures; a refusal is one
``error:`` line), not read back from the script.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "hostile.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("hostile_script", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["hostile_script"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


H = _load()
TRACE = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n'


@pytest.mark.parametrize("expect, rc, stderr, timed_out, lost, wrong, klass", [
    ("error", 2, "error: model.vocab_size must be >= 1\n", False, [], [], "clean"),
    ("error", 2, "usage: python -m hmu_export build [-h]\n"
                 "python -m hmu_export build: error: unrecognized arguments\n", False, [], [],
     "clean"),
    ("any", 0, "", False, [], [], "clean"),
    ("ok", 0, "a warning\n", False, [], [], "clean"),
    ("error", 1, TRACE, False, [], [], "traceback"),
    ("error", 1, TRACE + "error: also a line\n", False, [], [], "traceback"),
    ("ok", 0, "", False, [], ["3 rows expected"], "silent"),
    ("error", 0, "", False, [], [], "silent"),
    ("error", None, "", True, [], [], "hang"),
    ("error", None, TRACE, True, ["x changed"], [], "hang"),
    ("error", 2, "error: refused\n", False, ["notes.txt changed"], [], "data loss"),
    ("ok", 0, "", False, ["left behind: .out.json.abc.tmp"], [], "data loss"),
    ("error", 2, "error: one\nerror: two\n", False, [], [], "messy"),
    ("error", -9, "", False, [], [], "messy"),
    ("ok", 2, "error: refused a valid request\n", False, [], [], "refused"),
])
def test_classify(expect, rc, stderr, timed_out, lost, wrong, klass):
    run = H.Run(rc, "", stderr, 1.0, timed_out)
    assert H.classify(expect, run, lost, wrong)[0] == klass


def test_snapshot_sees_a_file_replaced_a_device_renamed_over_and_a_link_retargeted(tmp_path):
    f = tmp_path / "f"
    f.write_text("mine")
    link = tmp_path / "ln"
    os.symlink("f", link)
    before = (H.snapshot(f), H.snapshot(link), H.snapshot(tmp_path))
    f.write_text("other")
    os.remove(link)
    os.symlink("g", link)
    after = (H.snapshot(f), H.snapshot(link), H.snapshot(tmp_path))
    assert all(b != a for b, a in zip(before, after))
    if os.geteuid() == 0:  # mknod needs root
        dev = tmp_path / "null"
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        was = H.snapshot(dev)
        (tmp_path / "tmp").write_text("x")
        os.replace(tmp_path / "tmp", dev)
        assert H.snapshot(dev) != was


def test_leftovers_are_temporary_files_and_staging_folders(tmp_path):
    (tmp_path / "out.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".out.json.x1.tmp").write_text("")
    (tmp_path / ".o.staging-1").mkdir()
    assert H.leftovers(tmp_path) == [".o.staging-1", "sub/.out.json.x1.tmp"]


def test_the_catalogue_covers_every_command_with_distinct_attacks():
    from hmu_export.commands.cli import COMMANDS

    attacks = H.all_attacks()
    assert len(attacks) >= 300
    keys = [(a.command, a.name) for a in attacks]
    assert len(keys) == len(set(keys))
    commands = {c.replace("_", "-") for c in COMMANDS}
    assert commands <= {a.command for a in attacks}
    short = [a for a in attacks if a.short]
    assert 30 <= len(short) <= 45 and {a.command for a in short} >= {
        "build", "generate", "finetune", "info", "deploy"}
    assert all(a.expect in ("error", "ok", "any") for a in attacks)


def _script(*args: str, timeout: float) -> tuple[int, dict]:  # type: ignore[type-arg]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"hostile-{os.getpid()}-{len(args)}.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    report = json.loads(out.read_text())
    out.unlink()
    return proc.returncode, report


@pytest.mark.parametrize("kind, klass", [("traceback", "traceback"), ("silent", "silent"),
                                         ("hang", "hang"), ("data-loss", "data loss")])
def test_a_planted_bad_attack_fails_the_run(kind, klass):
    rc, report = _script("--inject", kind, "--filter", "selftest", timeout=120)
    assert rc == 1
    assert report["counts"]["selftest"][klass] == 1 and report["counts"]["total"]["clean"] == 0


@pytest.mark.slow
def test_short_mode_every_attack_is_clean():
    """The CI run: the short subset against a fresh tiny build (a few minutes on 2 cores).
    HOSTILE_INJECT=traceback (or silent, hang, data-loss) plants a bad attack in it: the test
    must then fail, which is how to see that it can."""
    planted = os.environ.get("HOSTILE_INJECT")
    rc, report = _script("--short", *(["--inject", planted] if planted else []), timeout=900)
    total = report["counts"]["total"]
    bad = {r["command"] + " " + r["name"]: (r["klass"], r["why"]) for r in report["results"]
           if r["klass"] != "clean"}
    assert {k: total[k] for k in ("traceback", "silent", "hang", "data loss")} == {
        "traceback": 0, "silent": 0, "hang": 0, "data loss": 0}, bad
    assert not bad and rc == 0
    assert len(report["results"]) >= 30
