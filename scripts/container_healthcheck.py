"""The container's HEALTHCHECK: exit 0 when the server answers 200 on /ready.

It reads the port and bind address the way the server does (``Settings``: PORT,
QIS_PORT, HOST, QIS_HOST), so a port changed by the environment is probed where the
server listens. /ready needs no API key.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from qwen_image_server.config import Settings

#: Bind addresses that mean "every interface": probe over loopback.
_ANY = {"0.0.0.0", "::", ""}


def ready_url(settings: Settings) -> str:
    """Where this container's server answers /ready."""
    host = settings.host
    if host in _ANY:
        host = "127.0.0.1" if host != "::" else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/ready"


def main() -> int:
    url = ready_url(Settings())
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
        with opener.open(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
