"""``HEAD`` on every ``GET`` route: an ASGI layer outside all the others (see ``HeadRequests``)."""

from __future__ import annotations

from starlette.routing import Match

#: Set in a request's ``state`` when a ``HEAD`` goes on as ``GET``: a route may then leave out reading its body.
HEAD_AS_GET = "qis_head"


class HeadRequests:
    """ASGI middleware (the outermost): ``HEAD`` answers as ``GET`` would, without the body (RFC 9110, 9.3.2).

    FastAPI's routes answer only the methods they name, so ``HEAD`` on a ``GET`` route
    would be 405. A ``HEAD`` whose path a ``GET`` route serves goes on as that ``GET``
    (same status and headers, ``Content-Length`` the ``GET`` body's); any other goes on
    as ``HEAD`` (405 on a ``POST`` route, 404 on no route). Every answer to a ``HEAD``
    leaves without its body, the middlewares' own refusals (401, 403, 413) too; the
    server (uvicorn) would drop one anyway.
    """

    def __init__(self, app, routes: list):
        self.app = app
        self.routes = routes

    def _serves_get(self, scope) -> bool:
        probe = {key: scope[key] for key in ("type", "path", "root_path", "headers") if key in scope}
        return any(route.matches({**probe, "method": "GET"})[0] is Match.FULL for route in self.routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        if self._serves_get(scope):
            scope.setdefault("state", {})[HEAD_AS_GET] = True  # shared with the copy (the request id is noted there)
            scope = {**scope, "method": "GET"}

        async def send_without_body(message):
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_without_body)
