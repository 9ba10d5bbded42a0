"""Errors the engine raises, each with the HTTP status it maps to; the API turns them into
``{"error": "<message>"}`` responses, so no route repeats error handling."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadInput(ServiceError):
    """Undecodable or malformed input."""

    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    status_code = 403


class BodyTimeout(ServiceError):
    """A request body stalled: the connection closes after the answer (the rest cannot be trusted)."""

    status_code = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, {"Connection": "close"})


class NotFound(ServiceError):
    """Unknown model or version."""

    status_code = 404


class ClientLeft(ServiceError):
    """The client closed its connection before its answer: 499, nginx's "client closed request",
    which nobody reads but the metrics."""

    status_code = 499


class TooLarge(ServiceError):
    """Body bytes, decoded pixels or image count over the limit."""

    status_code = 413


class UnsupportedMediaType(ServiceError):
    status_code = 415


class InvalidParameter(ServiceError):
    status_code = 422


class Unavailable(ServiceError):
    """Queue full, model not ready, or shutting down: retry later."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its images were computed."""

    status_code = 504


def from_status(status: int, message: str, headers: dict[str, str] | None = None) -> ServiceError:
    """The error another process of the service answered with, rebuilt from its status, message and headers."""
    kind = next((c for c in ServiceError.__subclasses__() if c.status_code == status), ServiceError)
    error = kind.__new__(kind)
    ServiceError.__init__(error, message, headers)
    return error
