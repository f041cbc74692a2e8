"""``qwen-image-server serve`` in a subprocess, as a user runs it: the benchmarks' one server helper.

Starts ``python -m qwen_image_server.cli serve`` on a free loopback port with this
checkout's ``src`` first on the path, logs to a file, waits for ``/ready`` and stops
with SIGTERM (then SIGKILL). Also what the benchmarks read from a running server: its peak
GPU memory (``GpuMemory``) and a streamed answer's stats (``read_stream``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def tiny_model(kind: str) -> Path:
    """The tiny model of ``kind`` (``text-to-image``, ``edit``, ``edit-plus``), built once into the test cache
    (``QIS_TEST_MODEL_DIR``, default ``.pytest_cache/tiny-models``) by the demo's builder (``ensure_tiny_model``)."""
    from qwen_image_server.models.tiny import TINY_MODEL_VERSION, ensure_tiny_model

    cache = Path(os.environ.get("QIS_TEST_MODEL_DIR", REPO / ".pytest_cache" / "tiny-models")) / f"v{TINY_MODEL_VERSION}"
    return ensure_tiny_model(cache / kind, kind)


def fresh_prompt(prompt: str, index: int) -> str:
    """``prompt`` made new for the ``index``-th request, at one length: each request then encodes its prompt, as a
    stream of users' prompts does. The server keeps the embeddings of prompts it has seen, so a prompt sent again
    would skip the text encoder on every warm request but not on the first. Qwen's tokenizer splits digits one by
    one (the byte-level one of ``random:`` sources reads bytes), so every take adds the same few tokens."""
    return f"{prompt}, take {index:03d}"


def package_versions() -> dict[str, str | None]:
    """The versions of the packages a benchmark's figures depend on (None for one not installed)."""
    found: dict[str, str | None] = {}
    for package in ("torch", "diffusers", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def visible_gpu_name() -> str | None:
    """The first visible CUDA GPU's name, or None without one, found as the server's memory plan finds GPUs
    (``models.machine.discover_gpus``: nothing imported where no GPU driver is loaded, else a short-lived probe
    process), so that a benchmark's own process never imports torch or touches CUDA beside the servers it measures."""
    from qwen_image_server.models.machine import discover_gpus

    gpus = discover_gpus()
    return gpus[0].name if gpus else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerExited(Exception):
    """The server stopped before it was ready; ``code`` is its exit status, ``line`` its error line."""

    def __init__(self, code: int, line: str):
        super().__init__(f"server exited with {code}: {line}")
        self.code, self.line = code, line


class ModelsFailed(Exception):
    """The server runs, but its models failed to load (``/ready`` says ``failed``): ``reasons`` by model. It would
    only try them again after ``QIS_WORKER_RETRY_SECONDS``, so waiting on is pointless."""

    def __init__(self, reasons: dict[str, str]):
        super().__init__("models failed to load: " + "; ".join(f"{model}: {why}" for model, why in reasons.items()))
        self.reasons = reasons


def ready_state(response: httpx.Response) -> bool:
    """Whether a ``/ready`` answer says ready; ``ModelsFailed`` when it says the models failed."""
    if response.status_code == 200:
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    if isinstance(body, dict) and body.get("status") == "failed":
        models = body.get("models") if isinstance(body.get("models"), dict) else {}
        failed = {name: str(model.get("error")) for name, model in models.items() if model.get("state") == "failed"}
        raise ModelsFailed(failed or {"?": "failed (no detail: /ready's detail needs an API key)"})
    return False


class ServeProcess:
    """One server process; ``args`` are serve's options after ``--host``/``--port``, ``env`` is added to the
    environment."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "qwen_image_server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 (open for the server's lifetime)
        #: One client for the polls of this server (``wait_ready``, a test's ``/ready``): ``httpx.get`` builds a client
        #: per call, and with it a TLS context that loads the CA bundle (about 50 ms of CPU), which a poll every 0.2 s
        #: turns into a quarter of a core taken from the server it waits for. Nothing kept alive: each request opens
        #: and closes its own connection, as ``httpx.get``'s does (a test may count the server's connections).
        self.http = httpx.Client(base_url=self.url, timeout=5, limits=httpx.Limits(max_keepalive_connections=0))
        self.process = subprocess.Popen(cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def logs(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def error_line(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or [""])[-1].strip()

    def wait_ready(self, timeout: float = 300) -> None:
        """Until ``/ready`` answers 200; ``ServerExited`` when the process ends first, ``ModelsFailed`` when its models
        failed to load, ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExited(self.process.returncode, self.error_line())
            try:
                if ready_state(self.http.get("/ready")):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f}s: {self.error_line()}")

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.http.close()


