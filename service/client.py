"""What a request knows of its client's connection: when its head arrived, and whether the client left.

The HTTP protocol (:mod:`service.http_protocol`) puts a :class:`Client` in each request's scope, and
the routes hand it to the engine. So a deadline runs from the head's arrival (the upload and any
event-loop backlog included), and a request whose client has gone is taken out of its queue instead
of computed for nobody: uvicorn cancels nothing when a client leaves, and ASGI would tell only a task
that awaits ``receive()``, one more task per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Any

SCOPE_KEY = "igcv2.client"


class Client:
    __slots__ = ("_on_leave", "arrival", "left")

    def __init__(self) -> None:
        self.arrival = time.monotonic()
        self.left = False
        self._on_leave: Callable[[], None] | None = None

    def on_leave(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` when the client leaves (at once if it has); None stops watching."""
        self._on_leave = callback
        if self.left and callback is not None:
            self.leave()

    def leave(self) -> None:
        """The connection closed before the answer was sent (the protocol calls this)."""
        self.left = True
        callback, self._on_leave = self._on_leave, None
        if callback is not None:
            callback()


def client_of(scope: MutableMapping[str, Any]) -> Client:
    """The request's client: the protocol's, or, under another server, one that arrived now and never leaves."""
    client = scope.get(SCOPE_KEY)
    if client is None:
        client = scope[SCOPE_KEY] = Client()
    return client
