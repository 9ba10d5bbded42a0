"""service.oip: the Open Inference Protocol wire format, checked against tritonclient's own
encoder and decoder (a third party), and the IGCV2 model's inputs, outputs and classification."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from igcv2.artifact import InputSpec
from service import oip
from service.errors import BadInput, TooLarge

SPEC = InputSpec(height=4, width=3, channels=1, mean=[0.5], std=[0.25])
LABELS = ["zero", "one", "two", "three"]


def request_body(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def uint8_input(n: int = 2, **extra: Any) -> dict[str, Any]:
    data = np.arange(n * 12, dtype=np.uint8).reshape(n, 4, 3, 1)
    return {"name": "image", "datatype": "UINT8", "shape": [n, 4, 3, 1], "data": data.ravel().tolist(), **extra}


# ----- requests -----


def test_json_request_flat_and_nested_data_give_the_same_tensor() -> None:
    flat = oip.parse_request(request_body([uint8_input()], id="req-7"))
    nested_data = np.arange(24, dtype=np.uint8).reshape(2, 4, 3, 1).tolist()
    nested = oip.parse_request(request_body([{**uint8_input(), "data": nested_data}]))
    assert flat.id == "req-7" and nested.id is None
    (a,), (b,) = flat.inputs, nested.inputs
    assert a.shape == (2, 4, 3, 1) and a.data.dtype == np.uint8 and a.encoding is oip.Encoding.JSON
    np.testing.assert_array_equal(a.data, np.arange(24).reshape(2, 4, 3, 1))
    np.testing.assert_array_equal(a.data, b.data)


def test_the_longest_timeout_is_an_hour_as_for_x_request_timeout() -> None:
    assert oip.parse_request(request_body([uint8_input()], parameters={"timeout": 3_600_000_000})).timeout_s == 3600


def test_request_parameters_outputs_and_timeout() -> None:
    body = request_body(
        [uint8_input()],
        outputs=[
            {"name": "probabilities", "parameters": {"classification": 3}},
            {"name": "logits", "parameters": {"binary_data": True}},
        ],
        parameters={"binary_data_output": True, "timeout": 2_500_000},
    )
    parsed = oip.parse_request(body)
    assert parsed.binary_output is True and parsed.timeout_s == 2.5
    assert parsed.outputs == [oip.RequestedOutput("probabilities", None, 3), oip.RequestedOutput("logits", True, 0)]
    resolved = oip.resolve_outputs(parsed)
    assert resolved == [oip.RequestedOutput("probabilities", True, 3), oip.RequestedOutput("logits", True, 0)]


def test_binary_request_made_by_tritonclient_is_parsed() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 3, 1), dtype=np.uint8)
    files = np.array([b"\x89PNG first", b"", b"third \x00 file"], dtype=object)
    normalized = np.random.default_rng(1).standard_normal((2, 1, 4, 3)).astype(np.float32)
    inputs = [
        triton.InferInput("image", list(images.shape), "UINT8"),
        triton.InferInput("encoded", [3], "BYTES"),
        triton.InferInput("normalized", list(normalized.shape), "FP32"),
    ]
    inputs[0].set_data_from_numpy(images)
    inputs[1].set_data_from_numpy(files)
    inputs[2].set_data_from_numpy(normalized, binary_data=False)  # mixed: JSON data between binary ones
    outputs = [triton.InferRequestedOutput("probabilities", class_count=2)]
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, outputs, request_id="abc")
    parsed = oip.parse_request(body, str(header_length))
    assert parsed.id == "abc" and [t.name for t in parsed.inputs] == ["image", "encoded", "normalized"]
    assert [t.encoding for t in parsed.inputs] == [oip.Encoding.BINARY, oip.Encoding.BINARY, oip.Encoding.JSON]
    np.testing.assert_array_equal(parsed.inputs[0].data, images)
    assert list(parsed.inputs[1].data) == list(files)
    np.testing.assert_array_equal(parsed.inputs[2].data, normalized)
    assert parsed.outputs == [oip.RequestedOutput("probabilities", True, 2)]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"inputs": []}', None, "non-empty 'inputs'"),
        (b"[1, 2]", None, "must be a JSON object"),
        (request_body([uint8_input()]), "x", "must be an integer"),
        (request_body([uint8_input()]), "100000", "does not fit"),
        (request_body([uint8_input()]) + b"junk", None, "not valid JSON"),
        (request_body([{**uint8_input(), "datatype": "BF16"}]), None, "unsupported datatype"),
        (request_body([{**uint8_input(), "shape": [2, -4, 3, 1]}]), None, "non-negative integers"),
        (request_body([{**uint8_input(), "shape": [3, 4, 3, 1]}]), None, "24 elements in 'data'"),
        (request_body([{**uint8_input(n=1), "data": [256] * 12}]), None, "out of range for UINT8"),
        (request_body([{**uint8_input(n=1), "data": [-1] + [0] * 11}]), None, "out of range for UINT8"),
        (request_body([{**uint8_input(n=1), "data": [0.5] * 12}]), None, "must be a JSON integer"),
        (request_body([{**uint8_input(n=1), "data": [True] * 12}]), None, "must be a JSON integer"),
        (request_body([{**uint8_input(n=1), "data": ["1"] * 12}]), None, "must be a JSON integer"),
        (
            b'{"inputs": [{"name": "normalized", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
            None,
            "NaN is not a valid JSON number",
        ),
        (request_body([uint8_input(), uint8_input()]), None, "names must be unique"),
        (request_body([{k: v for k, v in uint8_input().items() if k != "data"}]), None, "no 'data'"),
        (request_body([uint8_input(parameters={"binary_data_size": 0})]), None, "both 'data' and binary_data_size"),
        (request_body([uint8_input(parameters={"shared_memory_region": "r"})]), None, "shared-memory"),
        (
            request_body([uint8_input()], outputs=[{"name": "p", "parameters": {"classification": -1}}]),
            None,
            "non-negative integer",
        ),
        (
            request_body([uint8_input()], outputs=[{"name": "p", "parameters": {"binary_data": "yes"}}]),
            None,
            "true or false",
        ),
        (request_body([uint8_input()], outputs=[{"name": "p"}, {"name": "p"}]), None, "output names must be unique"),
        (request_body([uint8_input()], parameters={"timeout": -5}), None, "microseconds"),
        (request_body([uint8_input()], parameters={"timeout": 3_600_000_001}), None, r"from 0 to 3600000000 \("),
        (request_body([uint8_input()], parameters={"timeout": 10**30}), None, "got a larger integer"),
        (b'{"id": ' + b"1" * 5000 + b"}", None, "not valid JSON"),
        (request_body([uint8_input()], id=5), None, "'id' must be a string"),
    ],
)
def test_malformed_requests_are_400_with_a_precise_message(
    body: bytes, header_length: str | None, message: str
) -> None:
    with pytest.raises(BadInput, match=message) as caught:
        for tensor in oip.parse_request(body, header_length).inputs:
            tensor.data  # noqa: B018 (values are checked when first read)
    assert caught.value.status_code == 400


def binary_request(tensor: dict[str, Any], raw: bytes, declared: int | None = None) -> tuple[bytes, str]:
    tensor = {**tensor, "parameters": {"binary_data_size": len(raw) if declared is None else declared}}
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + raw, str(len(header))


def read_values(body: bytes, header_length: str) -> None:
    (tensor,) = oip.parse_request(body, header_length).inputs
    tensor.data  # noqa: B018 (values are checked when first read)


def test_binary_sizes_must_match_shape_and_body() -> None:
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 4, 3, 1]}
    with pytest.raises(BadInput, match="11 bytes of binary data, shape"):
        oip.parse_request(*binary_request(tensor, bytes(11)))
    with pytest.raises(BadInput, match="add up to 12"):
        oip.parse_request(*binary_request(tensor, bytes(13), declared=12))
    with pytest.raises(BadInput, match="only 12 bytes of binary data remain"):
        oip.parse_request(*binary_request(tensor, bytes(12), declared=20))
    encoded = {"name": "encoded", "datatype": "BYTES", "shape": [2]}
    with pytest.raises(BadInput, match="runs past the data"):
        read_values(*binary_request(encoded, b"\x05\x00\x00\x00abc"))
    with pytest.raises(BadInput, match="truncated BYTES element length"):
        read_values(*binary_request(encoded, b"\x01\x00\x00\x00a\x01\x00"))
    with pytest.raises(BadInput, match="1 BYTES elements"):
        read_values(*binary_request(encoded, b"\x01\x00\x00\x00a"))


def test_bytes_serialisation_matches_tritonclient() -> None:
    items = np.array([b"a", b"", b"\x00\xff" * 300], dtype=object)
    assert oip.serialize_bytes(items) == serialize_byte_tensor(items).item()
    assert oip.deserialize_bytes(oip.serialize_bytes(items)) == list(items)
    assert list(deserialize_bytes_tensor(oip.serialize_bytes(items))) == list(items)


# ----- responses -----


def test_json_response_is_read_by_tritonclient() -> None:
    probs = np.array([[0.1, 0.7, 0.2, 0.0]], dtype=np.float32)
    outputs = [
        oip.OutputTensor("probabilities", "FP32", probs),
        oip.OutputTensor("top", "BYTES", oip.classification(probs, 2, LABELS)),
    ]
    body, header_length = oip.encode_response(oip.InferResponse("m", 3, outputs, id="r1"))
    assert header_length is None
    document = json.loads(body)
    assert document["model_name"] == "m" and document["model_version"] == "3" and document["id"] == "r1"
    result = triton.InferenceServerClient.parse_response_body(body)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    assert result.as_numpy("top").tolist() == [["0.700000:1:one", "0.200000:2:two"]]


def test_binary_response_is_read_by_tritonclient() -> None:
    logits = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    outputs = [
        oip.OutputTensor("logits", "FP32", logits, binary=True),
        oip.OutputTensor("probabilities", "BYTES", oip.classification(logits, 1, LABELS), binary=True),
        oip.OutputTensor("plain", "FP32", logits[:1], binary=False),
    ]
    body, header_length = oip.encode_response(oip.InferResponse("m", 1, outputs))
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert "id" not in header
    assert header["outputs"][0]["parameters"] == {"binary_data_size": logits.nbytes}
    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    best = logits.argmax(1)
    assert [x.decode() for x in result.as_numpy("probabilities").ravel()] == [
        f"{logits[i, b]:f}:{b}:{LABELS[b]}" for i, b in enumerate(best)
    ]
    np.testing.assert_array_equal(result.as_numpy("plain"), logits[:1])


def test_classification_is_triton_top_k() -> None:
    scores = np.array([[0.25, 0.25, 0.5, 0.0], [1.5, -2.0, 0.0, 3.25]], dtype=np.float32)
    assert oip.classification(scores, 3, LABELS).tolist() == [
        [b"0.500000:2:two", b"0.250000:0:zero", b"0.250000:1:one"],  # ties: lower index first
        [b"3.250000:3:three", b"1.500000:0:zero", b"0.000000:2:two"],
    ]
    assert oip.classification(scores, 99, LABELS).shape == (2, 4)  # k beyond the classes: all of them


# ----- the model's face -----


def parsed(tensor: dict[str, Any]) -> oip.InferRequest:
    return oip.parse_request(request_body([tensor]))


def test_model_input_accepts_each_kind_in_the_models_layout() -> None:
    image = oip.model_input(parsed(uint8_input(n=2)), SPEC)
    assert [a.shape for a in oip.image_arrays(image)] == [(4, 3, 1), (4, 3, 1)]
    normalized = {"name": "normalized", "datatype": "FP32", "shape": [1, 1, 4, 3], "data": [0.5] * 12}
    arrays = oip.image_arrays(oip.model_input(parsed(normalized), SPEC))
    assert arrays[0].dtype == np.float32 and arrays[0].shape == (1, 4, 3)
    for shape in ([2], [2, 1]):
        files = [base64.b64encode(b"png-bytes").decode(), base64.b64encode(b"jpeg").decode()]
        encoded = oip.model_input(parsed({"name": "encoded", "datatype": "BYTES", "shape": shape, "data": files}), SPEC)
        assert oip.batch_size(encoded) == 2 and oip.encoded_images(encoded) == [b"png-bytes", b"jpeg"]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({**uint8_input(), "datatype": "INT32"}, "must be UINT8, got INT32"),
        ({**uint8_input(n=1), "shape": [4, 3, 1], "data": [0] * 12}, r"must have shape \[-1, 4, 3, 1\]"),
        ({**uint8_input(n=1), "shape": [1, 3, 4, 1]}, r"must have shape \[-1, 4, 3, 1\]"),
        ({"name": "normalized", "datatype": "FP32", "shape": [1, 4, 3, 1], "data": [0.0] * 12}, r"\[-1, 1, 4, 3\]"),
        ({"name": "normalized", "datatype": "FP64", "shape": [1, 1, 4, 3], "data": [0.0] * 12}, "must be FP32"),
        ({"name": "encoded", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}, r"\[N\] or \[N, 1\]"),
        ({"name": "INPUT__0", "datatype": "UINT8", "shape": [1], "data": [0]}, "unknown input 'INPUT__0'"),
    ],
)
def test_model_input_mismatches_are_400(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        oip.model_input(parsed(tensor), SPEC)


def test_model_input_refuses_two_inputs_non_finite_values_and_bad_base64() -> None:
    with pytest.raises(BadInput, match="exactly one input"):
        oip.model_input(oip.parse_request(request_body([uint8_input(), {**uint8_input(), "name": "x"}])), SPEC)
    values = np.full((1, 1, 4, 3), np.inf, dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "normalized",
                    "datatype": "FP32",
                    "shape": [1, 1, 4, 3],
                    "parameters": {"binary_data_size": values.nbytes},
                }
            ]
        }
    ).encode()
    with pytest.raises(BadInput, match="NaN or infinite"):
        oip.image_arrays(oip.model_input(oip.parse_request(header + values.tobytes(), len(header)), SPEC))
    encoded = oip.model_input(parsed({"name": "encoded", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}), SPEC)
    with pytest.raises(BadInput, match="base64"):
        oip.encoded_images(encoded)


def test_the_models_checks_need_only_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names, datatypes, shapes and the batch size are checked before any value is converted: a
    28 MiB body declaring 19132 images held the event loop for 2 s before its 413."""

    def no_conversion(*args: Any) -> None:
        raise AssertionError("a tensor's values were converted")

    monkeypatch.setattr(oip, "_from_json", no_conversion)
    monkeypatch.setattr(oip, "_from_binary", no_conversion)
    invalid = [0, "not a number"]  # neither the declared element count nor UINT8
    huge = oip.model_input(parsed({**uint8_input(), "shape": [19132, 4, 3, 1], "data": invalid}), SPEC)
    assert oip.batch_size(huge) == 19132  # for the caller's image count check (413), still unconverted
    cases = {
        "unknown input 'bogus'": {**uint8_input(), "name": "bogus", "data": invalid},
        "must be UINT8, got FP32": {**uint8_input(), "datatype": "FP32", "data": invalid},
        r"must have shape \[-1, 4, 3, 1\]": {**uint8_input(), "shape": [19132, 28, 28, 1], "data": invalid},
    }
    for message, tensor in cases.items():
        with pytest.raises(BadInput, match=message):
            oip.model_input(parsed(tensor), SPEC)
    binary = {"name": "image", "datatype": "UINT8", "shape": [3, 4, 3, 1]}
    assert oip.batch_size(oip.model_input(oip.parse_request(*binary_request(binary, bytes(36))), SPEC)) == 3
    with pytest.raises(BadInput, match="35 bytes of binary data, shape"):  # the size needs no conversion either
        oip.parse_request(*binary_request(binary, bytes(35)))


