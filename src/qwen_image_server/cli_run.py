"""What ``serve`` and ``plan`` do once their options are read: the start checks they share (``checked_specs``,
``start_paths``) and ``run_server``, which checks the models, the memory plan and the port, then serves until
interrupted (the embedded engine under uvicorn, or the Ray Serve application)."""

from __future__ import annotations

import contextlib
import logging

from .config import Settings


def checked_specs(settings: Settings, cuda: bool = False) -> list:
    """The models ``settings`` asks for, refused (a ``ValueError``) as ``serve`` refuses them before anything loads:
    ``serve`` and ``plan`` both call this, so that they cannot disagree. ``cuda``: plan for CUDA devices under
    ``--device auto`` (``plan`` with ``QIS_FAKE_GPUS``) rather than ask this machine."""
    from .models.configured import resolve_configured
    from .models.memory_modes import check_memory_modes
    from .models.spec import ModelConfigError

    if settings.api_keys_file is not None:  # read once, here: refused before anything starts, and a file that can be
        settings.api_keys, settings.api_keys_file = settings.all_api_keys(), None  # read only once (a pipe) serves
    specs = resolve_configured(settings)
    if settings.engine != "ray":  # Ray's replicas are checked on their own device once it is known (build_deployments)
        check_memory_modes(specs, "cuda" if cuda and settings.device.strip() == "auto" else settings.device)
    if settings.engine == "ray" and settings.share_components:
        raise ModelConfigError(
            "--share-components needs the embedded engine: under --engine ray every model is its own deployment "
            "(its own replica processes), which cannot share modules"
        )
    return specs


@contextlib.contextmanager
def start_paths():
    """The start checks' look at the paths a user gave, where the system refuses the look itself (a name too long
    for the file system, a folder that may not be read): a ``ValueError`` naming the path and the system's reason,
    which ``serve`` and ``plan`` print as one line (exit 2), instead of a traceback."""
    try:
        yield
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise ValueError(f"cannot use{where}: {exc.strerror or exc}") from None


def run_server(settings: Settings, log_level: str = "info") -> None:
    """Check the models, then serve until interrupted. Model errors come before the port opens."""
    with start_paths():
        specs = checked_specs(settings)  # no torch yet (and none here on a CPU machine): bad entries fail at once
    _check_port_free(settings.host, settings.port)
    warning = open_without_keys(settings)
    if warning:
        logging.getLogger(__name__).warning(warning)
    if settings.engine == "ray":
        from . import ray_app

        _log_served(specs)
        ray_app.run(settings, specs, log_level)
        return
    from .models.planner import checked_plan

    # The plan refuses before the port opens when the workers do not fit; before the forkserver too, so that a
    # refused plan starts no process (without a GPU the plan needs no torch: it takes milliseconds).
    with start_paths():
        memory_plan = checked_plan(specs, settings)
    _log_served(specs)  # once the plan took them: a refused model was logged as served before the refusal
    logging.getLogger(__name__).info("memory plan:\n%s", memory_plan.table())
    from .engine.worker_process import start_forkserver_early

    start_forkserver_early(settings.worker_start, settings.device)
    import uvicorn

    from .api.app import create_app
    from .api.connections import GraceEndIsNoError, uvicorn_options
    from .engine.local import LocalEngine

    engine = LocalEngine(specs, settings, memory_plan)
    _exit_normally_after_signals()
    logging.getLogger("uvicorn.error").addFilter(GraceEndIsNoError())
    # After the shutdown grace period running requests are cancelled (JSON 503) and their work stopped.
    app = create_app(settings, engine)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        # uvicorn's own lines (the access log among them) go through the server's log format, which shows each
        # line's request id; uvicorn's default configuration gave them handlers and a format of their own, without it
        log_config=None,
        **uvicorn_options(settings, app.state.metrics.count_refusal),
    )


def _log_served(specs: list) -> None:
    for spec in specs:
        also = "".join(f", {alias} as {name}" for alias, name in spec.aliases)
        logging.getLogger(__name__).info("serving %s (%s) from %s%s", spec.id, spec.kind, spec.source, also)


def open_without_keys(settings: Settings) -> str | None:
    """The warning for a server that listens beyond this machine (not a loopback address) with no API key, or None."""
    import ipaddress

    host = settings.host.strip().strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a host name: it may resolve to any interface
    if loopback or settings.all_api_keys():
        return None
    return (
        f"listening on {host}:{settings.port} with no API key: anyone who can reach this port can run jobs on its "
        "GPUs; give --api-key (or QWEN_IMAGE_API_KEYS, --api-keys-file), or put an authenticating proxy in front "
        "(README: Running on a network)"
    )


def _exit_normally_after_signals() -> None:
    """SIGTERM and SIGINT end the process with ``SystemExit`` (status 143 or 130) once uvicorn has shut down.

    uvicorn handles the signal, shuts down, then raises it again with the handlers it found in place; with
    the default ones the process would die of the signal, skipping interpreter exit: atexit handlers would
    not run, and multiprocessing's would have removed the forkserver's socket folder in /tmp (one left behind
    per run) and its other resources."""
    import signal

    def exit_with(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, exit_with)


def _check_port_free(host: str, port: int) -> None:
    """Fail before any worker starts when the address is taken or the host cannot be listened on (a name that does
    not resolve, an address of no interface here). Port 0 binds a free port for the check, which checks the host."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
