"""Shared fixtures: tiny offline models, in-process apps on a fake engine (``make_api``, ``api``) and real
servers (uvicorn in a subprocess) on free ports.

In-process API tests (tests/api) run the real app (``create_app``) around a ``FakeEngine``
through Starlette's TestClient: no worker process, no model, no port; a request goes
through the middlewares, the routes, the service and the fake engine in milliseconds.
What only a real process shows (workers, pipelines, connections, Ray) is in tests/e2e.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from fake_engine import FakeEngine
from qwen_image_server.api.app import create_app
from qwen_image_server.config import Settings
from qwen_image_server.config_scoped import SCOPED_NUMBERS
from qwen_image_server.models.configured import resolve_configured

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from serve_process import ServeProcess, ServerExited, free_port, tiny_model  # noqa: E402  (the benchmarks' server helper)

REPO = Path(__file__).resolve().parents[1]

#: The e2e mark, Ray's stop and the split over the test processes.
pytest_plugins = ["suite_split", "model_files"]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n auto (scripts/test.sh): the test processes share the machine's cores. One torch thread in each, and in
    # the servers they start (they inherit OMP_NUM_THREADS), instead of every process's threads competing for them.
    # torch reads it as it is imported, which nothing here has done yet (the tests that need torch import it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _build_cli_commands_once() -> None:
    """typer's ``CliRunner.invoke`` builds the click command from the Typer app on every call: 13 ms for this command
    line, about 140 times in ``-m "not e2e"``. Built once per app instead (an invocation changes nothing in it)."""
    import typer.testing

    build, built = typer.testing._get_command, {}

    def once(app):
        if app not in built:
            built[app] = build(app)
        return built[app]

    typer.testing._get_command = once


_build_cli_commands_once()


@pytest.fixture(scope="session")
def tiny_t2i() -> Path:
    return tiny_model("text-to-image")


@pytest.fixture(scope="session")
def tiny_edit() -> Path:
    return tiny_model("edit")


#: The shared servers' (local and Ray) model with engine limits of its own (``--queue-size 1@tiny-limits``...): one
#: worker, one waiting request, 5 s per task; on the local server a task told to stop may keep its worker 3 s.
LIMITED = "tiny-limits"
LIMITS = {"model_queue_size": [f"1@{LIMITED}"], "model_task_timeout": [f"5@{LIMITED}"]}


@pytest.fixture(scope="session")
def tiny_limits(tiny_t2i, tmp_path_factory) -> Path:
    """The tiny text-to-image model in a folder of its own: served under a second id, it is another model (a
    source given twice is one model with two names)."""
    return Path(shutil.copytree(tiny_t2i, tmp_path_factory.mktemp("limits") / "tiny-t2i"))


@pytest.fixture(scope="session")
def tiny_edit_plus() -> Path:
    return tiny_model("edit-plus")


# --- in-process apps on the fake engine ----------------------------------------------------------

T2I, EDIT, PLUS = "qwen-image-tiny", "qwen-image-edit-tiny", "qwen-image-edit-plus-tiny"


@dataclass
class Api:
    """One in-process server: its HTTP client, its fake engine and its settings."""

    client: TestClient
    engine: FakeEngine
    settings: Settings


@pytest.fixture(scope="session")
def tiny_models(tiny_t2i, tiny_edit, tiny_edit_plus) -> dict[str, Path]:
    """The shared server's model names and folders (specs are read from the folders; no weights are loaded)."""
    return {T2I: tiny_t2i, EDIT: tiny_edit, PLUS: tiny_edit_plus}


@pytest.fixture(scope="session")
def make_api(tiny_models, tmp_path_factory):
    """``make_api(models=None, **settings)``: an in-process server; ``models`` maps ids to folders (default: the three tiny ones)."""
    opened: list[TestClient] = []

    def make(models: dict[str, Path] | None = None, headers: dict[str, str] | None = None, **overrides) -> Api:
        entries = [f"{name}={folder}" for name, folder in (models or tiny_models).items()]
        overrides.setdefault("image_output_dir", str(tmp_path_factory.mktemp("images")))
        settings = Settings(models=entries, **overrides)
        engine = FakeEngine(resolve_configured(settings), settings)
        client = TestClient(create_app(settings, engine), headers=headers, raise_server_exceptions=False)
        client.__enter__()  # runs the app's lifespan (starts the engine)
        opened.append(client)
        return Api(client, engine, settings)

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def api(make_api) -> Api:
    """The shared in-process server: the three tiny models, two workers each, default limits."""
    return make_api(workers=2, max_steps=1000)


@pytest.fixture
def fresh_api(make_api) -> Api:
    """An in-process server of its own, for a test that changes the engine's state (pauses it, breaks a model)."""
    return make_api(workers=1, queue_size=1, task_timeout=5)


# --- real servers ------------------------------------------------------------------------------


