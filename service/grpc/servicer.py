"""The RPCs of ``inference.GRPCInferenceService`` and of ``grpc.health.v1.Health``, each a few lines: read
the message, call the engine (the same methods as the HTTP routes), shape the answer.

The metadata, configuration, statistics and repository documents are the HTTP routes' (from the engine and
:mod:`service.oip`): their JSON is the protocol's JSON mapping of these messages, so ``ParseDict`` turns
one into the other, and a field the schema lacks fails loudly rather than going missing.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.json_format import ParseDict
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from service import oip
from service.client import Client
from service.config import Settings
from service.engine import Engine
from service.errors import NotFound, Unavailable
from service.grpc import schema, tensors

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Access(enum.Enum):
    OPEN = "open"  # health: no key, answered while draining, not counted in progress
    USER = "user"  # IGCV2_API_KEY (or the admin key) when set
    ADMIN = "admin"  # and IGCV2_ADMIN_KEY when set


@dataclass(frozen=True)
class Call:
    """What an RPC knows of its caller: its :class:`Client` (arrival, leaving) and its deadline."""

    client: Client
    timeout_s: float | None  # from the arrival; None: the RPC has no deadline


@dataclass(frozen=True)
class Rpc:
    service: str
    method: str
    request: type[Message]
    response: type[Message]
    run: Callable[[Any, Call], Awaitable[Message]]
    access: Access = Access.USER
    model_field: str | None = None  # the request field naming the model (the metrics' model label)
    stream: bool = False  # a stream of requests, each answered by ``run`` inside a ``response``

    @property
    def path(self) -> str:
        """The RPC's full name, as gRPC routes it and the metrics' endpoint label shows it."""
        return f"/{self.service}/{self.method}"


class InferenceServicer:
    def __init__(self, engine: Engine, settings: Settings, version: str, is_draining: Callable[[], bool]) -> None:
        self.engine = engine
        self.settings = settings
        self.version = version
        self.is_draining = is_draining

    def rpcs(self) -> list[Rpc]:
        def rpc(method: str, run: Callable[[Any, Call], Awaitable[Message]], *extra: Any) -> Rpc:
            found = schema.SERVICE.methods_by_name[method]
            request, response = (message_factory.GetMessageClass(t) for t in (found.input_type, found.output_type))
            return Rpc(schema.SERVICE.full_name, method, request, response, run, *extra)

        check = (health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, self.health_check, Access.OPEN)
        return [
            rpc("ServerLive", self.server_live, Access.OPEN),
            rpc("ServerReady", self.server_ready, Access.OPEN),
            rpc("ModelReady", self.model_ready, Access.USER, "name"),
            rpc("ServerMetadata", self.server_metadata),
            rpc("ModelMetadata", self.model_metadata, Access.USER, "name"),
            rpc("ModelInfer", self.model_infer, Access.USER, "model_name"),
            rpc("ModelStreamInfer", self.model_infer, Access.USER, "model_name", True),
            rpc("ModelConfig", self.model_config, Access.USER, "name"),
            rpc("ModelStatistics", self.model_statistics, Access.USER, "name"),
            rpc("RepositoryIndex", self.repository_index),
            rpc("RepositoryModelLoad", self.repository_model_load, Access.ADMIN, "model_name"),
            rpc("RepositoryModelUnload", self.repository_model_unload, Access.ADMIN, "model_name"),
            Rpc(HEALTH, "Check", *check),
        ]

    def ready(self) -> bool:
        """Every configured model loaded and warmed up, and not shutting down."""
        try:
            self.engine.check_ready()
        except Unavailable:
            return False
        return not self.is_draining()

    # ----- health and metadata -----

    async def server_live(self, request: Any, call: Call) -> Message:
        return schema.message("ServerLiveResponse")(live=True)

    async def server_ready(self, request: Any, call: Call) -> Message:
        return schema.message("ServerReadyResponse")(ready=self.ready())

    async def model_ready(self, request: Any, call: Call) -> Message:
        """Ready or not, as Triton answers: an unknown model or version is not ready (no error)."""
        try:
            self.engine.model_ready(request.name, oip.model_version(request.name, request.version))
        except (NotFound, Unavailable):
            return schema.message("ModelReadyResponse")(ready=False)
        return schema.message("ModelReadyResponse")(ready=True)

    async def server_metadata(self, request: Any, call: Call) -> Message:
        return ParseDict(oip.server_metadata(self.version), schema.message("ServerMetadataResponse")())

    async def model_metadata(self, request: Any, call: Call) -> Message:
        document = self.engine.model_metadata(request.name, oip.model_version(request.name, request.version))
        return ParseDict(document, schema.message("ModelMetadataResponse")())

    async def model_config(self, request: Any, call: Call) -> Message:
        document = self.engine.model_config(request.name, oip.model_version(request.name, request.version))
        return ParseDict({"config": document}, schema.message("ModelConfigResponse")())

    async def model_statistics(self, request: Any, call: Call) -> Message:
        """Every loaded model's statistics when the request names none."""
        name = request.name or None
        stats = await self.engine.model_statistics(name, oip.model_version(name, request.version) if name else None)
        return ParseDict({"model_stats": stats}, schema.message("ModelStatisticsResponse")())

    # ----- inference -----

    async def model_infer(self, request: Any, call: Call) -> Message:
        parsed = tensors.infer_request(request, self.settings.max_images_per_request)
        version = oip.model_version(request.model_name, request.model_version)
        answer = await self.engine.infer_oip(parsed, request.model_name, version, call.timeout_s, call.client)
        return tensors.infer_response(answer)

    # ----- model repository -----

    async def repository_index(self, request: Any, call: Call) -> Message:
        index = self.engine.repository_index(ready_only=request.ready)
        return ParseDict({"models": index}, schema.message("RepositoryIndexResponse")())

    async def repository_model_load(self, request: Any, call: Call) -> Message:
        oip.refuse_load_parameters(list(request.parameters))
        await self.engine.load_model(request.model_name)
        return schema.message("RepositoryModelLoadResponse")()

    async def repository_model_unload(self, request: Any, call: Call) -> Message:
        """``unload_dependents`` is accepted and means nothing: no model here has dependents."""
        await self.engine.unload_model(request.model_name)
        return schema.message("RepositoryModelUnloadResponse")()

    # ----- grpc.health.v1 -----

    async def health_check(self, request: Any, call: Call) -> Message:
        """The standard health check (Kubernetes' gRPC probes): SERVING once ready, for the server as a whole
        (service "") and for the inference service; NOT_FOUND for any other service, as the standard says."""
        if request.service not in ("", schema.SERVICE.full_name):
            raise NotFound(f"unknown service {request.service!r}: ask for '' or {schema.SERVICE.full_name!r}")
        status = health_pb2.HealthCheckResponse.SERVING if self.ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