def test_outputs_default_to_probabilities_and_unknown_ones_are_400() -> None:
    default = oip.parse_request(request_body([uint8_input()], parameters={"binary_data_output": True}))
    assert oip.resolve_outputs(default) == [oip.RequestedOutput("probabilities", True, 0)]
    unknown = oip.parse_request(request_body([uint8_input()], outputs=[{"name": "OUTPUT__0"}]))
    with pytest.raises(BadInput, match="unknown output 'OUTPUT__0'"):
        oip.resolve_outputs(unknown)


def test_model_metadata_declares_the_batch_dimension_as_minus_one() -> None:
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in oip.input_metadata(SPEC)}
    assert inputs == {
        "image": ("UINT8", [-1, 4, 3, 1]),
        "normalized": ("FP32", [-1, 1, 4, 3]),
        "encoded": ("BYTES", [-1, 1]),
    }
    assert oip.output_metadata(4) == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "logits", "datatype": "FP32", "shape": [-1, 4]},
    ]


def test_a_bytes_tensor_over_the_image_limit_is_refused_before_its_elements_are_read() -> None:
    """8 million empty elements fit in a 32 MiB body; reading them held the event loop for 3 s."""
    tensor = {"name": "encoded", "datatype": "BYTES", "shape": [2_000_000]}
    body, header_length = binary_request(tensor, b"\0\0\0\0" * 2_000_000)
    started = time.perf_counter()
    with pytest.raises(TooLarge, match="2000000 BYTES elements; the limit is 64") as caught:
        oip.parse_request(body, header_length, max_bytes_elements=64)
    assert caught.value.status_code == 413 and time.perf_counter() - started < 0.5


def test_bytes_elements_beyond_the_shape_stop_the_reading() -> None:
    tensor = {"name": "encoded", "datatype": "BYTES", "shape": [1]}
    with pytest.raises(BadInput, match="more than the 1 BYTES elements"):
        read_values(*binary_request(tensor, b"\0\0\0\0" * 1000))
