"""Pure ASGI layers around FastAPI: request metrics, API-key check, load shedding, body limit, draining.

Pure ASGI (not BaseHTTPMiddleware) so a body is streamed, never buffered, before its limit is
checked, and so the metrics see every response, errors included. ``service.app.ServiceApp`` runs
them before the request enters FastAPI at all.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from starlette.routing import Match

from igcv2.names import VERSION_TEXT
from service import auth, metrics
from service.batching import DOOR, Reservation
from service.catalog import Catalog
from service.errors import BodyTimeout, ServiceError, TooLarge, Unavailable

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
OPEN_PREFIXES = ("/health/", "/v2/health/")


def is_open(path: str) -> bool:
    """Health probes and the metrics scrape: no API key, served while draining, not counted in progress.
    ``/metrics`` exactly, not as a prefix: ``/metricsX`` is an unknown route like any other."""
    return path == "/metrics" or path.startswith(OPEN_PREFIXES)


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Counts and times every HTTP response by route template, model and status code, and counts
    the requests in progress (a short batch queue beside many requests in progress says the event
    loop, not the model, is what they wait for).

    Labels stay bounded: the endpoint is the matched route's template (routes are matched here
    too, so a request refused before routing, e.g. a 413 on its body, still gets its route), and
    the model is a loaded model's name, ``unknown`` for any other name, empty for routes without one.
    """

    def __init__(
        self, app: ASGIApp, routes: Callable[[], list[Any]], model_label: Callable[[str], str], default_model: str
    ) -> None:
        self.app = app
        self.routes = routes
        self.model_label = model_label
        self.default_model = default_model
        # Requests answered before routing (refusals under overload) are many: match each path once.
        self.route_for = functools.lru_cache(maxsize=1024)(self._route_for)
        self.children: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # bounded like the labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        counted = not is_open(scope["path"])
        if counted:
            metrics.IN_PROGRESS.inc()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            if counted:
                metrics.IN_PROGRESS.dec()
            key = (*self.labels(scope), str(status))
            if (children := self.children.get(key)) is None:  # labels() takes a lock and builds a tuple
                labels = dict(zip(("endpoint", "model", "code"), key, strict=True))
                children = self.children[key] = (
                    metrics.REQUESTS.labels(**labels),
                    metrics.REQUEST_DURATION.labels(**labels),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - started)

    def labels(self, scope: Scope) -> tuple[str, str]:
        route, path_params = scope.get("route"), scope.get("path_params") or {}
        if route is None:
            route, path_params = self.route_for(scope["method"], scope["path"], scope.get("root_path", ""))
        endpoint = getattr(route, "path", None) or "unmatched"
        if "name" in path_params:
            return endpoint, self.model_label(path_params["name"])
        if endpoint == "/classify":
            return endpoint, self.model_label(classify_target(scope.get("query_string", b""))[0] or self.default_model)
        return endpoint, ""

    def _route_for(self, method: str, path: str, root_path: str) -> tuple[Any, dict[str, Any]]:
        return match_route(self.routes(), {"type": "http", "method": method, "path": path, "root_path": root_path})


@functools.lru_cache(maxsize=1024)
def classify_target(query_string: bytes) -> tuple[str | None, str | None]:
    """The ``model`` and ``version`` query parameters of a /classify request (None when absent).

    Cached: under overload the same few query strings arrive thousands of times a second, and both
    the metrics and the shedding layer need them before FastAPI parses the query itself.
    """
    query = parse_qs(query_string.decode("latin-1"))
    return query.get("model", [None])[-1], query.get("version", [None])[-1]  # the last, as FastAPI reads them


def match_route(routes: list[Any], scope: Scope) -> tuple[Any, dict[str, Any]]:
    """The route a request would reach, and its path parameters (None when none matches).

    Recent FastAPI keeps an included router whole in ``app.router.routes`` (no ``path`` of its
    own), so descend into it: otherwise every request refused before routing is "unmatched".
    """
    for candidate in routes:
        inner = getattr(candidate, "original_router", None)
        if inner is not None:
            found = match_route(inner.routes, scope)
            if found[0] is not None:
                return found
            continue
        match, child = candidate.matches(scope)
        if match is Match.FULL:
            return candidate, child.get("path_params", {})
    return None, {}


