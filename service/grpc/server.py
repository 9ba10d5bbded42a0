"""The grpc.aio server beside uvicorn, on the same event loop: every RPC passes one gate that does what
HTTP's layers do (service/api/middleware.py): draining, keys, requests in progress, the request counter and
latency histogram, and the service's errors as gRPC status codes.

With ``IGCV2_WORKERS`` > 1 every front-end serves gRPC on the same port through SO_REUSEPORT (the kernel
spreads connections over them; a gRPC channel is one connection, so it stays with one front-end), and
starts listening, like its HTTP, only once the executor's models are warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection

from service import auth, metrics
from service.client import Client
from service.config import Settings
from service.engine import Engine
from service.errors import (
    BadInput,
    BodyTimeout,
    ClientLeft,
    DeadlineExceeded,
    Forbidden,
    InvalidParameter,
    NotFound,
    ServiceError,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from service.grpc import schema
from service.grpc.servicer import HEALTH, Access, Call, InferenceServicer, Rpc

log = logging.getLogger("igcv2.grpc")

# The service's errors as gRPC status codes (their HTTP statuses: service/errors.py). Queue full, not ready
# and shutting down are UNAVAILABLE, as Triton answers a full queue; too large is INVALID_ARGUMENT (the same
# request never fits: retrying cannot help), though gRPC itself answers a message over the size limit
# RESOURCE_EXHAUSTED before the service sees it.
STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    BadInput: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidParameter: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ClientLeft: grpc.StatusCode.CANCELLED,
    BodyTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,  # HTTP's stalled body; a gRPC message arrives whole
}
MAX_CONCURRENT_STREAMS = 256  # RPCs in flight on one connection; a client's further RPCs wait their turn
STREAM_WINDOW = 64  # requests of one ModelStreamInfer in flight; the stream is read on as they are answered


def status_of(error: ServiceError) -> grpc.StatusCode:
    return next((code for kind, code in STATUS.items() if isinstance(error, kind)), grpc.StatusCode.INTERNAL)


class Gate:
    """Runs each RPC as HTTP's layers run a request; see the module's docstring."""

    def __init__(self, engine: Engine, settings: Settings, is_draining: Callable[[], bool]) -> None:
        self.engine = engine
        self.is_draining = is_draining
        self.admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        # With an API key, every RPC but the open ones carries it or the admin key (as HTTP's ApiKey layer).
        keys = [settings.api_key.get_secret_value() if settings.api_key else None, self.admin_key]
        self.user_keys = [key.encode() for key in keys if key] if settings.api_key else []
        self.children: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # bounded like the labels

    def handler(self, rpc: Rpc) -> grpc.RpcMethodHandler:
        """The RPC's handler; it gets the message's bytes, so that a message that does not parse is answered
        INVALID_ARGUMENT, and counted, like any bad input (gRPC's own deserializing answers INTERNAL)."""
        if rpc.stream:

            async def streaming(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async for response in self.stream(rpc, requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=rpc.response.SerializeToString)

        async def unary(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await self.call(rpc, data, context)

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=rpc.response.SerializeToString)

    async def stream(
        self, rpc: Rpc, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """ModelStreamInfer: each request runs as it arrives (up to STREAM_WINDOW at once), is counted as one
        request, and is answered when done, its error as ``error_message`` while the stream goes on (as
        Triton answers). The stream's end waits for every answer; its cancellation withdraws their images."""
        try:
            self.admit(rpc, context)
        except ServiceError as error:
            self.observe(rpc, None, status_of(error), 0.0)
            await context.abort(status_of(error), error.message, self.trailer(error))
        answers: asyncio.Queue[Any] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        clients: dict[asyncio.Future[None], Client] = {}

        async def answer(data: bytes, client: Client) -> None:
            try:
                response = await self.call(rpc, data, context, client)
                answers.put_nowait(rpc.response(infer_response=response))
            except ServiceError as error:
                answers.put_nowait(rpc.response(error_message=error.message))
            finally:
                window.release()

        async def read() -> None:
            try:
                async for data in requests:
                    await window.acquire()
                    client = Client()
                    task = asyncio.ensure_future(answer(data, client))
                    clients[task] = client
                    task.add_done_callback(clients.pop)
                await asyncio.gather(*clients)
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
        finally:  # the stream ended, or was cancelled: nobody reads the answers still to come
            reader.cancel()
            for client in list(clients.values()):
                client.leave()

    async def call(self, rpc: Rpc, data: bytes, context: grpc.aio.ServicerContext, client: Client | None = None) -> Any:
        """The RPC's answer, or its error as a status (a request of a stream, ``client`` given: as the
        :class:`ServiceError` raised). A cancelled RPC's client leaves, so its queued images are withdrawn;
        one past its deadline lets the batcher drop them (the same deadline)."""
        started = time.perf_counter()
        counted = rpc.access is not Access.OPEN
        if counted:
            metrics.IN_PROGRESS.inc()
        code = grpc.StatusCode.INTERNAL
        request = None
        try:
            if client is None:
                self.admit(rpc, context)
            request = parse(rpc, data)
            call = Call(client or Client(), context.time_remaining())
            work = asyncio.ensure_future(rpc.run(request, call))
            try:  # shielded: a cancellation reaches the work through its client, as on HTTP
                response = await asyncio.shield(work)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                if not expired:
                    call.client.leave()
                work.add_done_callback(lambda done: done.cancelled() or done.exception())  # no "never retrieved"
                raise
            code = grpc.StatusCode.OK
            return response
        except ServiceError as error:
            code = status_of(error)
            if client is not None:
                raise
            await context.abort(code, error.message, self.trailer(error))
        except Exception as error:
            log.exception("unhandled error in %s", rpc.path)
            if client is not None:
                raise ServiceError(f"internal error: {type(error).__name__}") from error
            await context.abort(code, f"internal error: {type(error).__name__}")
        finally:
            if counted:
                metrics.IN_PROGRESS.dec()
            self.observe(rpc, request, code, time.perf_counter() - started)

    def admit(self, rpc: Rpc, context: grpc.aio.ServicerContext) -> None:
        """503 while draining and 401/403 on keys, as HTTP's Draining and ApiKey layers and require_admin."""
        if rpc.access is Access.OPEN:
            return
        if self.is_draining():
            raise Unavailable("server is shutting down; retry on another replica", 1)
        authorization = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        if self.user_keys and not any(auth.bearer_matches(authorization.encode(), k) for k in self.user_keys):
            raise Unauthorized(auth.API_KEY_MESSAGE)
        if rpc.access is Access.ADMIN:
            auth.check_admin(authorization, self.admin_key)

    @staticmethod
    def trailer(error: ServiceError) -> tuple[tuple[str, str], ...]:
        """Retry-After as gRPC's retry pushback, which a client's retry policy honours."""
        retry_after = error.headers.get("Retry-After")
        return (("grpc-retry-pushback-ms", str(int(retry_after) * 1000)),) if retry_after else ()

    def observe(self, rpc: Rpc, request: Any, code: grpc.StatusCode, seconds: float) -> None:
        name = getattr(request, rpc.model_field) if rpc.model_field and request is not None else ""
        key = (rpc.path, self.engine.model_label(name) if name else "", code.name)
        if (children := self.children.get(key)) is None:
            labels = dict(zip(("endpoint", "model", "code"), key, strict=True))
            children = self.children[key] = (
                metrics.REQUESTS.labels(**labels),
                metrics.REQUEST_DURATION.labels(**labels),
            )
        children[0].inc()
        children[1].observe(seconds)


def parse(rpc: Rpc, data: bytes) -> Any:
    try:
        return rpc.request.FromString(data)
    except DecodeError as exc:
        raise BadInput(
            f"{rpc.method}: the request is not a valid {rpc.request.DESCRIPTOR.name} message ({exc})"
        ) from None


async def start(engine: Engine, settings: Settings, version: str, is_draining: Callable[[], bool]) -> grpc.aio.Server:
    """Listen on IGCV2_GRPC_PORT on this process's event loop; raises if the port cannot be bound."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
            # Several front-ends share the port; one process alone must own it (a second server fails to bind).
            ("grpc.so_reuseport", int(settings.workers > 1)),
        ]
    )
    gate = Gate(engine, settings, is_draining)
    services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for rpc in InferenceServicer(engine, settings, version, is_draining).rpcs():
        services.setdefault(rpc.service, {})[rpc.method] = gate.handler(rpc)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(name, handlers) for name, handlers in services.items()]
    )
    reflection.enable_server_reflection(
        [schema.SERVICE.full_name, HEALTH, reflection.SERVICE_NAME], server, schema.POOL
    )
    address = (
        f"[{settings.host}]:{settings.grpc_port}" if ":" in settings.host else f"{settings.host}:{settings.grpc_port}"
    )
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot serve gRPC on {address}: {exc}") from exc
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server
