"""The HTTP/1.1 protocol the service runs: uvicorn's httptools protocol, with limits on a request's head.

uvicorn bounds neither the size of a request line and headers nor the time they take to arrive: a
1 MB header was accepted, and a client trickling header bytes held its connection and the memory of
its partial head for as long as it liked (slowloris). Here a head longer than ``max_head_bytes``
gets 414 (its request target alone) or 431 as soon as it is (within one read of the socket), and
one not complete ``head_timeout_s`` after its first byte gets 408: each the service's JSON error,
counted in ``igcv2_requests_total``, the connection then closed. A connection that sends nothing at
all is closed after the same time, silently.

Each request also gets a :class:`service.client.Client` in its scope: when its head arrived, and a
call when the connection closes before the answer, which takes its images out of the queue. And a
body answered before it was read (a 401, a 413, a shed 503), which uvicorn then reads and drops,
gets ``discard_timeout_s`` in all: a client trickling it byte by byte would otherwise hold the
connection forever, each byte restarting the keep-alive timer.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service import metrics
from service.client import SCOPE_KEY, Client

log = logging.getLogger("igcv2.http")
LINGER_S = 2.0  # after a refusal, how long the rest of what the client sends is read and dropped


class _HeadRefused(Exception):
    """Raised in a parser callback to stop the parser; httptools hands it to uvicorn as a parse error."""


class BoundedHttpTools(HttpToolsProtocol):
    max_head_bytes = 64 * 1024
    head_timeout_s = 30.0
    discard_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0  # received since the current head began; 0 between requests
        self._in_head = True  # a new connection waits for its first request's head
        self._head_begun = False  # a byte of the current head is in: a stall gets 408, not a silent close
        self._running: RequestResponseCycle | None = None  # whose app runs (self.cycle may be a pipelined one)
        self._body_done: RequestResponseCycle | None = None  # the last request whose body was all in
        self._expecting: RequestResponseCycle | None = None  # the last request sent with Expect: 100-continue
        self._idle_after_discard = False  # the rest of a body answered early came in this read
        self._refusal: tuple[int, str] | None = None
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        self._discard_timer: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_discarding()
        running = self._running
        if running is not None and not running.response_complete:
            if client := running.scope.get(SCOPE_KEY):
                client.leave()
            if running is not self.cycle:  # uvicorn tells only the last parsed (a pipelined) request
                running.disconnected = True  # its answer is then not written to the closed transport
                running.message_event.set()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)  # a chunk that also ends the head counts whole, but is then not checked
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse(*self._too_long(self._head_bytes))
        if self._idle_after_discard:  # idle as after any answer, unless a request began in this read too
            self._idle_after_discard = False
            cycle = self.cycle
            if not self._in_head and cycle is self._body_done and cycle.response_complete:
                keep_alive = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
                self.timeout_keep_alive_task = keep_alive

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if not self._in_head:  # the next request on a kept-alive connection: its head starts now (the read it
            self._in_head = True  # starts in is not counted: it may hold the end of the last body)
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_begun = False
        self._stop_head_timer()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:
            self._refusal = self._too_long(size)
            raise _HeadRefused
        self.scope[SCOPE_KEY] = Client()
        super().on_headers_complete()
        if self.expect_100_continue:
            self._expecting = self.cycle

    def on_message_complete(self) -> None:
        self._body_done = self.cycle
        super().on_message_complete()
        if self._discard_timer is not None:  # the rest of a body answered early is in (see data_received)
            self._stop_discarding()
            self._idle_after_discard = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        answered = self.cycle  # not answered: a pipelined request, parsed after this one's body was all in
        early = answered is not None and answered.response_complete and self._body_done is not answered
        if early and answered is self._expecting:  # no 100 Continue came: the client may never send the body,
            self.transport.close()  # and its next request would be read as the rest of this one
        elif early and not self.transport.is_closing():  # answered before its body was in: uvicorn drops the rest
            self._discard_timer = self.loop.call_later(self.discard_timeout_s, self._discarded_too_long, answered)

    def _discarded_too_long(self, answered: RequestResponseCycle) -> None:
        self._discard_timer = None
        if self._body_done is not answered:
            self.transport.close()

    def _stop_discarding(self) -> None:
        if self._discard_timer is not None:
            self._discard_timer.cancel()
            self._discard_timer = None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parse error, which is how a refusal raised in a callback ends up here."""
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self._refusal)

    def _too_long(self, size: int) -> tuple[int, str]:
        """414 or 431 for a head of ``size`` bytes so far."""
        limit = f"the limit for the request line and headers together is {self.max_head_bytes} bytes"
        if len(self.url) > self.max_head_bytes:
            return 414, f"request target of {len(self.url)} bytes or more; {limit}"
        return 431, f"request line and headers of {size} bytes or more; {limit}"

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_begun or self._head_bytes:
            self._refuse(408, f"request line and headers not complete after {self.head_timeout_s:g} s")
        else:
            self.transport.close()  # a connection that never sent a byte: nobody to answer

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close: the rest of the stream cannot be trusted.

        The close lingers: closing a socket with unread data resets the connection, and a client
        still sending its long head would then see the reset instead of the answer.
        """
        self._stop_head_timer()
        self._in_head = False
        self._refused = True
        log.warning("refused a request from %s: %d %s", self.client and self.client[0], status, message)
        metrics.REQUESTS.labels(endpoint="unmatched", model="", code=str(status)).inc()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a pipelined head: the response under way finishes, then uvicorn closes
            return
        body = json.dumps({"error": message}).encode()
        self.transport.write(
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def bounded_http(max_head_bytes: int, head_timeout_s: float, discard_timeout_s: float) -> type[BoundedHttpTools]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type(
        "BoundedHttpTools",
        (BoundedHttpTools,),
        {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s, "discard_timeout_s": discard_timeout_s},
    )