class ApiKey:
    """When a key is set, every route but health and metrics needs ``Authorization: Bearer <key>``.

    The admin key passes too: a request carries one bearer token, and /v2/repository load/unload
    (which check the admin key themselves) must get past this check with it.
    """

    def __init__(self, app: ASGIApp, key: str | None, admin_key: str | None = None) -> None:
        self.app = app
        self.key = key.encode() if key else None
        self.admin_key = admin_key.encode() if admin_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        if not bearer_matches(scope, self.key) and not (self.admin_key and bearer_matches(scope, self.admin_key)):
            await send_error(send, 401, auth.API_KEY_MESSAGE, {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


def bearer_matches(scope: Scope, key: bytes) -> bool:
    """Constant-time comparison of the request's bearer token with ``key``."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return auth.bearer_matches(value, key)
    return False


class BodyLimit:
    """413 before reading a body whose Content-Length is over the limit, and while streaming one
    that grows past it (chunked uploads), so an oversized body is never buffered whole; 408 when a
    body stalls, no new byte for ``idle_timeout_s``, so a client that stops sending its body (which
    uvicorn never times out) holds neither its request nor its connection for long. A pause, not a
    total: one byte every ``idle_timeout_s`` still holds them (bound that in a proxy; docs/operating.md).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and (len(value) > 18 or int(value) > self.max_bytes):
                await send_error(send, 413, f"body of {value.decode()} bytes exceeds the limit of {self.max_bytes}")
                return
        received = 0
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # what is left to wait for is the client's disconnect: no time limit on that
                return await receive()
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(
                    f"request body stalled: nothing received for {self.idle_timeout_s:g} s after {received} bytes"
                ) from None
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge(f"body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


class Draining:
    """Once shutdown begins, new requests get 503 + Retry-After while queued ones finish.

    A request still running when the shutdown timeout expires is cancelled by uvicorn, which would
    answer it a plain-text 500 and log the cancellation as an error; it gets the same JSON 503 instead.
    """

    def __init__(self, app: ASGIApp, is_draining: Callable[[], bool]) -> None:
        self.app = app
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.is_draining() and not is_open(scope["path"]):
            await send_error(send, 503, "server is shutting down; retry on another replica", {"Retry-After": "1"})
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if started or not self.is_draining():
                raise
            # uvicorn cancelled it to end the shutdown and waits for nothing more from it: answer and end.
            await send_error(
                send,
                503,
                "server shut down before this request was answered (shutdown timeout); retry on another replica",
                {"Retry-After": "1"},
            )


INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[0-9]+))?/infer")


def holding(receive: Receive, room: Reservation) -> Receive:
    """``receive``, which holds ``room`` in its queue once the body is in: a 503 from the route's
    body read, before the body is parsed, when there is none left."""
    held = False

    async def receive_holding() -> Message:
        nonlocal held
        message = await receive()
        if not held and message["type"] == "http.request" and not message.get("more_body", False):
            held = True
            room.admission.hold(room)
        return message

    return receive_holding


class Shedding:
    """503 + Retry-After for an inference request whose model's queue has no room for as many
    images as requests lately brought, before its body is read and before it enters FastAPI.

    Under overload most requests are refused. A refusal that went through FastAPI's routing,
    parameter parsing and body reading cost ~0.3 ms on the event loop that also feeds the model,
    so clients retrying at once (ignoring Retry-After) dragged goodput down with them; here it
    costs a cached query-string lookup and a registry lookup (~0.06 ms with uvicorn's share).
    Anything this cannot resolve (unknown model, bad version) goes on to the routes, which give
    the precise error.
    """

    def __init__(self, app: ASGIApp, registry: Catalog, default_model: str) -> None:
        self.app = app
        self.registry = registry
        self.default_model = default_model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            room = self.door(scope)
        except Unavailable as refusal:
            await send_error(send, refusal.status_code, refusal.message, refusal.headers)
            return
        token = DOOR.set(room)  # None too: never what a request before it on the connection held
        try:
            await self.app(scope, receive if room is None else holding(receive, room), send)
        finally:
            if room is not None:
                room.release()  # never admitted (a 4xx, a client gone); admission gave it back already
            DOOR.reset(token)

    def door(self, scope: Scope) -> Reservation | None:
        """The model's door check (503 when its queue has no room), or None when this cannot tell
        which model the request is for: the routes give the precise error."""
        target = self.target(scope)
        if target is None:
            return None
        try:
            served = self.registry.resolve(*target)
        except ServiceError:
            return None
        return None if served.batcher is None else served.batcher.admission.door()

    def target(self, scope: Scope) -> tuple[str, int | None] | None:
        """The (model, version) an inference request addresses, or None."""
        if scope["path"] == "/classify":
            name, version = classify_target(scope.get("query_string", b""))
            name = name or self.default_model
        elif found := INFER_PATH.fullmatch(scope["path"]):
            name, version = found["name"], found["version"]
        else:
            return None
        if version is None:
            return name, None
        # Not str.isdigit: '²' is a digit to it, and 5000 digits exceed int()'s limit. Else the routes answer.
        return (name, int(version)) if VERSION_TEXT.fullmatch(version) else None
