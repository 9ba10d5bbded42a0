"""IGCV2_WORKERS=2 against the real server: two processes on one port, one set of metrics, readiness
that waits for both, a killed worker restarted while the other serves, and no orphan when the
supervisor dies. (SIGTERM under load with two workers: test_reliability_shutdown.py.)"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from e2e.reliability import error_message, fast_env, samples
from live_server import LiveServer, live_server
from samples import default_model_store, fashion_pngs, multipart

REQUESTS = 40


def workers_of(server: LiveServer) -> list[int]:
    pid = server.process.pid
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's parent may be slow to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fresh(server: LiveServer, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection: the kernel hands it to whichever worker accepts first."""
    with server.client() as client:
        return client.request(method, path, **kwargs)


def wait_ready(server: LiveServer, timeout: float) -> list[str]:
    """The 503 messages seen until /health/ready answers 200."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = fresh(server, "GET", "/health/ready")
        if r.status_code == 200:
            return seen
        seen.append(error_message(r, 503))
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout}s: {seen[-3:]}\n{server.log()[-3000:]}")


def test_two_workers_share_one_port_one_set_of_metrics_and_readiness(tmp_path: Path) -> None:
    images = fashion_pngs(8)
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        assert len(workers_of(server)) == 2
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: fresh(server, "POST", "/classify", files=multipart([images[i % 8]]))
                                  .status_code, range(REQUESTS)))
        assert codes == [200] * REQUESTS

        # Each worker answers statistics for itself: two views, which add up to every request.
        views = {fresh(server, "GET", "/v2/models/stats").json()["model_stats"][0]["inference_stats"]["success"]
                 ["count"] for _ in range(30)}
        assert len(views) == 2 and sum(views) == REQUESTS, f"per-worker counts {views}: both should have served"
        # ...while every scrape, whichever worker answers it, counts them all.
        for _ in range(5):
            text = fresh(server, "GET", "/metrics").text
            assert samples(text, "igcv2_images_total") == [REQUESTS]
            assert samples(text, "igcv2_model_ready") == [1.0]
            assert samples(text, "igcv2_queue_capacity") == [2 * 256]  # the two queues' bounds, summed
            rss = samples(text, "process_resident_memory_bytes")[0]
            own = [int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 for pid in workers_of(server)]
            assert rss >= 0.9 * sum(own), (rss, own)

        for path in ("/v2/repository/models/igcv2-fashion/load", "/v2/repository/models/igcv2-fashion/unload"):
            assert "IGCV2_WORKERS=2" in error_message(fresh(server, "POST", path), 409)
        assert fresh(server, "POST", "/classify", files=multipart(images[:1])).status_code == 200


def test_a_killed_worker_is_restarted_while_the_other_keeps_serving(tmp_path: Path) -> None:
    image = fashion_pngs(1)
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        for _ in range(10):
            assert fresh(server, "POST", "/classify", files=multipart(image)).status_code == 200
        before = samples(fresh(server, "GET", "/metrics").text, "igcv2_images_total")[0]
        victim, survivor = workers_of(server)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # the survivor takes every new connection meanwhile
            assert fresh(server, "POST", "/classify", files=multipart(image)).status_code == 200
        waited = wait_ready(server, 120)
        assert any("not running" in m or "starting" in m for m in waited), waited
        now = workers_of(server)
        assert survivor in now and victim not in now and len(now) == 2
        after = samples(fresh(server, "GET", "/metrics").text, "igcv2_images_total")[0]
        assert after >= before + 1, "the dead worker's counts stay counted"
        log = server.log()
    assert f"(pid {victim}) exited with -9" in log and "restarting it in 1s" in log, log[-3000:]


def test_the_workers_drain_and_go_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
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
