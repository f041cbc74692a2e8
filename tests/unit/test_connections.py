"""Connection settings: environment names, CLI flags, and what uvicorn is given."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qwen_image_server.api.connections import GuardedH11Protocol, uvicorn_options
from qwen_image_server.cli import settings_from_options
from qwen_image_server.config import Settings


def test_defaults_reach_uvicorn():
    options = uvicorn_options(Settings())
    assert options["limit_concurrency"] == 1000 and options["timeout_keep_alive"] == 5
    assert options["timeout_graceful_shutdown"] == 30 and options["h11_max_incomplete_event_size"] == 16384
    assert issubclass(options["http"], GuardedH11Protocol)
    assert (options["http"].header_timeout, options["http"].body_timeout, options["http"].send_timeout) == (10, 120, 60)


def test_environment_names(monkeypatch):
    for name, value in {"QIS_MAX_CONNECTIONS": "7", "QIS_HEADER_TIMEOUT": "1.5", "QIS_BODY_TIMEOUT": "9",
                        "QIS_SEND_TIMEOUT": "11", "QIS_KEEP_ALIVE_TIMEOUT": "2", "QIS_MAX_HEADER_BYTES": "4096",
                        "QIS_SHUTDOWN_GRACE_SECONDS": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    options = uvicorn_options(Settings())
    assert options["limit_concurrency"] == 7 and options["timeout_keep_alive"] == 2
    assert options["h11_max_incomplete_event_size"] == 4096 and options["timeout_graceful_shutdown"] == 0
    assert (options["http"].header_timeout, options["http"].body_timeout, options["http"].send_timeout) == (1.5, 9, 11)


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("QIS_MAX_CONNECTIONS", "7")
    settings = settings_from_options(
        {"max_connections": 3, "header_timeout": 4.0, "shutdown_grace_seconds": 2.0, "log_level": "info"}
    )
    assert (settings.max_connections, settings.header_timeout, settings.shutdown_grace_seconds) == (3, 4.0, 2.0)


@pytest.mark.parametrize("field", ["max_connections", "header_timeout", "body_timeout", "send_timeout", "keep_alive_timeout"])
def test_non_positive_values_are_refused(field):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: 0})
