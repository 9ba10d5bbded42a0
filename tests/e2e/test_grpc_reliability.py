"""gRPC under hostile input and overload, against the real server: every malformed request gets a precise
status and message, a message over the size limit RESOURCE_EXHAUSTED, a full queue UNAVAILABLE with gRPC's
retry pushback, an RPC past its deadline DEADLINE_EXCEEDED with its images never computed, a cancelled RPC
its queued images withdrawn; hundreds of concurrent RPCs all end; and the server keeps serving."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from e2e.reliability import samples
from live_server import LiveServer, live_server
from samples import DEFAULT_MODEL, default_model_store, fashion_test_images
from tritonclient.grpc import service_pb2
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

MAX_BODY_BYTES = 1024 * 1024
QUEUE = 512
MAX_IMAGES = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One image per batch (a backlog of queued images takes a while to compute) and a bounded queue."""
    tmp_path = tmp_path_factory.mktemp("grpc-reliability")
    env = {
        "IGCV2_MODEL_STORE": str(default_model_store(tmp_path)),
        "IGCV2_MODELS": DEFAULT_MODEL,
        "IGCV2_COMPILE": "false",
        "IGCV2_MAX_BATCH_SIZE": "1",
        "IGCV2_MAX_QUEUE_SIZE": str(QUEUE),
        "IGCV2_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "IGCV2_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    }
    with live_server(tmp_path, env) as server:
        yield server


