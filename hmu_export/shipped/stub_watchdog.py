"""Readiness that tells the truth for python-backend models on Triton 2.51.

What Triton 2.51 does (checked against the ``tritonserver`` of the nvidia-pytriton wheel,
tests/test_triton_generate.py): when a python-backend stub process dies (``kill -9``, a
segfault, the OOM killer), the server does not notice. The stub stays a zombie child of
``tritonserver``; ``/v2/models/<model>/ready`` and ``/v2/health/ready`` keep answering 200 while
every request to the model fails with ``Stub process '<model>_0_0' is not healthy`` (INTERNAL).
That python backend has no model-readiness hook (``TRITONBACKEND_ModelInstanceReady`` came to
the python backend after 2.51) and no longer restarts a dead stub.

This watchdog closes the gap from outside: it watches the server's stub processes in
``/proc`` and, when one of them has died, unloads its model through the repository API, at once,
so readiness answers 400 (not ready) instead of 200, then loads it again: a fresh stub, and
readiness is 200 again because the model serves again. The server must run with
``--model-control-mode=explicit`` (the repository API is refused otherwise).

``hmu_export.deploy.triton.server.start_server`` runs it in a thread beside the server it
starts; in a container run it beside ``tritonserver`` (same PID namespace)::

    tritonserver --model-repository=/models --model-control-mode=explicit --load-model='*' &
    python3 /models/stub_watchdog.py --url 127.0.0.1:8000

Standard library only, Linux only (``/proc``), free of package imports: it is copied into the
repository as it is.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

STUB = "triton_python_backend_stub"


def stub_processes(server_pid: int | None = None) -> dict[int, tuple[str, str]]:
    """pid -> (state, model) of every python-backend stub (children of ``server_pid`` when
    given). A zombie's command line is gone: its model is "" (remember it while alive)."""
    out: dict[int, tuple[str, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        name, rest = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:].split()
        if len(rest) < 2 or (server_pid is not None and int(rest[1]) != server_pid):
            continue
        if not (name.startswith(STUB[:15]) or (argv and argv[0].endswith(STUB.encode()))):
            continue
        model = ""
        if len(argv) > 1 and argv[1].endswith(b"model.py"):  # <repo>/<model>/<version>/model.py
            model = os.path.basename(os.path.dirname(os.path.dirname(
                argv[1].decode("utf-8", "replace"))))
        out[int(entry)] = (rest[0], model)
    return out


def find_server() -> int | None:
    """The pid of the one ``tritonserver`` process visible here, or None."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", "rb") as f:
                    if f.read().strip() == b"tritonserver":
                        found.append(int(entry))
            except OSError:
                continue
    return found[0] if len(found) == 1 else None


def _post(url: str, timeout: float) -> tuple[int, str]:
    req = urllib.request.Request(url, data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")[:300]
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


class StubWatchdog(threading.Thread):
    """Unloads, then reloads, each model whose stub process died (see the module docstring).
    ``restarts`` records (model, seconds the reload took, ok) per restart."""

    def __init__(self, server_pid: int, http_url: str, *, interval: float = 0.25,
                 grace: float = 1.0, log: Callable[[str], None] | None = None,
                 load_timeout: float = 300.0) -> None:
        super().__init__(name="hmu-stub-watchdog", daemon=True)
        self.server_pid, self.interval, self.load_timeout = server_pid, interval, load_timeout
        self.base = http_url if "://" in http_url else f"http://{http_url}"
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.models: dict[int, str] = {}  # stub pid -> model, learnt while the stub was alive
        self.handled: set[int] = set()  # dead stubs already acted on (zombies linger)
        # A stub Triton ends itself (unload, reload) is reaped at once; one that stays a zombie
        # for ``grace`` seconds died behind the server's back.
        self.grace = grace
        self.zombie_since: dict[int, float] = {}
        self.learn()  # the stubs alive now: one killed before the first look is still named

    def learn(self) -> None:
        """Remember which model each live stub serves (a zombie's command line is gone)."""
        for pid, (state, model) in stub_processes(self.server_pid).items():
            if model and state not in ("Z", "X"):
                self.models[pid] = model
        self.restarts: list[tuple[str, float, bool]] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def check(self) -> list[str]:
        """One look at the stubs: the models restarted now."""
        dead: set[str] = set()
        now = time.monotonic()
        for pid, (state, model) in stub_processes(self.server_pid).items():
            if model:
                self.models[pid] = model
            if state not in ("Z", "X") or pid in self.handled:
                continue
            since = self.zombie_since.setdefault(pid, now)
            if now - since >= self.grace and self.models.get(pid):
                self.handled.add(pid)
                dead.add(self.models[pid])
        ready = self.ready_models() if dead else set()
        for model in sorted(dead & ready):  # one being unloaded on purpose is left alone
            self.restart(model)
        return sorted(dead & ready)

    def ready_models(self) -> set[str]:
        """Models the repository index says are READY (loaded: their readiness answers 200)."""
        import json

        code, text = _post(f"{self.base}/v2/repository/index", 30.0)
        if code != 200:
            return set()
        try:
            return {m["name"] for m in json.loads(text) if m.get("state") == "READY"}
        except (ValueError, TypeError, KeyError):
            return set()

    def restart(self, model: str) -> bool:
        quoted = urllib.parse.quote(model, safe="")
        t0 = time.monotonic()
        code, text = _post(f"{self.base}/v2/repository/models/{quoted}/unload", 30.0)
        self.log(f"stub watchdog: the stub of model '{model}' died; unloaded it (not ready) "
                 f"[{code}]{': ' + text if code != 200 else ''}")
        code, text = _post(f"{self.base}/v2/repository/models/{quoted}/load", self.load_timeout)
        ok = code == 200
        self.restarts.append((model, time.monotonic() - t0, ok))
        self.log(f"stub watchdog: reloaded model '{model}' with a fresh stub in "
                 f"{time.monotonic() - t0:.1f} s" if ok else
                 f"stub watchdog: reloading model '{model}' failed [{code}]: {text}")
        return ok

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - a watchdog keeps watching
                self.log(f"stub watchdog: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address")
    p.add_argument("--server-pid", type=int, help="tritonserver's pid (default: find it)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between looks")
    args = p.parse_args(argv)
    pid = args.server_pid or find_server()
    if pid is None:
        print("stub_watchdog: error: no single tritonserver process found (pass --server-pid)",
              file=sys.stderr)
        return 2
    dog = StubWatchdog(pid, args.url, interval=args.interval)
    while os.path.exists(f"/proc/{pid}"):
        dog.check()
        time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
