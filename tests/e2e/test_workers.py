"""IGCV2_WORKERS=2 against the real server: two front-ends and one model executor on one port, one set of
metrics and statistics, model control, answers equal to the offline model's; a killed front-end replaced
while the other answers every request, a killed executor answered 503 with Retry-After until its
replacement serves, a port that refuses new connections while the processes drain, no orphan when the
supervisor dies, and a death told apart: while starting (failing to start), once serving (a crash), or
just before a SIGTERM (not a failed drain). Nothing is left in /dev/shm after any of them. (SIGTERM under
load with two workers: test_reliability_shutdown.py.)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from e2e.reliability import error_message, fast_env, samples
from live_server import LiveServer, live_server
from samples import DEFAULT_MODEL, default_model_store, fashion_pngs, fashion_test_images, multipart

from igcv2.artifact import load_artifact, versions
from igcv2.networks import Normalized
from service.workers import proc_stat

REQUESTS = 41  # odd: two front-ends cannot both have served half


@pytest.fixture(autouse=True)
def shm_left_clean() -> Iterator[None]:
    """The executor and the front-ends share anonymous memory only: nothing may appear in /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    yield
    assert set(os.listdir("/dev/shm")) <= before, "left in /dev/shm"


def children_of(server: LiveServer) -> list[int]:
    pid = server.process.pid
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def roles(server: LiveServer) -> tuple[int, list[int]]:
    """(the executor's pid, the front-ends' pids)."""
    executor, frontends = None, []
    for pid in children_of(server):
        if "--executor" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            executor = pid
        else:
            frontends.append(pid)
    assert executor is not None, "no executor among the supervisor's children"
    return executor, frontends


def arenas_mapped(pid: int) -> int:
    """How many front-end arenas process ``pid`` has mapped (each is a memfd named igcv2-arena)."""
    return Path(f"/proc/{pid}/maps").read_text().count("/memfd:igcv2-arena")


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's parent may be slow to reap it)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def fresh(server: LiveServer, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection: the kernel hands it to whichever front-end accepts first."""
    with server.client() as client:
        return client.request(method, path, **kwargs)


def test_two_front_ends_share_one_port_one_executor_and_one_set_of_metrics(tmp_path: Path) -> None:
    images = fashion_pngs(8)
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        executor, frontends = roles(server)
        assert len(frontends) == 2
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda i: fresh(server, "POST", "/classify", files=multipart([images[i % 8]])).status_code,
                    range(REQUESTS),
                )
            )
        assert codes == [200] * REQUESTS
        log = server.log()
        assert log.count("front-end 0") >= 1 and log.count("front-end 1") >= 1, "both connected to the executor"

        # Statistics are the executor's, whichever front-end answers: one view of every request.
        for _ in range(6):
            stats = fresh(server, "GET", "/v2/models/stats").json()["model_stats"][0]
            assert stats["inference_stats"]["success"]["count"] == REQUESTS
        # ...and so is every scrape, which counts them all.
        for _ in range(5):
            text = fresh(server, "GET", "/metrics").text
            assert samples(text, "igcv2_images_total") == [REQUESTS]
            assert samples(text, "igcv2_requests_total", endpoint="/classify", code="200") == [REQUESTS]
            assert samples(text, "igcv2_worker_restarts_total") == [0.0]
            assert samples(text, "igcv2_model_ready") == [1.0]
            assert samples(text, "igcv2_queue_capacity") == [256], "one queue, in the executor"
            rss = samples(text, "process_resident_memory_bytes")[0]
            page = os.sysconf("SC_PAGE_SIZE")
            own = [int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page for pid in children_of(server)]
            assert rss >= 0.9 * sum(own), (rss, own)

        # One copy of the model, in the executor: the front-ends never load torch.
        assert "libtorch" in Path(f"/proc/{executor}/maps").read_text()
        for pid in frontends:
            assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text(), f"front-end {pid} loaded torch"
        assert arenas_mapped(executor) == 2

        # Model control works from any front-end: one executor, one answer.
        unloaded = fresh(server, "POST", f"/v2/repository/models/{DEFAULT_MODEL}/unload")
        assert unloaded.status_code == 200, unloaded.text
        for _ in range(4):
            assert "unknown model" in error_message(
                fresh(server, "POST", "/classify", files=multipart(images[:1])), 404
            )
        assert fresh(server, "GET", "/health/ready").status_code == 200, "nothing configured is missing"
        loaded = fresh(server, "POST", f"/v2/repository/models/{DEFAULT_MODEL}/load")
        assert loaded.status_code == 200 and loaded.json()["state"] == "READY", loaded.text
        for _ in range(4):
            assert fresh(server, "POST", "/classify", files=multipart(images[:1])).status_code == 200


