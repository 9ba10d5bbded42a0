"""The Open Inference Protocol over gRPC against the real server (``python -m service``), through the real
third-party client ``tritonclient[grpc]``: every RPC, every input kind (raw and typed contents), the
classification extension, the model repository with the admin key; answers equal to HTTP /v2's and
/classify's on 1,000 Fashion-MNIST test images; errors with HTTP's messages; health checking and reflection."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from live_server import LiveServer, live_server
from samples import (
    DEFAULT_MODEL,
    SPARE,
    classify,
    fashion_pngs,
    fashion_test_images,
    probabilities,
    refusal,
    v2_store,
)
from tritonclient.utils import InferenceServerException

ADMIN_KEY = "grpc-admin-secret"
N = 12
SERVICE = "inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp_path = tmp_path_factory.mktemp("grpc")
    env = {
        "IGCV2_MODEL_STORE": str(v2_store(tmp_path)),
        "IGCV2_MODELS": DEFAULT_MODEL,
        "IGCV2_COMPILE": "false",
        "IGCV2_ADMIN_KEY": ADMIN_KEY,
        "IGCV2_MAX_BATCH_SIZE": "16",
        "IGCV2_MAX_IMAGES_PER_REQUEST": "16",
    }
    with live_server(tmp_path, env) as server:
        yield server


@pytest.fixture
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.grpc_target) as client:
        yield client


def infer_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def requests_counted(server: LiveServer, method: str, code: str) -> float:
    """igcv2_requests_total of one RPC and status code (all models), from /metrics."""
    prefix = f'igcv2_requests_total{{code="{code}",endpoint="/{SERVICE}/{method}",'
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_server_and_model_rpcs(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "igcv2" and "classification" in metadata["extensions"]

    model = client.get_model_metadata(DEFAULT_MODEL, as_json=True)
    version = model["versions"][-1]
    assert model["platform"] == "pytorch"
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]} == {
        "image": ("UINT8", ["-1", "28", "28", "1"]),  # int64 as JSON strings: protobuf's JSON mapping
        "normalized": ("FP32", ["-1", "1", "28", "28"]),
        "encoded": ("BYTES", ["-1", "1"]),
    }
    assert client.get_model_metadata(DEFAULT_MODEL, version).versions == [version]
    assert client.is_model_ready(DEFAULT_MODEL) and client.is_model_ready(DEFAULT_MODEL, version)
    # Ready or not, as Triton answers ModelReady: an unknown model or version, or one not loaded, is not ready.
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready(SPARE)
    assert not client.is_model_ready(DEFAULT_MODEL, "99") and not client.is_model_ready(DEFAULT_MODEL, "latest")

    config = client.get_model_config(DEFAULT_MODEL).config
    assert config.name == DEFAULT_MODEL and config.max_batch_size == 16 and config.backend == "pytorch"
    assert [(i.name, i.dims) for i in config.input] == [
        ("image", [28, 28, 1]),
        ("normalized", [1, 28, 28]),
        ("encoded", [1]),
    ]
    assert [triton.model_config_pb2.DataType.Name(i.data_type) for i in config.input] == [
        "TYPE_UINT8",
        "TYPE_FP32",
        "TYPE_STRING",
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8, 16]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 256
    assert json.loads(config.parameters["labels"].string_value)[9] == "Ankle boot"
    assert triton.model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"

    for call, what in (
        (lambda: client.get_model_metadata("no-such-model"), "unknown model 'no-such-model'"),
        (lambda: client.get_model_config(DEFAULT_MODEL, "99"), f"model '{DEFAULT_MODEL}' has no loaded version 99"),
        (lambda: client.get_model_metadata(DEFAULT_MODEL, "latest"), "has no version 'latest'"),
        (lambda: client.get_inference_statistics("no-such-model"), "unknown model 'no-such-model'"),
    ):
        status, message = refusal(call)
        assert status == "StatusCode.NOT_FOUND" and what in message, message


def test_every_input_kind_equals_classify(server: LiveServer, client: triton.InferenceServerClient) -> None:
    """image (UINT8), normalized (FP32) and encoded (BYTES: PNG files), each raw and in typed contents."""
    images, _ = fashion_test_images(N)
    pngs = fashion_pngs(N)
    expected = probabilities(classify(server, pngs))
    parameters = client.get_model_config(DEFAULT_MODEL).config.parameters
    mean, std = (np.array(json.loads(parameters[k].string_value), np.float32) for k in ("mean", "std"))
    normalized = np.ascontiguousarray(((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2))
    encoded = np.array(pngs, dtype=object).reshape(N, 1)
    cases = [("image", images, "UINT8", "uint_contents"), ("normalized", normalized, "FP32", "fp32_contents")]
    cases.append(("encoded", encoded, "BYTES", "bytes_contents"))
    for name, array, datatype, field in cases:
        raw = client.infer(DEFAULT_MODEL, [infer_input(name, array, datatype)], request_id=name)
        assert raw.get_response().id == name and raw.get_response().model_name == DEFAULT_MODEL
        np.testing.assert_allclose(raw.as_numpy("probabilities"), expected, atol=2e-5, err_msg=name)

        typed = triton.service_pb2.ModelInferRequest(model_name=DEFAULT_MODEL)
        tensor = typed.inputs.add(name=name, datatype=datatype, shape=array.shape)
        getattr(tensor.contents, field).extend(array.ravel().tolist())
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = triton.service_pb2_grpc.GRPCInferenceServiceStub(channel)
            answer = triton.InferResult(stub.ModelInfer(typed, timeout=120))
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, atol=2e-5, err_msg=f"{name} typed")


def test_classification_extension_and_requested_outputs(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    images, _ = fashion_test_images(N)
    expected = classify(server, fashion_pngs(N))
    outputs = [triton.InferRequestedOutput("probabilities", class_count=3), triton.InferRequestedOutput("logits")]
    result = client.infer(DEFAULT_MODEL, [infer_input("image", images, "UINT8")], outputs=outputs)
    top3 = result.as_numpy("probabilities")
    assert top3.shape == (N, 3)
    for row, want in zip(top3, expected, strict=True):
        parsed = [entry.decode().split(":", 2) for entry in row]
        assert [int(index) for _, index, _ in parsed] == [p["class_id"] for p in want["predictions"][:3]]
        assert [label for _, _, label in parsed] == [p["label"] for p in want["predictions"][:3]]
    logits = result.as_numpy("logits")
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), probabilities(expected), atol=2e-5)
    only_logits = client.infer(
        DEFAULT_MODEL, [infer_input("image", images[:2], "UINT8")], outputs=[triton.InferRequestedOutput("logits")]
    )
    assert only_logits.as_numpy("probabilities") is None and only_logits.as_numpy("logits").shape == (2, 10)
    default = client.infer(DEFAULT_MODEL, [infer_input("image", images[:2], "UINT8")])
    assert default.as_numpy("logits") is None and default.as_numpy("probabilities").shape == (2, 10)


def test_stream_infer_answers_each_request_and_goes_on_after_an_error(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    """ModelStreamInfer, as tritonclient streams: every request answered (its id echoed), equal to
    ModelInfer's answer; a bad request gets its error in the stream, which goes on."""
    images, _ = fashion_test_images(N)
    expected = client.infer(DEFAULT_MODEL, [infer_input("image", images, "UINT8")]).as_numpy("probabilities")
    ok_before = requests_counted(server, "ModelStreamInfer", "OK")
    answers: dict[str, tuple[object, object]] = {}
    client.start_stream(
        callback=lambda result, error: answers.__setitem__(
            (result.get_response().id if result is not None else "error"), (result, error)
        )
    )
    try:
        for i in range(N):
            client.async_stream_infer(
                DEFAULT_MODEL, [infer_input("image", images[i : i + 1], "UINT8")], request_id=str(i)
            )
            if i == N // 2:
                client.async_stream_infer(DEFAULT_MODEL, [infer_input("bogus", images[:1], "UINT8")], request_id="bad")
    finally:
        client.stop_stream()  # closes the request side and waits for every answer
    assert set(answers) == {str(i) for i in range(N)} | {"error"}
    for i in range(N):
        result, error = answers[str(i)]
        assert error is None
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], expected[i], atol=2e-5)  # type: ignore[union-attr]
    error = answers["error"][1]
    assert isinstance(error, InferenceServerException) and error.message().startswith("unknown input 'bogus'")
    assert requests_counted(server, "ModelStreamInfer", "OK") == ok_before + N
    assert requests_counted(server, "ModelStreamInfer", "INVALID_ARGUMENT") >= 1