@pytest.fixture
def stub(server: LiveServer) -> Iterator[GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield GRPCInferenceServiceStub(channel)


def infer_request(images: np.ndarray, name: str = "image", datatype: str = "UINT8") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=DEFAULT_MODEL)
    request.inputs.add(name=name, datatype=datatype, shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


def status(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code(), caught.value.details()


def scrape(server: LiveServer) -> str:
    return httpx.get(server.url + "/metrics", timeout=30).text


def grew(before: str, after: str, name: str, **labels: str) -> float:
    """How much the sum of a metric's matching samples grew between two scrapes."""
    return sum(samples(after, name, **labels)) - sum(samples(before, name, **labels))


def still_serving(stub: GRPCInferenceServiceStub) -> None:
    images, _ = fashion_test_images(2)
    answer = stub.ModelInfer(infer_request(images), timeout=120)
    assert triton.InferResult(answer).as_numpy("probabilities").shape == (2, 10)


class Backlog:
    """HTTP /v2 requests of 64 images each (binary tensor data: quick to read), enough to keep the one-image
    batches busy for a while; entered once ``queued`` images wait (default: all but one request's)."""

    def __init__(self, server: LiveServer, requests: int = 7, queued: int | None = None) -> None:
        images, _ = fashion_test_images(MAX_IMAGES)
        tensor = triton_http.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=True)
        body, header_length = triton_http.InferenceServerClient.generate_request_body([tensor])
        url, headers = (
            f"{server.url}/v2/models/{DEFAULT_MODEL}/infer",
            {"Inference-Header-Content-Length": str(header_length)},
        )
        self.codes: list[int] = []
        self.threads = [
            threading.Thread(
                target=lambda: self.codes.append(
                    httpx.post(url, content=body, headers=headers, timeout=300).status_code
                )
            )
            for _ in range(requests)
        ]
        self.server = server
        self.requests = requests
        self.images = requests * MAX_IMAGES
        self.queued = self.images - MAX_IMAGES if queued is None else queued

    def __enter__(self) -> Backlog:
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 120
        while sum(samples(scrape(self.server), "igcv2_queue_depth")) < self.queued:  # our RPC queues behind these
            assert time.monotonic() < deadline, "the backlog never queued"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self.threads:
            thread.join()
        assert self.codes == [200] * len(self.threads)


def withdrawn(server: LiveServer, reason: str, images: int, act: Callable[[], object]) -> None:
    """``act`` sends a request of ``images`` images behind a backlog and makes it end early: its images are
    never computed, in any attempt, and they are counted as dropped for ``reason``. An attempt on a busy
    machine where the request ended before its images were queued (or before the server saw it) is tried
    again, up to 3 times, for the full account of one that was queued."""
    for _ in range(3):
        before = scrape(server)
        with Backlog(server) as backlog:
            act()
        after = scrape(server)
        assert grew(before, after, "igcv2_images_total") == backlog.images  # none of ours
        assert sum(samples(after, "igcv2_queue_depth")) == 0
        if grew(before, after, "igcv2_rejected_images_total", reason=reason) == images:
            return
    pytest.fail(f"in 3 attempts the request's images were never queued before it ended ({reason})")


def counted_later(server: LiveServer, code: str, before: float) -> None:
    """The RPC is counted with ``code`` once the server's handler ends, which may be after the client has
    seen its own deadline or cancellation."""
    deadline = time.monotonic() + 10
    while sum(samples(scrape(server), "igcv2_requests_total", code=code)) <= before:
        assert time.monotonic() < deadline, f"no RPC counted with {code}"
        time.sleep(0.05)


def test_past_its_deadline_deadline_exceeded_and_never_computed(
    server: LiveServer, stub: GRPCInferenceServiceStub
) -> None:
    images, _ = fashion_test_images(4)
    counted = sum(samples(scrape(server), "igcv2_requests_total", code="DEADLINE_EXCEEDED"))

    def expire() -> None:
        code, _ = status(lambda: stub.ModelInfer(infer_request(images), timeout=0.15))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED

    withdrawn(server, "deadline", 4, expire)
    counted_later(server, "DEADLINE_EXCEEDED", counted)
    still_serving(stub)


def test_a_cancelled_rpc_withdraws_its_queued_images(server: LiveServer, stub: GRPCInferenceServiceStub) -> None:
    images, _ = fashion_test_images(4)
    counted = sum(samples(scrape(server), "igcv2_requests_total", code="CANCELLED"))

    def cancel() -> None:
        future = stub.ModelInfer.future(infer_request(images), timeout=300)
        time.sleep(0.15)
        assert future.cancel()

    withdrawn(server, "client_left", 4, cancel)
    counted_later(server, "CANCELLED", counted)
    still_serving(stub)


def test_a_cancelled_stream_withdraws_the_queued_images_of_its_requests(
    server: LiveServer, stub: GRPCInferenceServiceStub
) -> None:
    images, _ = fashion_test_images(4)

    def cancel() -> None:
        hold = threading.Event()

        def requests() -> Iterator[service_pb2.ModelInferRequest]:
            for _ in range(3):
                yield infer_request(images)
            hold.wait(60)  # the stream stays open until it is cancelled

        stream = stub.ModelStreamInfer(requests(), timeout=300)
        time.sleep(0.15)
        stream.cancel()
        hold.set()

    withdrawn(server, "client_left", 12, cancel)
    still_serving(stub)


def test_a_full_queue_is_unavailable_with_retry_pushback(server: LiveServer, stub: GRPCInferenceServiceStub) -> None:
    """Behind a backlog that leaves room for at most 128 images and whatever is computed meanwhile, 4 RPCs of
    64: some are refused, at once, with the queue's state and gRPC's retry pushback."""
    images, _ = fashion_test_images(MAX_IMAGES)
    with Backlog(server, requests=QUEUE // MAX_IMAGES - 1):
        futures = [stub.ModelInfer.future(infer_request(images), timeout=120) for _ in range(4)]
        refused = [f.exception() for f in futures if f.exception() is not None]
    assert refused, "the queue never filled"
    for error in refused:
        assert error.code() == grpc.StatusCode.UNAVAILABLE and error.details().startswith("queue full ("), error
        assert ("grpc-retry-pushback-ms", "1000") in error.trailing_metadata()
    still_serving(stub)


def test_a_message_over_the_size_limit_is_resource_exhausted(stub: GRPCInferenceServiceStub) -> None:
    big = np.zeros((MAX_BODY_BYTES // 784 + 1, 28, 28, 1), np.uint8)
    code, details = status(lambda: stub.ModelInfer(infer_request(big), timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"vs. {MAX_BODY_BYTES}" in details, details
    still_serving(stub)


def shape(*dims: int) -> Callable[[service_pb2.ModelInferRequest], None]:
    def edit(request: service_pb2.ModelInferRequest) -> None:
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(dims)

    return edit


def raw(data: bytes | None) -> Callable[[service_pb2.ModelInferRequest], None]:
    """Replace the input's raw contents (None: send none)."""

    def edit(request: service_pb2.ModelInferRequest) -> None:
        del request.raw_input_contents[:]
        if data is not None:
            request.raw_input_contents.append(data)

    return edit


def datatype(name: str) -> Callable[[service_pb2.ModelInferRequest], None]:
    return lambda request: setattr(request.inputs[0], "datatype", name)


def model(name: str, version: str = "") -> Callable[[service_pb2.ModelInferRequest], None]:
    return lambda request: (setattr(request, "model_name", name), setattr(request, "model_version", version))


def test_malformed_requests_each_get_a_precise_status(stub: GRPCInferenceServiceStub) -> None:
    images, _ = fashion_test_images(2)
    pixels = images.tobytes()
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = {
        "wrong shape": ([shape(2, 1, 28, 28)], invalid, "input 'image' must have shape [-1, 28, 28, 1]"),
        "wrong datatype": ([datatype("INT8")], invalid, "input 'image' must be UINT8, got INT8"),
        "unknown datatype": ([datatype("FLOAT")], invalid, "input 'image': unsupported datatype 'FLOAT'"),
        "raw shorter": (
            [raw(pixels[:-7])],
            invalid,
            "1561 bytes of raw_input_contents[0], shape [2, 28, 28, 1] of UINT8 needs 1568",
        ),
        "raw longer": ([raw(pixels + b"\x00")], invalid, "1569 bytes of raw_input_contents[0]"),
        "no values": ([raw(None)], invalid, "input 'image': 0 values in its contents, shape [2, 28, 28, 1] needs 1568"),
        "negative dimension": ([shape(-2, 28, 28, 1)], invalid, "'shape' must be a list of non-negative integers"),
        "a vast shape": ([shape(2**40, 28, 28, 1)], invalid, f"needs {2**40 * 784}"),
        "too many encoded images": (
            [datatype("BYTES"), shape(10**9)],
            invalid,
            "1000000000 BYTES elements; the limit is 64",
        ),
        "no image": ([shape(0, 28, 28, 1), raw(b"")], invalid, "input 'image' holds no image"),
        "unknown model": ([model("no-such-model")], not_found, "unknown model 'no-such-model'"),
        "a path for a name": ([model("../etc")], not_found, "unknown model '../etc'"),
        "unknown version": ([model(DEFAULT_MODEL, "7")], not_found, "no loaded version 7"),
        "a version that is no number": ([model(DEFAULT_MODEL, "v1")], not_found, "has no version 'v1'"),
    }
    for case, (edits, code, fragment) in cases.items():
        request = infer_request(images)
        for edit in edits:
            edit(request)
        got, details = status(lambda r=request: stub.ModelInfer(r, timeout=60))
        assert got == code and fragment in details, f"{case}: {got} {details}"
    still_serving(stub)


def test_hundreds_of_concurrent_rpcs_all_end(server: LiveServer) -> None:
    """600 RPCs at once over 3 connections (more than the 256 streams a connection may hold at once, and
    more images than the queue holds): each answered, OK or UNAVAILABLE (queue full), none hangs."""
    images, _ = fashion_test_images(1)
    channels = [
        grpc.insecure_channel(server.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(3)
    ]
    try:
        stubs = [GRPCInferenceServiceStub(channel) for channel in channels]
        futures = [stubs[i % 3].ModelInfer.future(infer_request(images), timeout=240) for i in range(600)]
        outcomes: Counter[grpc.StatusCode] = Counter()
        for future in futures:
            try:
                future.result()
                outcomes[grpc.StatusCode.OK] += 1
            except grpc.RpcError as error:
                outcomes[error.code()] += 1
        assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes
        assert outcomes[grpc.StatusCode.OK] >= QUEUE // 2, outcomes
        still_serving(stubs[0])
    finally:
        for channel in channels:
            channel.close()


def test_sigterm_answers_rpcs_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    """A drain: the RPC in flight is answered, a new one gets UNAVAILABLE, and the process exits 0."""
    env = {
        "IGCV2_MODEL_STORE": str(default_model_store(tmp_path)),
        "IGCV2_MODELS": DEFAULT_MODEL,
        "IGCV2_COMPILE": "false",
        "IGCV2_MAX_BATCH_SIZE": "64",
        "IGCV2_MAX_QUEUE_DELAY_MS": "1500",  # a lone request waits this long for company: in flight at the SIGTERM
    }
    images, _ = fashion_test_images(3)
    with live_server(tmp_path, env) as server, grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        in_flight = stub.ModelInfer.future(infer_request(images), timeout=120)
        deadline = time.monotonic() + 60
        while sum(samples(scrape(server), "igcv2_requests_in_progress")) < 1:  # in the server's hands
            assert time.monotonic() < deadline, "the RPC never reached the server"
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        code, details = status(lambda: stub.ModelInfer(infer_request(images), timeout=60))
        assert code == grpc.StatusCode.UNAVAILABLE, details
        answer = triton.InferResult(in_flight.result())
        assert answer.as_numpy("probabilities").shape == (3, 10)
        assert server.process.wait(60) == 0
