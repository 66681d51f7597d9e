"""Start and stop the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel.

That binary (Triton 2.51) carries only the python backend, so on a CPU machine it serves the
python-backend model of a generated repository, which is enough to prove the repository, the
configs and the client path end to end. The server listens on 127.0.0.1 only, on free ports, and
``serve()`` always stops it (process group included), also when the body raises.

Set-up (see docs/triton.md): the wheel's backends are copied to a fresh folder with the python
backend stub for this interpreter put into ``python/``; ``LD_LIBRARY_PATH`` holds the wheel's
bundled libraries and this interpreter's libpython folder; this interpreter's ``bin`` comes first
on ``PATH`` so the stub's Python sees the same site-packages (numpy, onnxruntime).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ...core.errors import BackendUnavailable, HMUExportError
from ...shipped.stub_watchdog import StubWatchdog


class TritonServerError(HMUExportError):
    """The server could not start, or a model failed to load."""


@dataclass(frozen=True)
class PyTritonDist:
    """Paths inside the installed nvidia-pytriton wheel."""

    server: Path
    backends: Path
    stub: Path
    caches: Path
    libs: Path


def find_pytriton() -> PyTritonDist:
    try:
        import pytriton
    except ImportError:
        raise BackendUnavailable("nvidia-pytriton is not installed (pip install "
                                 "nvidia-pytriton): it ships the tritonserver binary") from None
    pkg = Path(pytriton.__file__).parent
    base = pkg / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = PyTritonDist(server=base / "bin" / "tritonserver", backends=base / "backends",
                        stub=base / "python_backend_stubs" / py / "triton_python_backend_stub",
                        caches=base / "caches", libs=pkg.parent / "nvidia_pytriton.libs")
    for what, path in (("tritonserver binary", dist.server), ("backends", dist.backends),
                       (f"python {py} backend stub", dist.stub)):
        if not path.exists():
            raise BackendUnavailable(f"nvidia-pytriton lacks its {what} ({path})")
    return dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_backends(dist: PyTritonDist, workdir: Path) -> Path:
    """A backend folder whose python backend has this interpreter's stub beside it."""
    target = workdir / "backends"
    shutil.copytree(dist.backends, target, ignore=shutil.ignore_patterns("__pycache__"))
    stub = target / "python" / "triton_python_backend_stub"
    shutil.copy2(dist.stub, stub)
    stub.chmod(0o755)
    return target


def server_env(dist: PyTritonDist) -> dict[str, str]:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [str(dist.libs), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in ld if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # the python backend would write __pycache__ into the repository, i.e. into a build's
    # triton/ folder, which its manifest then rightly refuses as unlisted files
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@dataclass
class TritonServer:
    repository: Path
    http_port: int
    grpc_port: int
    process: subprocess.Popen
    log_path: Path
    workdir: Path
    models: list[str] = field(default_factory=list)
    own_workdir: bool = False  # removed by stop()
    # Reloads a model whose python-backend stub died (Triton 2.51 keeps answering "ready"
    # for it): shipped/stub_watchdog.py. Explicit model control only.
    watchdog: StubWatchdog | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Triton shuts down gracefully), then SIGKILL to the whole process group."""
        if self.watchdog is not None:  # first: it must not reload what the shutdown ends
            with contextlib.suppress(Exception):
                self.watchdog.stop()
                self.watchdog.join(timeout=5)
        proc = self.process
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # The python backend's stub processes live in the server's group: never leave them behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def start_server(repository: Path, models: Sequence[str] | None = None, *,
                 workdir: Path | None = None, timeout: float = 90.0,
                 log_verbose: int = 0, watch_stubs: bool = True) -> TritonServer:
    """Start tritonserver on 127.0.0.1 with free ports; return once ``models`` are ready.

    ``models=None`` loads every model in the repository (Triton's default mode); a list loads
    only those (explicit mode), which is how a CPU host serves just the python-backend model.
    In explicit mode ``watch_stubs`` runs the stub watchdog (shipped/stub_watchdog.py): a
    model whose python-backend stub dies is unloaded at once (readiness answers 400, not a
    false 200) and loaded again with a fresh stub; its lines go to ``<workdir>/watchdog.log``.
    """
    dist = find_pytriton()
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise TritonServerError(f"model repository not found: {repository}")
    own_workdir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="hmu-triton-")) if workdir is None else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backends = prepare_backends(dist, workdir) if not (workdir / "backends").exists() \
        else workdir / "backends"
    last_error = ""
    for attempt in range(3):  # a free port can be taken between probe and bind: retry
        http_port, grpc_port = free_port(), free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        args = [str(dist.server), "--model-repository", str(repository),
                "--backend-directory", str(backends), "--cache-directory", str(dist.caches),
                "--http-address", "127.0.0.1", "--http-port", str(http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
                "--allow-metrics", "false", "--allow-sagemaker", "false",
                "--allow-vertex-ai", "false", "--exit-timeout-secs", "5",
                "--log-verbose", str(log_verbose)]
        if models is not None:
            args += ["--model-control-mode", "explicit"]
            for name in models:
                args += ["--load-model", name]
        log_path = workdir / f"tritonserver.{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=server_env(dist),
                                    cwd=workdir, start_new_session=True)
        server = TritonServer(repository, http_port, grpc_port, proc, log_path, workdir,
                              list(models or []))
        try:
            _wait_ready(server, models, timeout)
            server.own_workdir = own_workdir
            if models is not None and watch_stubs:
                watch_log = workdir / "watchdog.log"

                def log(line: str, path: Path = watch_log) -> None:
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

                server.watchdog = StubWatchdog(proc.pid, server.http_url, log=log)
                server.watchdog.start()
            return server
        except BaseException as exc:  # also Ctrl-C during start-up: never leak the process
            server.stop()
            if not isinstance(exc, TritonServerError):
                raise
            last_error = str(exc)
            if "address already in use" not in server.log_tail(50).lower():
                break
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    raise TritonServerError(last_error)


def _wait_ready(server: TritonServer, models: Sequence[str] | None, timeout: float) -> None:
    base = f"http://{server.http_url}/v2"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise TritonServerError("tritonserver exited during start-up (code "
                                    f"{server.process.returncode}): "
                                    f"{_first_error(server.log_tail(40))}")
        if _get(f"{base}/health/ready") == 200 and all(
                _get(f"{base}/models/{m}/ready") == 200 for m in (models or [])):
            return
        time.sleep(0.1)
    raise TritonServerError(f"tritonserver not ready after {timeout:.0f} s: "
                            f"{_first_error(server.log_tail(40))}")


def _first_error(log: str) -> str:
    """The most telling log line (model load failures), else the last one."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if ("failed to load" in low or "error" in low or "unable" in low) and \
                "cuda driver" not in low:
            return ln
    return lines[-1] if lines else "(empty log)"


@contextlib.contextmanager
def serve(repository: Path, models: Sequence[str] | None = None, **kwargs: object
          ) -> Iterator[TritonServer]:
    """``with serve(repo, ["m_python"]) as s:`` a running server, always stopped afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="hmu-triton-"))
    try:
        server = start_server(repository, models, workdir=workdir, **kwargs)  # type: ignore[arg-type]
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