def test_1000_test_images_equal_http_v2_and_classify(server: LiveServer, client: triton.InferenceServerClient) -> None:
    """The same 1,000 Fashion-MNIST test images over gRPC (raw UINT8), HTTP /v2 (binary UINT8) and /classify
    (PNG files): the same top-1 everywhere, probabilities equal within float tolerance."""
    images, labels = fashion_test_images(1000)
    pngs = fashion_pngs(1000)
    grpc_probs, http_probs, classify_probs = [], [], []
    with triton_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120.0) as http:
        for start in range(0, 1000, 16):
            batch = images[start : start + 16]
            grpc_probs.append(
                client.infer(DEFAULT_MODEL, [infer_input("image", batch, "UINT8")]).as_numpy("probabilities")
            )
            tensor = triton_http.InferInput("image", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch, binary_data=True)
            http_probs.append(http.infer(DEFAULT_MODEL, [tensor]).as_numpy("probabilities"))
            classify_probs.append(probabilities(classify(server, pngs[start : start + 16])))
    over_grpc, over_http, over_classify = (np.concatenate(p) for p in (grpc_probs, http_probs, classify_probs))
    assert over_grpc.shape == (1000, 10)
    np.testing.assert_allclose(over_grpc, over_http, atol=1e-6)
    np.testing.assert_allclose(over_grpc, over_classify, atol=2e-5)
    top1 = over_grpc.argmax(1)
    assert (top1 == over_http.argmax(1)).all() and (top1 == over_classify.argmax(1)).all()
    assert (top1 == labels).mean() > 0.85  # the shipped model, not noise (an untrained stand-in would fail here)