class GpuMemory:
    """Peak GPU memory in use while a server runs, sampled with ``nvidia-smi`` (the worker is another process).

    ``peak_mib`` is the peak of the whole run; ``peaks`` the peak of each phase, named by ``phase(name)`` (the first is
    ``"loading"``): a server's loading (FP8 conversion, compiling) can use more than serving does."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_mib: float | None = None
        self.peaks: dict[str, float] = {}
        self._phase = "loading"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def used_mib() -> float | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        values = [float(line) for line in out.stdout.split() if line.strip().replace(".", "", 1).isdigit()]
        return max(values) if out.returncode == 0 and values else None

    def phase(self, name: str) -> None:
        """Count the samples from now on as phase ``name``, after one sample of the memory in use at this moment."""
        self._record(self.used_mib())
        self._phase = name

    def _record(self, used: float | None) -> None:
        if used is not None:
            self.peak_mib = max(self.peak_mib or 0.0, used)
            self.peaks[self._phase] = max(self.peaks.get(self._phase, 0.0), used)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._record(self.used_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        # not waiting out an nvidia-smi call in progress (up to its 10 s timeout): a stopped run has 15 s in all to
        # stop its server and write its record; a sample that lands after this only raises the peak it belongs to
        self._thread.join(timeout=2)


def read_stream(lines) -> dict:
    """A streamed answer's last completed event's ``stats`` and the number of previews sent before it, as
    ``{"stats": ..., "partial_images": N}``; an error event raises."""
    stats, partials = None, 0
    for line in lines:
        if not line.startswith("data:"):
            continue
        event = json.loads(line.removeprefix("data:"))
        kind = event.get("type", "")
        if kind.endswith(".partial_image"):
            partials += 1
        elif kind.endswith(".completed"):
            stats = event.get("stats")
        elif kind == "error":
            raise RuntimeError(f"the stream ended with an error: {event.get('error')}")
    if stats is None:
        raise RuntimeError("the stream ended without a completed event")
    return {"stats": stats, "partial_images": partials}


class Stopped(BaseException):
    """SIGTERM (``scripts/gpu-check.sh``'s time budget ran out) while a server starts or answers: the running setting
    or design is recorded with what it measured so far, its server stopped, and nothing more is run. A
    ``BaseException``, so that the handlers of a request's failure do not take it for one."""


#: Seconds a stopped setting's server gets to exit before it is killed: ``timeout --kill-after=15`` kills this script
#: 15 s after its SIGTERM, and the record is written after the server is gone.
STOP_SECONDS = 8.0
#: Exit status of a benchmark stopped by SIGTERM (128 + the signal, as a shell reports it).
STOPPED_EXIT = 128 + signal.SIGTERM


def stop_on_sigterm() -> None:
    """SIGTERM ends the run as Ctrl-C does, through the ``finally`` blocks that stop what it started (Python's own
    SIGTERM ends the process without them: a server it started kept running). A second SIGTERM while they run is
    ignored. (gpu.py and two_models.py, which keep a record through a stop, use ``StopSignal``.)"""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class StopSignal:
    """SIGTERM's handler: it raises ``Stopped`` only inside ``waiting()`` (a server starting, a request answered:
    seconds to minutes), and elsewhere (writing a record, stopping a server, handling an error) only notes it, so
    that a record is never half made or lost and a server is always stopped; ``asked`` is checked after each."""

    def __init__(self):
        self.asked = False
        self._waiting = False

    def __call__(self, signum, frame) -> None:
        self.asked = True
        if self._waiting:
            raise Stopped()

    @contextlib.contextmanager
    def installed(self):
        """This handler as SIGTERM's while the block runs; the caller's again after."""
        previous = signal.signal(signal.SIGTERM, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    @contextlib.contextmanager
    def waiting(self):
        if self.asked:
            raise Stopped()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
