"""IGCV2_WORKERS=2 against the real server: two processes on one port and one set of metrics, a killed
worker replaced while the other answers every request, a port that refuses new connections while the
workers drain, no orphan when the supervisor dies, and a worker's death told apart: while it warms up
(failing to start), once it serves (a crash), or just before a SIGTERM (not a failed drain). (SIGTERM
under load with two workers: test_reliability_shutdown.py.)"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from e2e.reliability import error_message, fast_env, samples
from live_server import LiveServer, live_server
from samples import default_model_store, fashion_pngs, multipart

from service.workers import proc_stat

REQUESTS = 41  # odd: two workers cannot both have served half


def workers_of(server: LiveServer) -> list[int]:
    pid = server.process.pid
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's parent may be slow to reap it)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def fresh(server: LiveServer, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection: the kernel hands it to whichever worker accepts first."""
    with server.client() as client:
        return client.request(method, path, **kwargs)


def test_two_workers_share_one_port_and_one_set_of_metrics(tmp_path: Path) -> None:
    images = fashion_pngs(8)
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        assert len(workers_of(server)) == 2
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda i: fresh(server, "POST", "/classify", files=multipart([images[i % 8]])).status_code,
                    range(REQUESTS),
                )
            )
        assert codes == [200] * REQUESTS

        # Each worker answers statistics for itself: two views, which add up to every request.
        views = {
            fresh(server, "GET", "/v2/models/stats").json()["model_stats"][0]["inference_stats"]["success"]["count"]
            for _ in range(30)
        }
        assert len(views) == 2 and sum(views) == REQUESTS, f"per-worker counts {views}: both should have served"
        # ...while every scrape, whichever worker answers it, counts them all.
        for _ in range(5):
            text = fresh(server, "GET", "/metrics").text
            assert samples(text, "igcv2_images_total") == [REQUESTS]
            assert samples(text, "igcv2_worker_restarts_total") == [0.0]
            assert samples(text, "igcv2_model_ready") == [1.0]
            assert samples(text, "igcv2_queue_capacity") == [2 * 256]  # the two queues' bounds, summed
            rss = samples(text, "process_resident_memory_bytes")[0]
            page = os.sysconf("SC_PAGE_SIZE")
            own = [int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page for pid in workers_of(server)]
            assert rss >= 0.9 * sum(own), (rss, own)

        for path in ("/v2/repository/models/igcv2-fashion/load", "/v2/repository/models/igcv2-fashion/unload"):
            assert "IGCV2_WORKERS=2" in error_message(fresh(server, "POST", path), 409)
        assert fresh(server, "POST", "/classify", files=multipart(images[:1])).status_code == 200


def test_a_killed_worker_is_replaced_while_the_other_answers_every_request(tmp_path: Path) -> None:
    """The replacement warms its models up before it accepts a connection: no 503 "not ready" meanwhile."""
    image = fashion_pngs(1)
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        for _ in range(10):
            assert fresh(server, "POST", "/classify", files=multipart(image)).status_code == 200
        before = samples(fresh(server, "GET", "/metrics").text, "igcv2_images_total")[0]
        victim, survivor = workers_of(server)
        os.kill(victim, signal.SIGKILL)
        codes: dict[int, int] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the replacement has served for a second
            r = fresh(server, "POST", "/classify", files=multipart(image))
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if server.log().count("igcv2.registry: igcv2-fashion v1 ready") == 3:
                deadline = min(deadline, time.monotonic() + 1.0)
            assert fresh(server, "GET", "/health/ready").status_code == 200
        now = workers_of(server)
        assert survivor in now and victim not in now and len(now) == 2
        text = fresh(server, "GET", "/metrics").text
        after = samples(text, "igcv2_images_total")[0]
        assert samples(text, "igcv2_worker_restarts_total") == [1.0]
        log = server.log()
    assert list(codes) == [200], f"answers while a worker was replaced: {codes}"
    assert after == before + codes[200], "the dead worker's counts stay counted, every answer is counted"
    assert f"(pid {victim}) exited with -9" in log and "restarting it in 1s" in log, log[-3000:]