def test_bad_input_gets_invalid_argument_with_https_message(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    """Each bad request sent over both wires: INVALID_ARGUMENT (or NOT_FOUND) over gRPC, 4xx over HTTP, the
    same message."""
    images, _ = fashion_test_images(2)
    cases = {
        "wrong datatype": ([("image", images.astype(np.float32), "FP32")], None, "StatusCode.INVALID_ARGUMENT", 400),
        "wrong shape": ([("image", images.reshape(2, 1, 28, 28), "UINT8")], None, "StatusCode.INVALID_ARGUMENT", 400),
        "no batch dimension": ([("image", images[0], "UINT8")], None, "StatusCode.INVALID_ARGUMENT", 400),
        "unknown input": ([("INPUT__0", images, "UINT8")], None, "StatusCode.INVALID_ARGUMENT", 400),
        "two inputs": (
            [("image", images, "UINT8"), ("encoded", np.array([[b"x"]], dtype=object), "BYTES")],
            None,
            "StatusCode.INVALID_ARGUMENT",
            400,
        ),
        "unknown output": ([("image", images, "UINT8")], "OUTPUT__0", "StatusCode.INVALID_ARGUMENT", 400),
        "undecodable image": (
            [("encoded", np.array([[b"not a png"]], dtype=object), "BYTES")],
            None,
            "StatusCode.INVALID_ARGUMENT",
            400,
        ),
        "too many images": (
            [("image", np.repeat(images, 9, axis=0), "UINT8")],
            None,
            "StatusCode.INVALID_ARGUMENT",
            413,
        ),
    }
    with triton_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120.0) as http:
        for case, (inputs, output, status, http_status) in cases.items():
            outputs = [triton.InferRequestedOutput(output)] if output else None
            got = refusal(
                lambda i=inputs, o=outputs: client.infer(DEFAULT_MODEL, [infer_input(*t) for t in i], outputs=o)
            )
            http_inputs = []
            for name, array, datatype in inputs:
                tensor = triton_http.InferInput(name, list(array.shape), datatype)
                tensor.set_data_from_numpy(array, binary_data=True)
                http_inputs.append(tensor)
            http_outputs = [triton_http.InferRequestedOutput(output)] if output else None
            expected = refusal(lambda i=http_inputs, o=http_outputs: http.infer(DEFAULT_MODEL, i, outputs=o))
            assert got == (status, expected[1]), case
            assert expected[0] == str(http_status), case
    ok = [infer_input("image", images, "UINT8")]
    assert refusal(lambda: client.infer("no-such-model", ok)) == (
        "StatusCode.NOT_FOUND",
        f"unknown model 'no-such-model'; loaded: {DEFAULT_MODEL}",
    )
    assert refusal(lambda: client.infer(DEFAULT_MODEL, ok, model_version="99"))[0] == "StatusCode.NOT_FOUND"
    status, message = refusal(lambda: client.infer(DEFAULT_MODEL, ok, timeout=-5))
    assert status == "StatusCode.INVALID_ARGUMENT" and "request parameter 'timeout'" in message


def test_statistics_and_metrics_count_grpc(server: LiveServer, client: triton.InferenceServerClient) -> None:
    images, _ = fashion_test_images(3)
    before = client.get_inference_statistics(DEFAULT_MODEL, as_json=True)["model_stats"][0]
    counted = requests_counted(server, "ModelInfer", "OK")
    refused = requests_counted(server, "ModelInfer", "INVALID_ARGUMENT")
    client.infer(DEFAULT_MODEL, [infer_input("image", images, "UINT8")])
    refusal(lambda: client.infer(DEFAULT_MODEL, [infer_input("bogus", images, "UINT8")]))
    after = client.get_inference_statistics(DEFAULT_MODEL, as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before["inference_count"]) + 3
    assert int(after["inference_stats"]["success"]["count"]) == int(before["inference_stats"]["success"]["count"]) + 1
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [s["name"] for s in everything] == [DEFAULT_MODEL]
    assert requests_counted(server, "ModelInfer", "OK") == counted + 1
    assert requests_counted(server, "ModelInfer", "INVALID_ARGUMENT") == refused + 1
    histogram = httpx.get(server.url + "/metrics", timeout=30).text
    assert (
        f'igcv2_request_duration_seconds_count{{code="OK",endpoint="/{SERVICE}/ModelInfer",model="{DEFAULT_MODEL}"}}'
        in histogram
    )


