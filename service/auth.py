"""Bearer-token checks, one set for both wires: HTTP headers (service/api) and gRPC metadata (service/grpc).

``IGCV2_API_KEY``: every call but health and metrics carries ``Authorization: Bearer <key>`` (the admin key
passes too: a call carries one token, and the repository calls, which check the admin key, must get past
this check with it). ``IGCV2_ADMIN_KEY``: loading and unloading models need that key.
"""

from __future__ import annotations

import hmac

from service.errors import Forbidden, Unauthorized

API_KEY_MESSAGE = "missing or invalid API key: send 'Authorization: Bearer <key>'"


def bearer_matches(authorization: bytes, key: bytes) -> bool:
    """Whether an ``Authorization`` value carries ``key`` as its bearer token (constant-time comparison)."""
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def check_admin(authorization: str, key: str | None) -> None:
    """401 without a bearer token, 403 with the wrong one, when an admin key is set."""
    if key is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "the model repository needs the admin key: send 'Authorization: Bearer <admin key>'",
            {"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Forbidden("wrong admin key for the model repository")
