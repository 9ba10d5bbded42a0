"""Overload at CI scale: offered load well above capacity, and the server sheds the excess without
losing its throughput, its queue bound or its memory.

Saturation throughput is measured in the same test: closed loop at the concurrency the queue holds
without a single rejection (``QUEUE // IMAGES`` clients of ``IMAGES``-image requests). Two overloads
follow it, each round, alternating with it (ABAB...) so that drift in the CPU a shared machine leaves
to this test hits all alike; goodput is read from the server's own counter of computed images.

* **Clients that honour Retry-After** (the contract of a 503): ``CLIENTS`` closed-loop clients, 8x the
  saturating concurrency. Goodput must stay >= 90% of saturation: the bounded queue sheds the excess
  at once and nothing queued is wasted.
* **Clients paced at ``FACTOR`` x saturation that never back off** (each sends on its own schedule,
  whatever the answers; the benchmark's default overload mode). Every refusal still costs the server
  some Python (HTTP parsing and the shedding middleware, which refuses before the body is read or the
  request is routed: ~0.15 ms here, against ~0.3-0.9 ms when refusals went through FastAPI), taken
  from the CPU that computes images; on two cores shared with the load generator that is not free,
  so the bar here is 70% (0.84 measured while another job used both cores), and the ratio is printed.
  The benchmark runs the long and the harsher (retry-storm) versions.

The load comes from raw keep-alive sockets with prepared bytes (``KeepAliveClient``), so the client
costs the server's cores a few percent, not the half core an httpx client would.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import httpx
from e2e.reliability import KeepAliveClient, assert_serving, fast_env, metric, multipart_request, samples
from live_server import LiveServer, live_server
from samples import default_model_store, fashion_pngs

IMAGES = 4  # per request
QUEUE = 32  # IGCV2_MAX_QUEUE_SIZE, in images
BATCH = 8  # IGCV2_MAX_BATCH_SIZE
CLIENTS = 64  # 8x the saturating concurrency: enough stay active while the refused ones wait
FACTOR = 2.5  # offered load of the paced clients / saturation throughput
ROUNDS = 2
SATURATION_S = 3.0
OVERLOAD_S = 4.0  # x 2 kinds x ROUNDS = 16 s of overload


@dataclass
class Answers:
    codes: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status: int | None, headers: dict[bytes, bytes], detail: str = "") -> None:
        with self.lock:
            self.sent += 1
            if status is None:
                self.problems.append(f"no answer: {detail}")
                return
            self.codes[status] += 1
            if status not in (200, 503, 504):
                self.problems.append(f"{status}: {detail}")
            elif status == 503 and not headers.get(b"retry-after", b"").isdigit():
                self.problems.append(f"503 without Retry-After: {detail}")


def send(client: KeepAliveClient, request: bytes, answers: Answers) -> float:
    """One request; returns the Retry-After of a 503 in seconds (else 0)."""
    try:
        status, headers, body = client.request(request)
    except OSError as exc:
        answers.record(None, {}, repr(exc))
        return 0.0
    answers.record(status, headers, body[:200].decode(errors="replace"))
    retry_after = headers.get(b"retry-after", b"0")
    return float(retry_after) if status == 503 and retry_after.isdigit() else 0.0


def closed_loop(
    server: LiveServer, request: bytes, clients: int, until: float, answers: Answers, polite: bool = False
) -> None:
    """``clients`` threads sending back to back; ``polite`` ones wait out a 503's Retry-After."""

    def run() -> None:
        with KeepAliveClient(server) as client:
            while time.monotonic() < until:
                wait = send(client, request, answers)
                if polite and wait:
                    time.sleep(max(0.0, min(wait, until - time.monotonic())))

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def paced(server: LiveServer, request: bytes, clients: int, rate: float, until: float, answers: Answers) -> None:
    """``clients`` threads, each sending on its own fixed schedule (rate / clients per second,
    staggered); one that falls behind sends at once, without bursting to catch up."""
    interval = clients / rate

    def run(offset: float) -> None:
        due = time.monotonic() + offset
        with KeepAliveClient(server) as client:
            while due < until:
                time.sleep(max(0.0, due - time.monotonic()))
                send(client, request, answers)
                due = max(due + interval, time.monotonic())

    threads = [threading.Thread(target=run, args=(i * interval / clients,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@dataclass
class Window:
    images: float  # computed by the server in the window
    batches: float
    cpu_s: float  # the server process's CPU time in the window
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def counters(server: LiveServer) -> tuple[float, float, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return (
        sum(samples(text, "igcv2_images_total")),
        sum(samples(text, "igcv2_batch_size_count")),
        sum(samples(text, "process_cpu_seconds_total")),
    )


def measured(server: LiveServer, load: threading.Thread, seconds: float) -> Window:
    """What the server did while ``load`` ran for ``seconds`` (the load stops by itself)."""
    before, started = counters(server), time.monotonic()
    load.start()
    time.sleep(max(0.0, started + seconds - time.monotonic()))
    after = counters(server)
    window = Window(*(a - b for a, b in zip(after, before, strict=True)), time.monotonic() - started)
    load.join(60)
    return window


def describe(windows: list[Window]) -> str:
    return ", ".join(
        f"{w.rate:.0f}/s (batch {w.images / max(w.batches, 1):.1f}, cpu {w.cpu_s / w.seconds:.2f})" for w in windows
    )


class Sampler(threading.Thread):
    """Queue depth and RSS from /metrics every 0.2 s, until stopped."""

    def __init__(self, server: LiveServer) -> None:
        super().__init__(daemon=True)
        self.server, self.stop, self.depths, self.rss = server, threading.Event(), [], []

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            while not self.stop.wait(0.2):
                text = client.get("/metrics").text
                self.depths.append(max(samples(text, "igcv2_queue_depth"), default=0.0))
                self.rss.append(sum(samples(text, "process_resident_memory_bytes")))


def rss(server: LiveServer) -> float:
    return sum(samples(httpx.get(server.url + "/metrics", timeout=30).text, "process_resident_memory_bytes"))


def rate(windows: list[Window]) -> float:
    return sum(w.images for w in windows) / sum(w.seconds for w in windows)


def test_overload_keeps_goodput_queue_bound_and_memory(tmp_path: Path) -> None:
    env = fast_env(
        default_model_store(tmp_path), max_batch_size=str(BATCH), max_queue_size=str(QUEUE), cpu_threads="1"
    )  # one inference thread: the event loop keeps the other core
    request = multipart_request("/classify", fashion_pngs(IMAGES))
    saturating = QUEUE // IMAGES
    with live_server(tmp_path, env) as server:
        warmup, saturation, polite, paced_answers = Answers(), Answers(), Answers(), Answers()
        # Warm-up: every load shape once, so the allocator and caches settle before RSS is read.
        probe = measured(
            server,
            threading.Thread(target=closed_loop, args=(server, request, saturating, time.monotonic() + 2, warmup)),
            2,
        )
        closed_loop(server, request, CLIENTS, time.monotonic() + 1.5, warmup, True)
        paced(server, request, CLIENTS, FACTOR * probe.rate / IMAGES, time.monotonic() + 1.5, warmup)
        assert not warmup.problems, warmup.problems[:5]

        sampler = Sampler(server)
        rss_before = rss(server)
        sat_windows: list[Window] = []
        polite_windows: list[Window] = []
        paced_windows: list[Window] = []
        sampler.start()
        for _ in range(ROUNDS):
            sat_windows.append(
                measured(
                    server,
                    threading.Thread(
                        target=closed_loop,
                        args=(server, request, saturating, time.monotonic() + SATURATION_S, saturation),
                    ),
                    SATURATION_S,
                )
            )
            polite_windows.append(
                measured(
                    server,
                    threading.Thread(
                        target=closed_loop, args=(server, request, CLIENTS, time.monotonic() + OVERLOAD_S, polite, True)
                    ),
                    OVERLOAD_S,
                )
            )
            offered_rate = FACTOR * sat_windows[-1].rate / IMAGES
            paced_windows.append(
                measured(
                    server,
                    threading.Thread(
                        target=paced,
                        args=(server, request, CLIENTS, offered_rate, time.monotonic() + OVERLOAD_S, paced_answers),
                    ),
                    OVERLOAD_S,
                )
            )
        sampler.stop.set()
        sampler.join(30)
        rss_after = rss(server)
        assert_serving(server)
        rejected = sum(
            samples(httpx.get(server.url + "/metrics").text, "igcv2_rejected_images_total", reason="queue_full")
        )

    sat_rate = rate(sat_windows)
    overload_s = ROUNDS * OVERLOAD_S
    depth = f"max {max(sampler.depths, default=0):.0f}, median {median(sampler.depths or [0]):.0f} of {QUEUE}"
    summary = (
        f"saturation {sat_rate:.0f} images/s ({describe(sat_windows)}); "
        f"polite overload offered {IMAGES * polite.sent / overload_s:.0f} images/s, goodput {rate(polite_windows):.0f}"
        f" = {rate(polite_windows) / sat_rate:.2f} ({describe(polite_windows)}), answers {dict(polite.codes)}; "
        f"paced overload offered {IMAGES * paced_answers.sent / overload_s:.0f} images/s, goodput "
        f"{rate(paced_windows):.0f} = {rate(paced_windows) / sat_rate:.2f} ({describe(paced_windows)}), answers "
        f"{dict(paced_answers.codes)}; queue depth {depth}; RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    print(summary)
    assert not saturation.problems and saturation.codes.keys() == {200}, (saturation.codes, saturation.problems[:5])
    for answers in (polite, paced_answers):
        assert not answers.problems, answers.problems[:5]
        assert answers.codes[503] > 0, f"nothing was shed: no overload happened: {summary}"
    assert rejected > 0
    assert IMAGES * paced_answers.sent / overload_s >= 1.5 * sat_rate, f"offered load not above capacity: {summary}"
    assert rate(polite_windows) >= 0.9 * sat_rate, summary
    assert rate(paced_windows) >= 0.7 * sat_rate, summary
    assert len(sampler.depths) >= 10 and max(sampler.depths) <= QUEUE, summary
    assert max(sampler.depths) >= QUEUE - BATCH, f"the queue never filled: {summary}"
    assert rss_after < 1.1 * rss_before and max(sampler.rss) < 1.1 * rss_before, summary


def test_requests_whose_clients_left_are_taken_out_of_the_queue(tmp_path: Path) -> None:
    """Clients that give up (their own timeout) while their images wait: the images leave the queue
    at once and are never computed, counted as client_left with code 499, and the server serves on.
    uvicorn does not tell a route its client left; the service's protocol does."""
    env = fast_env(default_model_store(tmp_path), max_batch_size="8", max_queue_delay_ms="2000")
    request = multipart_request("/classify", fashion_pngs(2))
    with live_server(tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        images_before = metric(server, "igcv2_images_total")
        answered_499 = metric(server, "igcv2_requests_total", code="499")
        sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        for sock in sockets[:2]:
            sock.sendall(request)  # one batch of 6 images gathers for 2 s (it waits for 8)
        sockets[2].sendall(request + b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # one pipelined behind
        deadline = time.monotonic() + 1.5
        while metric(server, "igcv2_queue_depth") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server, "igcv2_queue_depth") == 6
        for sock in sockets:
            sock.close()
        deadline = time.monotonic() + 1.5
        while metric(server, "igcv2_queue_depth") > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server, "igcv2_queue_depth") == 0, "withdrawn at once, not when the batch would have formed"
        assert metric(server, "igcv2_rejected_images_total", reason="client_left") == 6
        assert metric(server, "igcv2_requests_total", code="499") == answered_499 + 3
        time.sleep(2.5)  # past the batch's gathering time: nothing was computed for the leavers
        assert metric(server, "igcv2_images_total") == images_before
        assert_serving(server)
        assert "Exception in ASGI application" not in server.log()  # no answer written to a closed connection


def test_a_request_after_a_discarded_body_keeps_its_connection_while_it_is_computed(tmp_path: Path) -> None:
    """The rest of a body answered early (413) arrives with the next request in one read: that request
    is answered, however long it takes (here a 6 s batch delay), not cut off by the keep-alive timer
    (5 s) that the end of the discarded body would start."""
    env = fast_env(
        default_model_store(tmp_path), max_batch_size="8", max_queue_delay_ms="6000", max_body_bytes="100000"
    )
    with live_server(tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100001\r\n\r\n"
            )
            answers = b""
            while answers.count(b"\r\n\r\n") < 1 or not answers.endswith(b"}"):  # the 413's head and body
                answers += sock.recv(65536)
            assert answers.startswith(b"HTTP/1.1 413"), answers[:200]
            sock.sendall(b"x" * 100_001 + multipart_request("/classify", fashion_pngs(1)))
            while answers.count(b"HTTP/1.1 ") < 2 and (chunk := sock.recv(65536)):
                answers += chunk
        assert b"HTTP/1.1 200" in answers, answers[:500]