def test_the_port_refuses_new_connections_while_the_workers_drain(tmp_path: Path) -> None:
    env = fast_env(default_model_store(tmp_path), workers="2", shutdown_timeout_s="3")
    with live_server(tmp_path, env) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as held:
            held.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n\x89PNG"
            )  # keeps one worker draining for 3 s
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert server.process.poll() is None, "the drain should still be going on"
            for _ in range(3):
                started = time.monotonic()
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5):
                        raise AssertionError("a new connection was taken in while draining")
                except ConnectionRefusedError:
                    assert time.monotonic() - started < 1
            answer = held.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
        assert server.process.wait(30) == 0, server.log()[-3000:]


def test_sigterm_while_the_workers_start_exits_0(tmp_path: Path) -> None:
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2"), ready=None) as server:
        deadline = time.monotonic() + 60
        while "worker 1 started" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the workers are importing, or loading their models: none accepts yet
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0, server.log()[-3000:]
        assert "did not exit cleanly" not in server.log()


def wait_for(server: LiveServer, pattern: str, count: int = 1, timeout: float = 60) -> list[str]:
    """The first ``count`` matches of ``pattern`` in the server's log, once there are that many."""
    deadline = time.monotonic() + timeout
    while len(found := re.findall(pattern, server.log())) < count:
        assert time.monotonic() < deadline, f"no {count} x {pattern!r} in the log:\n{server.log()[-3000:]}"
        time.sleep(0.02)
    return found[:count]


def test_a_worker_killed_while_it_warms_up_is_failing_to_start(tmp_path: Path) -> None:
    """However long the warm-up took (compiling can take minutes): the supervisor knows it was not ready."""
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2"), ready=None) as server:
        victim = int(wait_for(server, r"worker 0 started \(pid (\d+)\)")[0])
        os.kill(victim, signal.SIGKILL)  # importing still: seconds before its models are even loaded
        wait_for(
            server,
            rf"worker 0 \(pid {victim}\) exited with -9 while starting, \d+s after its start; "
            r"restarting it in 1s",
        )
        wait_for(server, "Application startup complete", count=2)  # its replacement too
        assert server.stop() == 0, server.log()[-3000:]


def test_a_worker_dead_before_the_sigterm_reached_the_supervisor_is_a_crash_not_a_failed_drain(
    tmp_path: Path,
) -> None:
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        wait_for(server, "Application startup complete", count=2)  # both are ready
        victim, _ = workers_of(server)
        server.process.send_signal(signal.SIGSTOP)  # so that it cannot see the death before the SIGTERM
        try:
            os.kill(victim, signal.SIGKILL)  # its threads and memory take a while to go: not reapable at once
            server.process.send_signal(signal.SIGTERM)
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert server.process.wait(60) == 0, server.log()[-3000:]
        log = server.log()
    assert re.search(rf"\(pid {victim}\) exited with -9 \d+s after it became ready; not restarted", log), log[-3000:]
    assert "did not exit cleanly" not in log


def test_the_workers_drain_and_go_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    # The run folder goes under TMPDIR: here the test's own, since a killed supervisor cannot remove it.
    env = {**fast_env(default_model_store(tmp_path), workers="2"), "TMPDIR": str(tmp_path)}
    with live_server(tmp_path, env) as server:
        assert f"run folder {tmp_path}/igcv2-workers-" in server.log()
        children = workers_of(server)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(map(running, children)):
            time.sleep(0.1)
        assert not any(map(running, children)), "orphaned workers keep the port"
        try:
            httpx.get(server.url + "/health/live", timeout=5)
            raise AssertionError("something still answers on the port")
        except httpx.ConnectError:
            pass
        assert server.log().count("igcv2.app: shutdown complete") == 2, server.log()[-3000:]