def test_answers_for_1000_test_images_equal_the_offline_models(tmp_path: Path) -> None:
    store = default_model_store(tmp_path)
    artifact = load_artifact(store / DEFAULT_MODEL / str(versions(store / DEFAULT_MODEL)[-1]))
    spec = artifact.config.input
    images, _ = fashion_test_images(1000)
    with torch.inference_mode():
        logits = Normalized(artifact.model, spec.mean, spec.std).eval()(torch.from_numpy(images)).double()
    expected = torch.softmax(logits, 1).numpy()
    pngs = fashion_pngs(1000)
    with live_server(tmp_path, fast_env(store, workers="2", max_batch_size="16")) as server:

        def classify(start: int) -> list[dict]:
            r = fresh(server, "POST", "/classify?top_k=10", files=multipart(pngs[start : start + 8]))
            assert r.status_code == 200, r.text
            return r.json()["results"]

        with ThreadPoolExecutor(16) as pool:
            results = [result for part in pool.map(classify, range(0, 1000, 8)) for result in part]
    assert len(results) == 1000
    for i, result in enumerate(results):
        scores = {p["class_id"]: p["score"] for p in result["predictions"]}
        assert result["predictions"][0]["class_id"] == int(expected[i].argmax()), i
        np.testing.assert_allclose([scores[c] for c in range(10)], expected[i], atol=1e-5, err_msg=str(i))


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (IPv4 or IPv6), from /proc."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                sockets.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A" and fields[9] in sockets:
                return True
    return False


def test_every_front_end_serves_grpc_on_one_port(tmp_path: Path) -> None:
    """Each front-end listens on the gRPC port too (SO_REUSEPORT), once connected to the executor; RPCs on new
    connections are answered, model control included."""
    images, _ = fashion_test_images(1)
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        _, frontends = roles(server)
        wait_for(server, "igcv2.grpc: gRPC", 2)
        port = int(server.grpc_target.rsplit(":", 1)[1])
        assert all(listening(pid, port) for pid in frontends), "every front-end listens on the gRPC port"

        def on_a_new_connection(call: Callable[[triton.InferenceServerClient], Any]) -> Any:
            with triton.InferenceServerClient(server.grpc_target) as client:
                return call(client)

        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        for _ in range(REQUESTS):
            on_a_new_connection(lambda client: client.infer(DEFAULT_MODEL, [tensor]))
        stats = on_a_new_connection(lambda client: client.get_inference_statistics(DEFAULT_MODEL))
        assert stats.model_stats[0].inference_stats.success.count == REQUESTS  # the executor's one view
        on_a_new_connection(lambda client: client.unload_model(DEFAULT_MODEL))
        assert not on_a_new_connection(lambda client: client.is_model_ready(DEFAULT_MODEL))
        on_a_new_connection(lambda client: client.load_model(DEFAULT_MODEL))
        assert on_a_new_connection(lambda client: client.infer(DEFAULT_MODEL, [tensor])).as_numpy(
            "probabilities"
        ).shape == (1, 10)


def test_a_killed_front_end_is_replaced_while_the_other_answers_every_request(tmp_path: Path) -> None:
    """The replacement has no model to load: it accepts once connected. The executor lets go of the dead
    one's arena."""
    image = fashion_pngs(1)
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        for _ in range(10):
            assert fresh(server, "POST", "/classify", files=multipart(image)).status_code == 200
        before = samples(fresh(server, "GET", "/metrics").text, "igcv2_images_total")[0]
        executor, (victim, survivor) = roles(server)
        os.kill(victim, signal.SIGKILL)
        codes: dict[int, int] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the replacement has served for a second
            r = fresh(server, "POST", "/classify", files=multipart(image))
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if server.log().count("Application startup complete") == 3:
                deadline = min(deadline, time.monotonic() + 1.0)
            assert fresh(server, "GET", "/health/ready").status_code == 200
        now = roles(server)[1]
        assert survivor in now and victim not in now and len(now) == 2
        text = fresh(server, "GET", "/metrics").text
        after = samples(text, "igcv2_images_total")[0]
        assert samples(text, "igcv2_worker_restarts_total") == [1.0]
        assert arenas_mapped(executor) == 2, "the dead front-end's arena is gone from the executor"
        log = server.log()
    assert list(codes) == [200], f"answers while a front-end was replaced: {codes}"
    assert after == before + codes[200], "every answer is counted, and nothing twice"
    assert f"(pid {victim}) exited with -9" in log and "restarting it in 1s" in log, log[-3000:]
    assert re.search(rf"front-end \d \(pid {victim}\) gone", log), log[-3000:]