class InFlight:
    """A POST sent from a thread that the test can cut (``cancel``): the server sees the client go away at once,
    as it does when a client gives up, without the test waiting for a client timeout to pass. ``box`` gets
    ``response`` (an ``httpx.Response``), or ``error`` when the client gave up or was cut."""

    def __init__(self, url: str, timeout: float | None = 600, **content):
        request = httpx.Request("POST", url, **content)  # json=, or files= and data=, as for httpx.post
        body = request.read()
        self.box: dict = {}
        self._connection = http.client.HTTPConnection(request.url.host, request.url.port, timeout=timeout)
        self._connection.connect()  # before returning: cancel() always has a socket to cut
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        self._thread = threading.Thread(target=self._run, args=(request.url.raw_path.decode(), body, headers), daemon=True)
        self._thread.start()

    def _run(self, path: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            self._connection.request("POST", path, body=body, headers=headers)
            answer = self._connection.getresponse()
            self.box["response"] = httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
        except (OSError, http.client.HTTPException) as exc:
            self.box["error"] = exc
        finally:
            self._connection.close()

    def cancel(self) -> None:
        """Cut the connection (the server cancels the request) and wait for the thread."""
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.join()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


def post_in_thread(url: str, body: dict, timeout: float | None = 600) -> tuple[InFlight, dict]:
    """POST ``body`` from a thread; the box gets ``response`` (or ``error`` when the client gave up)."""
    request = InFlight(url, timeout=timeout, json=body)
    return request, request.box


def png_bytes(size: tuple[int, int] = (256, 256), color: tuple[int, int, int] = (40, 90, 200)) -> bytes:
    """A PNG of one colour, for a request's image upload."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def failing_store_saves(store, nth: int, reason: str) -> list[int]:
    """Make ``store.save`` (an in-process app's image store) raise ``StorageFailed(reason)`` on its ``nth`` call, as a
    disk that fills or a bucket that refuses in the middle of a response; the list grows by one per call."""
    from qwen_image_server.errors import StorageFailed

    real_save, saves = store.save, []

    def save(data, extension, keep=frozenset()):
        saves.append(1)
        if len(saves) == nth:
            raise StorageFailed(reason)
        return real_save(data, extension, keep)

    store.save = save
    return saves


def asgi_call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], receive=None, on_send=None) -> list[dict]:
    """Call the ASGI app as a server would and return what it sends (no client in between drops a body). By default
    the request has an empty body and its client stays; ``receive`` replaces that. ``on_send(message, sent)`` runs
    before each message the app sends is taken (raising there is the connection breaking)."""
    import asyncio

    sent: list[dict] = []
    received = False

    async def empty_body() -> dict:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if on_send is not None:
            on_send(message, sent)
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
        "state": {},
    }  # fmt: skip
    asyncio.run(app(scope, receive or empty_body, send))
    return sent


def concurrently(*calls):
    """Run the calls at the same time (the shared server has two workers per model); their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``qwen-image-server ARGS`` in a process of its own, as a user runs it, until it exits (the start refusals: exit
    2 before any port opens). ``env`` is added to this process's environment."""
    command = [sys.executable, "-m", "qwen_image_server.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def imported_modules(importtime_report: str) -> set[str]:
    """The modules a ``python -X importtime`` run imported, read from the report it wrote to stderr."""
    lines = importtime_report.splitlines()
    return {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}


class Server(ServeProcess):
    """``qwen-image-server serve`` in a subprocess, as a user runs it (bench/serve_process.py), with what the
    tests ask of it: ``/ready``'s status, worker pids, the whole log, a stop without waiting."""

    def wait_ready(self, timeout: float = 300) -> Server:  # type: ignore[override]
        try:
            super().wait_ready(timeout)
        except (ServerExited, TimeoutError) as exc:
            raise RuntimeError(f"{exc}:\n{self.logs()}") from exc
        return self

    def status(self) -> dict:
        return self.http.get("/ready").json()

    def worker_pids(self, model: str) -> list[int]:
        return [w["pid"] for w in self.status()["models"][model]["workers"]]

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM) without waiting for it: ``stop`` waits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def logs(self, tail: int | None = 5000) -> str:  # type: ignore[override]
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:] if tail else text


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Start a server with the given CLI args; stopped at the end of the session (or by the caller)."""
    servers: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Server:
        log_dir = tmp_path_factory.mktemp("server")
        base_env = {"IMAGE_OUTPUT_DIR": str(log_dir / "images")}
        server = Server(list(args), env={**base_env, **(env or {})}, log_path=log_dir / "server.log")
        servers.append(server)
        return server.wait_ready()

    yield start
    for server in servers:  # all at once: each drains and stops its workers in parallel with the others
        server.terminate()
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, tiny_t2i, tiny_edit, tiny_edit_plus, tiny_limits) -> Server:
    """The shared server: a tiny text-to-image model and an edit-plus model with 2 workers each, an edit model with 1,
    and ``LIMITED`` with limits of its own."""
    return start_server(
        "--model", f"qwen-image-tiny={tiny_t2i}",
        "--model", f"qwen-image-edit-tiny={tiny_edit}",
        "--model", f"qwen-image-edit-plus-tiny={tiny_edit_plus}",
        "--model", f"{LIMITED}={tiny_limits}",
        "--workers", "2", "--workers", "1@qwen-image-edit-tiny", "--workers", f"1@{LIMITED}",
        *(flag for key, values in LIMITS.items() for value in values for flag in (_flag_of(key), value)),
        "--stuck-task-seconds", f"3@{LIMITED}",
        env={"QIS_CPU_THREADS": "1", "QIS_MAX_STEPS": "1000", **_deterministic_on_cuda()},
    )  # fmt: skip


def _flag_of(scoped_field: str) -> str:
    """The flag of a per-model Settings field: ``model_queue_size`` -> ``--queue-size``."""
    return next(s.flag for s in SCOPED_NUMBERS.values() if s.scoped_field == scoped_field)


def _deterministic_on_cuda() -> dict[str, str]:
    """On a CUDA machine the shared server runs in deterministic mode: the same seed gives the same pixels there
    only with it (README, Reproducibility), which test_reproducibility.py asserts. A CPU is deterministic anyway."""
    import torch

    return {"QIS_DETERMINISTIC": "1"} if torch.cuda.is_available() else {}


class RayServe:
    """Ray Serve in this process (``ray.init(num_cpus=2)``): the same app, deployed as Serve applications."""

    def __init__(self, port: int):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    def deploy(self, name: str, route_prefix: str, models: list[str], **settings) -> str:
        from ray import serve

        from qwen_image_server.config import Settings
        from qwen_image_server.models.configured import resolve_configured
        from qwen_image_server.ray_app import build_application

        s = Settings(
            models=models, engine="ray", ray_app_name=name, ray_gpus_per_replica=0, ray_cpus_per_replica=0.25, **settings
        )
        serve.run(build_application(s, resolve_configured(s)), name=name, route_prefix=route_prefix)
        url = self.base_url + route_prefix.rstrip("/")
        deadline = time.monotonic() + 120
        while httpx.get(url + "/ready", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray app {name} not ready")
            time.sleep(0.5)
        return url


@pytest.fixture(scope="session")
def ray_serve(tmp_path_factory):
    """One local Ray for the session (2 CPUs, no GPUs) with Serve's HTTP proxy on a free port. Without Ray (the test
    extra installs it; a machine given only the server's wheels lacks it) the tests on Ray are skipped."""
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    os.environ.setdefault("IMAGE_OUTPUT_DIR", str(tmp_path_factory.mktemp("ray-images")))
    # Serve's controller kills an HTTP proxy that is not ready within 5 s, and serve.start() then fails: seen on a
    # 2-core machine with two busy loops beside the suite. Ray's processes inherit this from here.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    # Serve's controller loop (every 0.1 s) and every Serve process's metrics export (every 0.1 s) cost this Ray
    # about 0.2 of a core while the tests between its requests run; at 0.5 s and 2 s, a third of that. What the tests
    # check does not depend on either: the engine's queue bounds and states are its own, not Serve's metrics.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "2000")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield RayServe(port)
    _stop_ray()


def _stop_ray() -> None:
    """End this session's Ray: Serve's controller, proxy and replicas go with it (serve.shutdown() first would take
    4-5 s). The deployment handles' router thread in this process would otherwise start a new local Ray on its next
    metrics push (Ray's automatic ``ray.init``), in the middle of the rest of the suite or at its exit."""
    import ray
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False
    if ray.is_initialized():
        ray.shutdown()
    # With no Ray to start, that thread's next metrics push logs an error instead, to a closed stream when it comes
    # at the interpreter's exit: stop the thread's event loop (one per process, shared by every handle).
    from ray.serve._private.router import SingletonThreadRouter

    loop = SingletonThreadRouter._asyncio_loop
    if loop is not None and loop.is_running():
        loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="session")
def ray_server(ray_serve, tiny_t2i, tiny_edit, tiny_edit_plus, tiny_limits) -> RayServe:
    """The shared models on Ray: two replicas of the text-to-image model (its own count, ``--workers
    2@qwen-image-tiny``: the Ray settings say one; test_ray.py spreads ``n`` over them), one of each edit model, and
    one of ``LIMITED`` with its own queue and task timeout (test_ray.py)."""
    ray_serve.deploy(
        "main", "/",
        [f"qwen-image-tiny={tiny_t2i}", f"qwen-image-edit-tiny={tiny_edit}", f"qwen-image-edit-plus-tiny={tiny_edit_plus}",
         f"{LIMITED}={tiny_limits}"],
        workers=1, model_workers=["2@qwen-image-tiny"], cpu_threads=1, max_steps=1000, **LIMITS,
    )  # fmt: skip
    return ray_serve


@pytest.fixture(scope="session", params=["local", "ray"])
def any_server(request):
    """The shared server on each engine, for the API tests that must behave the same on both."""
    return request.getfixturevalue("server" if request.param == "local" else "ray_server")
