"""The server's log lines: the API process's (each with its request id) and a model worker's or replica's (each with
its name), in the embedded server's processes and in Ray Serve's replicas alike."""

from __future__ import annotations

import logging

#: The levels ``--log-level`` (and a Serve config's ``log_level``) take.
LOG_LEVELS = ("debug", "info", "warning", "error")
#: The API process's lines; ``qis_request_id`` comes from ``api.security.install_request_id_logging``.
API_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(qis_request_id)s]: %(message)s"


def worker_format(name: str) -> str:
    """The lines of the worker or replica ``name``."""
    return f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s"


def log_to_stderr(level: str, line_format: str) -> None:
    """The package's loggers write ``line_format`` lines of ``level`` and above to stderr, whatever the process's own
    logging is: a Ray Serve replica's, where the package's lines had no handler (Python printed its warnings bare,
    without time, level or request id, and dropped its info lines). Called again, it sets the level and format."""
    logger = logging.getLogger(__package__ or "qwen_image_server")
    handler = next((h for h in logger.handlers if getattr(h, "qis_stderr", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.qis_stderr = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(line_format))
    logger.setLevel(level.upper())
    logger.propagate = False  # once, not again through a handler the process's root logger may have
