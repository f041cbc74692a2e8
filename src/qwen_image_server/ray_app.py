"""The Ray Serve application: the API (``api.app.create_app``) on the Ray engine (``engine/ray_serve.py``).

Like ``cli.py``, this module sits above every layer and wires them together. Its
``app_builder`` is the ``import_path`` of ``serve run`` and ``serve deploy``.
Importing it needs ``ray[serve]`` (``pip install 'qwen-image-server[ray]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import NoReturn

from pydantic import ValidationError
from ray import serve

from .api.app import create_app
from .cli_settings import alias_names, check_key_variables, settings_problem
from .config import Settings
from .engine.ray_deploy import build_deployments
from .logs import LOG_LEVELS
from .models.configured import resolve_configured
from .models.spec import ModelSpec


def build_application(settings: Settings, specs: list[ModelSpec], log_level: str = "info"):
    """The Serve application: one deployment per model plus the FastAPI ingress; their log lines at ``log_level``
    and above, as the embedded server's."""
    return build_deployments(settings, specs, create_app, log_level)


def app_builder(args: dict):
    """Entry point for ``serve run`` / ``serve deploy``: ``import_path: qwen_image_server.ray_app:app_builder``.

    ``args`` are Settings fields (``models``, ``workers``, ``task_timeout``...), and ``log_level`` (``serve
    --log-level``: debug, info, warning, error); the environment variables work as for ``qwen-image-server serve``.
    """
    args = dict(args or {})
    log_level = str(args.pop("log_level", "info"))
    if log_level.lower() not in LOG_LEVELS:
        raise ValueError(f"invalid settings:\n  args.log_level: one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    # the fields, and their variables' names, which Settings takes as well
    known = set(Settings.model_fields) | {name for field in Settings.model_fields for name in alias_names(field)}
    unknown = sorted(key for key in args if key not in known)
    if unknown:  # Settings ignores what it does not know: a misspelled setting would be dropped without a word
        raise ValueError("invalid settings:\n" + "\n".join(f"  args.{key}: {_not_a_setting(key)}" for key in unknown))
    try:
        settings = Settings(**{**args, "engine": "ray"})
    except ValidationError as exc:  # pydantic's own report shows the input, API keys included
        raise ValueError(settings_problem(exc, set(args), lambda field: f"args.{field}")) from None
    check_key_variables(os.environ, "api_keys" in args)
    return build_application(settings, resolve_configured(settings), log_level)


#: Seconds Serve's controller gives a new HTTP proxy to be ready before it kills and restarts it (Serve's own default
#: is 5): set for a Ray this command starts, whose processes inherit it, unless the environment sets it. On a 2-core
#: machine made busy on purpose, the test suite saw the proxy killed that way and ``serve.start`` fail.
PROXY_READY_CHECK_SECONDS = "60"


class _Signals:
    """SIGTERM and SIGINT while ``run`` runs, as Ctrl-C: recorded from its start, raised as ``KeyboardInterrupt``
    while armed (Serve's blocking wait and the graceful stop). Disarmed, while a local Ray starts, a first signal
    ends the start once the step under way is done, instead of in the middle of it (a ``ray.init`` cut short left a
    local Ray's processes running after this one); a second one interrupts at once (a start that hangs)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.armed = False
        self.starting = True  # a second signal interrupts the start; after it, only an armed one interrupts
        self.install()

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        if self.armed or (self.starting and len(self.received) > 1):
            raise KeyboardInterrupt

    def arm(self) -> None:
        """From now on a signal interrupts; one that came before interrupts at once."""
        self.install()  # whatever Serve's start installed, these are the handlers
        self.armed = True
        if self.received:
            raise KeyboardInterrupt

    def disarm(self) -> None:
        self.armed = self.starting = False

    @property
    def status(self) -> int:
        """The exit status of the first signal, as the embedded server's: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + (self.received[0] if self.received else signal.SIGINT)

    @contextlib.contextmanager
    def kept_through_ray_init(self):
        """``ray.init`` replaces this process's SIGTERM handler with one that exits at once (status 15), wherever its
        start of a local Ray has got to: kept as ours while it runs."""
        from ray._private import utils

        installs = getattr(utils, "set_sigterm_handler", None)
        if installs is not None:
            utils.set_sigterm_handler = lambda handler: None
        try:
            yield
        finally:
            if installs is not None:
                utils.set_sigterm_handler = installs


def _not_a_setting(key: str) -> str:
    """Why a Serve arg is refused: a ``QIS_`` variable's name is given as its field's (``s3_bucket``)."""
    field = key[4:].lower() if key.upper().startswith("QIS_") else None
    if field in Settings.model_fields:
        return f"not a setting: args name QIS_ variables as their settings, {field}"
    return (
        "not a setting (args are the Settings fields, such as s3_bucket for QIS_S3_BUCKET, or the other variable "
        "names README lists, such as MODEL_PATH: README, Configuration)"
    )


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """A cluster named by ``HOST:PORT`` (its GCS) answers a connection, or the start is refused now: ``ray.init``
    tried an unreachable one for minutes. ``auto`` and ``ray://`` addresses are left to ``ray.init`` (both fail by
    themselves within seconds)."""
    import socket

    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        raise ValueError(f"the Ray cluster at {address} could not be reached: {exc}") from None


def run(settings: Settings, specs: list[ModelSpec], log_level: str = "info") -> None:
    """``qwen-image-server serve --engine ray``: join or start a cluster, deploy, serve until interrupted (SIGINT
    or SIGTERM), then ``stop``. SIGTERM is taken as Ctrl-C (by default it killed this process, and with it a local
    Ray and every request running there); a second signal ends the graceful stop at once."""
    import ray

    signals = _Signals()
    if settings.ray_address is None:  # a local Ray may start here (a running cluster keeps its own setting)
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_CHECK_SECONDS)
    else:
        _check_reachable(settings.ray_address)
        signals.armed = True  # joining a cluster starts nothing here: a signal interrupts at once
    try:
        with signals.kept_through_ray_init():
            ray.init(address=settings.ray_address, ignore_reinit_error=True)
    except ConnectionError as exc:  # e.g. "ray client connection timeout" (a ray:// address, after about 30 s)
        raise ValueError(f"the Ray cluster at {settings.ray_address or 'a new local Ray'} could not be reached: {exc}") from None
    except KeyboardInterrupt:  # joining a cluster, or a second signal while a local Ray starts
        _leave(signals, settings)
    try:  # with Ray joined (the replicas' GPUs are the cluster's) and before the port opens
        application = build_application(settings, specs, log_level)
    except KeyboardInterrupt:
        _leave(signals, settings)
    except Exception:
        signals.disarm()
        if settings.ray_address is None:
            ray.shutdown()
        raise
    started = False
    try:
        if not signals.received:  # no port is opened for a server already told to stop
            serve.start(http_options={"host": settings.host, "port": settings.port})
            started = True
        signals.arm()
        serve.run(application, name=settings.ray_app_name, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        try:
            if started:  # else nothing was deployed
                # A Ray started here goes as a whole (``_leave``) right after the drain: deleting the application first
                # left Serve's proxy listening without its route for seconds, answering plain-text 404s.
                stop(settings.ray_app_name, settings.shutdown_grace_seconds, delete=settings.ray_address is not None)
        except KeyboardInterrupt:  # a second signal: the application goes now, requests in flight with it
            signals.disarm()
            logging.getLogger(__name__).warning("a second signal: %s is stopped at once", settings.ray_app_name)
            if settings.ray_address is not None:  # a local Ray's shutdown below takes it with everything else
                with contextlib.suppress(Exception):
                    serve.delete(settings.ray_app_name)
        finally:
            signals.disarm()  # the shutdown below is not cut short by another signal
        _leave(signals, settings)


def _leave(signals: _Signals, settings: Settings) -> NoReturn:
    """The end of ``run`` on a signal: a Ray started here stops (not cut short by another signal), and the process
    exits with the first signal's status."""
    import ray

    signals.disarm()
    if settings.ray_address is None:
        ray.shutdown()
    raise SystemExit(signals.status) from None


def stop(
    app_name: str, grace_seconds: float, poll_seconds: float = 0.2, answer_seconds: float = 10.0, delete: bool = True
) -> None:
    """Stop the application as the embedded server stops: its ingress refuses new requests (503 ``shutting_down``),
    the requests in flight get ``grace_seconds`` to finish, those still running then are stopped and answered 503
    ``shutting_down`` (their replica calls cancelled), and the application is deleted once they are answered (or
    ``answer_seconds`` later), its replicas with it; other applications of the cluster are left alone. Without
    ``delete`` it is left to the Ray shutdown that follows, its ingress answering 503 until then."""
    log = logging.getLogger(__name__)
    try:
        drain = serve.get_app_handle(app_name).options(method_name="drain")

        def in_flight_after(seconds: float, *how) -> int:
            """``drain(*how)`` until no request is in flight or ``seconds`` have passed; those still in flight."""
            until = time.monotonic() + seconds
            while (running := drain.remote(*how).result(timeout_s=10)) and time.monotonic() < until:
                time.sleep(poll_seconds)
            return running

        running = in_flight_after(grace_seconds)
        if running:
            in_flight_after(answer_seconds, True, True)  # stops them; each is answered as it ends
            log.warning("%d request(s) still running after %ss: stopped, answered 503", running, grace_seconds)
    except Exception as exc:  # the ingress is gone or does not answer: nothing to wait for
        log.warning("could not drain %s (%s: %s); stopping it now", app_name, type(exc).__name__, exc)
    if delete:
        serve.delete(app_name)