def test_repository_load_and_unload_with_the_admin_key(client: triton.InferenceServerClient) -> None:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    index = {(m.name, m.state) for m in client.get_model_repository_index().models}
    assert index == {(DEFAULT_MODEL, "READY"), (SPARE, "UNAVAILABLE")}
    assert refusal(lambda: client.load_model(SPARE))[0] == "StatusCode.UNAUTHENTICATED"
    assert refusal(lambda: client.load_model(SPARE, headers={"authorization": "Bearer nope"})) == (
        "StatusCode.PERMISSION_DENIED",
        "wrong admin key for the model repository",
    )
    assert refusal(lambda: client.load_model("no-such-model", headers=admin))[0] == "StatusCode.NOT_FOUND"
    assert refusal(lambda: client.load_model(SPARE, headers=admin, config='{"max_batch_size": 2}')) == (
        "StatusCode.INVALID_ARGUMENT",
        "load parameters are not supported (config): the model store's config.json is the configuration",
    )
    client.load_model(SPARE, headers=admin)
    assert client.is_model_ready(SPARE)
    images, _ = fashion_test_images(2)
    assert client.infer(SPARE, [infer_input("image", images, "UINT8")]).as_numpy("probabilities").shape == (2, 10)
    ready = {m.name for m in client.get_model_repository_index(headers={}).models if m.state == "READY"}
    assert ready == {DEFAULT_MODEL, SPARE}
    client.unload_model(SPARE, headers=admin)
    assert not client.is_model_ready(SPARE) and client.is_model_ready(DEFAULT_MODEL)
    assert refusal(lambda: client.infer(SPARE, [infer_input("image", images, "UINT8")]))[0] == "StatusCode.NOT_FOUND"
    assert {(m.name, m.state) for m in client.get_model_repository_index().models} == index
    client.unload_model(SPARE, headers=admin)  # not loaded: nothing to do, as in Triton


def test_standard_health_checking(server: LiveServer) -> None:
    """grpc.health.v1, as Kubernetes' gRPC probes and grpc_health_probe ask it."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(server: LiveServer) -> None:
    """What grpcurl does with ``list`` and ``describe``, with grpcio-reflection's own client (grpcurl is
    not packaged by Debian)."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {
            SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE)
        assert {m.name for m in service.methods} >= {"ModelInfer", "ModelMetadata", "RepositoryModelLoad"}
        request = pool.FindMessageTypeByName("inference.ModelInferRequest")
        assert request.fields_by_name["raw_input_contents"].number == 7
        assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]


def test_a_message_that_does_not_parse_is_invalid_argument(server: LiveServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as caught:
            infer(b"\xff\xff\xff\xff", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("ModelInfer: the request is not a valid ModelInferRequest message")


def test_api_key_and_admin_key(tmp_path: Path) -> None:
    """With IGCV2_API_KEY every RPC but health needs it (the admin key passes too); load/unload need the admin key."""
    env = {
        "IGCV2_MODEL_STORE": str(v2_store(tmp_path)),
        "IGCV2_MODELS": DEFAULT_MODEL,
        "IGCV2_COMPILE": "false",
        "IGCV2_API_KEY": "user-key",
        "IGCV2_ADMIN_KEY": ADMIN_KEY,
    }
    user, admin = {"authorization": "Bearer user-key"}, {"authorization": f"Bearer {ADMIN_KEY}"}
    with live_server(tmp_path, env) as server, triton.InferenceServerClient(server.grpc_target) as client:
        assert client.is_server_live() and client.is_server_ready()  # open, as /v2/health/*
        with grpc.insecure_channel(server.grpc_target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert refusal(lambda: client.get_server_metadata()) == (
            "StatusCode.UNAUTHENTICATED",
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
        )
        assert refusal(lambda: client.is_model_ready(DEFAULT_MODEL, headers={"authorization": "Bearer no"}))[0] == (
            "StatusCode.UNAUTHENTICATED"
        )
        assert client.get_server_metadata(headers=user).name == "igcv2"
        assert client.get_server_metadata(headers=admin).name == "igcv2"
        assert refusal(lambda: client.load_model(SPARE, headers=user)) == (
            "StatusCode.PERMISSION_DENIED",
            "wrong admin key for the model repository",
        )
        client.load_model(SPARE, headers=admin)
        images, _ = fashion_test_images(1)
        result = client.infer(SPARE, [infer_input("image", images, "UINT8")], headers=user)
        assert result.as_numpy("probabilities").shape == (1, 10)
        client.unload_model(SPARE, headers=admin)
