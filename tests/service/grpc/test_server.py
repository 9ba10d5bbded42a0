"""service/grpc/server.py's one table of status codes: every error the service raises has its gRPC code."""

from __future__ import annotations

import grpc

from service import errors
from service.grpc.server import Gate, status_of


def test_every_service_error_has_a_grpc_status() -> None:
    kinds = [k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.ServiceError)]
    assert len(kinds) > 10
    for kind in kinds:
        if kind is not errors.ServiceError:
            assert (
                status_of(kind("x") if kind is not errors.Unavailable else kind("x", 1)) is not grpc.StatusCode.INTERNAL
            ), kind
    assert status_of(errors.ServiceError("x")) is grpc.StatusCode.INTERNAL
    # As Triton answers a full queue; a request over a limit never fits, retrying cannot help.
    assert status_of(errors.Unavailable("queue full", 1)) is grpc.StatusCode.UNAVAILABLE
    assert status_of(errors.TooLarge("17 images")) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(errors.ClientLeft("gone")) is grpc.StatusCode.CANCELLED


def test_retry_after_travels_as_grpc_retry_pushback() -> None:
    assert Gate.trailer(errors.Unavailable("queue full", 5)) == (("grpc-retry-pushback-ms", "5000"),)
    assert Gate.trailer(errors.BadInput("no")) == ()
