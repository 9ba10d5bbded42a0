"""service/grpc/tensors.py: ModelInfer messages, built by tritonclient's own gRPC input and output classes
where they can be, to and from the protocol's requests; HTTP's checks and messages, plus the gRPC wire's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import deserialize_bytes_tensor

from service import oip
from service.errors import BadInput, TooLarge
from service.grpc import tensors

IMAGES = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3, 1)


def request(*inputs: triton.InferInput, outputs: list[Any] = (), **fields: Any) -> Any:
    """A ModelInferRequest as tritonclient would send it (its messages, re-read in ours)."""
    theirs = triton.service_pb2.ModelInferRequest(model_name="m", **fields)
    for tensor in inputs:
        theirs.inputs.append(tensor._get_tensor())
        if tensor._get_content() is not None:
            theirs.raw_input_contents.append(tensor._get_content())
    theirs.outputs.extend(out._get_tensor() for out in outputs)
    return tensors.ModelInferRequest.FromString(theirs.SerializeToString())


def image_input(array: np.ndarray = IMAGES, datatype: str = "UINT8") -> triton.InferInput:
    tensor = triton.InferInput("image", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def refusal(message: Any, limit: int | None = 64) -> str:
    with pytest.raises(BadInput) as caught:
        parsed = tensors.infer_request(message, limit)
        for tensor in parsed.inputs:
            _ = tensor.data
    return caught.value.message


def test_raw_contents_as_tritonclient_sends_them() -> None:
    out = [triton.InferRequestedOutput("probabilities", class_count=3), triton.InferRequestedOutput("logits")]
    parsed = tensors.infer_request(request(image_input(), outputs=out, id="r1"), 64)
    (tensor,) = parsed.inputs
    assert tensor.encoding is oip.Encoding.BINARY and tensor.shape == (2, 4, 3, 1)
    np.testing.assert_array_equal(tensor.data, IMAGES)
    assert parsed.outputs == [oip.RequestedOutput("probabilities", None, 3), oip.RequestedOutput("logits", None, 0)]
    assert parsed.id == "r1" and parsed.timeout_s is None


def test_typed_contents_and_the_timeout_parameter() -> None:
    message = tensors.ModelInferRequest(model_name="m")
    message.parameters["timeout"].int64_param = 2_500_000  # what tritonclient sends for timeout=2500000 (µs)
    tensor = message.inputs.add(name="image", datatype="UINT8", shape=IMAGES.shape)
    tensor.contents.uint_contents.extend(IMAGES.ravel().tolist())
    floats = message.inputs.add(name="normalized", datatype="FP32", shape=[1, 2])
    floats.contents.fp32_contents.extend([0.5, -1.25])
    parsed = tensors.infer_request(message, 64)
    np.testing.assert_array_equal(parsed.inputs[0].data, IMAGES)
    assert parsed.inputs[0].data.dtype == np.uint8 and parsed.inputs[0].encoding is oip.Encoding.VALUES
    np.testing.assert_array_equal(parsed.inputs[1].data, np.array([[0.5, -1.25]], np.float32))
    assert parsed.timeout_s == 2.5


def test_encoded_images_raw_and_typed() -> None:
    files = np.array([b"\x89PNG one", b"\x89PNG two"], dtype=object)
    raw = tensors.infer_request(request(image_input(files.reshape(2, 1), "BYTES")), 64).inputs[0]
    assert oip.encoded_images(raw) == list(files)
    message = tensors.ModelInferRequest(model_name="m")
    message.inputs.add(name="encoded", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(files)
    assert oip.encoded_images(tensors.infer_request(message, 64).inputs[0]) == list(files)


def test_raw_contents_shorter_or_longer_than_declared() -> None:
    for raw in (IMAGES.tobytes()[:-1], IMAGES.tobytes() + b"\x00"):
        message = request(image_input())
        message.raw_input_contents[0] = raw
        assert refusal(message) == (
            f"input 'image': {len(raw)} bytes of raw_input_contents[0], shape [2, 4, 3, 1] of UINT8 needs 24"
        )


def test_wire_rules_each_have_a_precise_message() -> None:
    two = request(image_input(), image_input(IMAGES.astype(np.float32), "FP32"))
    two.inputs[1].name = "normalized"
    del two.raw_input_contents[1]
    assert refusal(two) == ("raw_input_contents has 1 entries for 2 inputs: send one per input, in order, or none")
    both = request(image_input())
    both.inputs[0].contents.uint_contents.append(1)
    assert refusal(both) == "input 'image': values in both contents and raw_input_contents; send one"
    wrong_field = tensors.ModelInferRequest(model_name="m")
    wrong_field.inputs.add(name="image", datatype="UINT8", shape=[1]).contents.fp32_contents.append(1.0)
    assert (
        refusal(wrong_field) == "input 'image': UINT8 values go in contents.uint_contents, got contents.fp32_contents"
    )
    half = tensors.ModelInferRequest(model_name="m")
    half.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    assert refusal(half) == "input 'x': FP16 values travel in raw_input_contents only"
    too_big = tensors.ModelInferRequest(model_name="m")
    too_big.inputs.add(name="image", datatype="UINT8", shape=[1]).contents.uint_contents.append(256)
    assert refusal(too_big) == "input 'image': a value is out of range for UINT8 (0 to 255)"
    missing = tensors.ModelInferRequest(model_name="m")
    missing.inputs.add(name="image", datatype="UINT8", shape=[2, 4, 3, 1])
    assert refusal(missing) == "input 'image': 0 values in its contents, shape [2, 4, 3, 1] needs 24"
    assert refusal(tensors.ModelInferRequest(model_name="m")) == "inference request needs a non-empty 'inputs' list"


def test_https_checks_with_https_messages() -> None:
    assert refusal(request(image_input(), image_input())) == ("input names must be unique, got ['image', 'image']")
    unknown_type = request(image_input())
    unknown_type.inputs[0].datatype = "UINT7"
    assert refusal(unknown_type).startswith("input 'image': unsupported datatype 'UINT7'; supported: BOOL, UINT8")
    negative = request(image_input())
    negative.inputs[0].shape[0] = -2
    assert refusal(negative) == "input 'image': 'shape' must be a list of non-negative integers, got [-2, 4, 3, 1]"
    unnamed = request(image_input())
    unnamed.inputs[0].name = ""
    assert refusal(unnamed) == "inputs[0] needs a 'name' string"
    classification = request(image_input(), outputs=[triton.InferRequestedOutput("probabilities")])
    classification.outputs[0].parameters["classification"].string_param = "3"
    assert refusal(classification) == "output 'probabilities': 'classification' must be a non-negative integer, got '3'"
    shared = request(image_input())
    shared.inputs[0].parameters["shared_memory_region"].string_param = "r"
    assert "the shared-memory extension is not supported" in refusal(shared)
    timeout = request(image_input())
    timeout.parameters["timeout"].int64_param = -1
    assert refusal(timeout).startswith("request parameter 'timeout' must be an integer from 0 to 3600000000")
    many = tensors.ModelInferRequest(model_name="m")
    many.inputs.add(name="encoded", datatype="BYTES", shape=[65])
    with pytest.raises(TooLarge, match="65 BYTES elements; the limit is 64"):
        tensors.infer_request(many, 64)


def test_responses_travel_raw_as_tritonclient_reads_them() -> None:
    scores = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    answer = oip.InferResponse(
        "m",
        3,
        [
            oip.OutputTensor("logits", "FP32", scores),
            oip.OutputTensor("probabilities", "BYTES", oip.classification(scores, 1, ["a", "b"])),
        ],
        "req",
    )
    message = tensors.infer_response(answer)
    theirs = triton.InferResult(triton.service_pb2.ModelInferResponse.FromString(message.SerializeToString()))
    assert theirs.get_response().model_version == "3" and theirs.get_response().id == "req"
    np.testing.assert_array_equal(theirs.as_numpy("logits"), scores)
    assert theirs.as_numpy("probabilities").tolist() == [[b"0.750000:1:b"], [b"0.500000:0:a"]]
    assert deserialize_bytes_tensor(message.raw_output_contents[1]).tolist() == [b"0.750000:1:b", b"0.500000:0:a"]