def test_a_killed_executor_gives_503_with_retry_after_until_its_replacement_serves(tmp_path: Path) -> None:
    image = fashion_pngs(1)
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load(server: LiveServer) -> None:
        with server.client(timeout=30) as client:
            while not stop.is_set():
                r = client.post("/classify", files=multipart(image))
                answers.append((r.status_code, r.headers.get("retry-after")))

    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        executor, frontends = roles(server)
        clients = [threading.Thread(target=load, args=(server,)) for _ in range(4)]
        for t in clients:
            t.start()
        time.sleep(1.0)
        os.kill(executor, signal.SIGKILL)
        killed = len(answers)
        seen_not_ready = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = fresh(server, "GET", "/health/ready")
            seen_not_ready |= ready.status_code == 503
            if seen_not_ready and ready.status_code == 200:
                break
            time.sleep(0.05)
        time.sleep(1.0)  # served again for a second
        stop.set()
        for t in clients:
            t.join(60)
        replacement, after = roles(server)
        text = fresh(server, "GET", "/metrics").text
        log = server.log()
    assert seen_not_ready, "readiness must say the executor is gone"
    assert replacement != executor and after == frontends, "only the executor was replaced"
    codes = {code for code, _ in answers}
    assert codes == {200, 503}, f"answers: {codes}"
    assert all(retry for code, retry in answers if code == 503), "every 503 says when to retry"
    assert answers[-1][0] == 200 and any(code == 503 for code, _ in answers[killed:])
    assert samples(text, "igcv2_worker_restarts_total") == [1.0]
    assert f"the executor (pid {executor}) exited with -9" in log, log[-3000:]
    assert "lost the model executor" in log


def test_the_port_refuses_new_connections_while_the_processes_drain(tmp_path: Path) -> None:
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


def test_an_executor_killed_while_it_loads_is_failing_to_start(tmp_path: Path) -> None:
    """However long its warm-up took (compiling can take minutes): the supervisor knows it was not ready, and
    the front-ends wait for its replacement before they accept."""
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2"), ready=None) as server:
        victim = int(wait_for(server, r"the executor started \(pid (\d+)\)")[0])
        os.kill(victim, signal.SIGKILL)  # importing still: seconds before its models are even loaded
        wait_for(
            server,
            rf"the executor \(pid {victim}\) exited with -9 while starting, \d+s after its start; "
            r"restarting it in 1s",
        )
        wait_for(server, "Application startup complete", count=2)  # the front-ends, once it serves
        assert fresh(server, "POST", "/classify", files=multipart(fashion_pngs(1))).status_code == 200
        assert server.stop() == 0, server.log()[-3000:]


def test_a_worker_dead_before_the_sigterm_reached_the_supervisor_is_a_crash_not_a_failed_drain(
    tmp_path: Path,
) -> None:
    with live_server(tmp_path, fast_env(default_model_store(tmp_path), workers="2")) as server:
        wait_for(server, "Application startup complete", count=2)  # both are ready
        victim = roles(server)[1][0]
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


def test_every_process_drains_and_goes_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    # The run folder goes under TMPDIR: here the test's own, since a killed supervisor cannot remove it.
    env = {**fast_env(default_model_store(tmp_path), workers="2"), "TMPDIR": str(tmp_path)}
    with live_server(tmp_path, env) as server:
        assert f"run folder {tmp_path}/igcv2-workers-" in server.log()
        children = children_of(server)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(map(running, children)):
            time.sleep(0.1)
        assert not any(map(running, children)), "orphaned processes keep the port"
        try:
            httpx.get(server.url + "/health/live", timeout=5)
            raise AssertionError("something still answers on the port")
        except httpx.ConnectError:
            pass
        assert server.log().count("igcv2.app: shutdown complete") == 2, server.log()[-3000:]
        assert "executor stopped" in server.log(), server.log()[-3000:]
