"""Open Inference Protocol (KServe v2 / Triton HTTP) on the wire, and IGCV2 classifiers on it.

Two halves, both free of any wire (the HTTP route hands in body bytes and the value of the
``Inference-Header-Content-Length`` header, and gets bytes and a header length back; the gRPC servicer,
service/grpc, builds the same requests from protobuf messages with the checks here):

* tensors: JSON and binary-extension requests and responses, datatypes, shapes, the
  length-prefixed ``BYTES`` encoding; every malformed request raises :class:`BadInput` (400): its
  header when parsed, a tensor's values when first read (the model reads only its one input's);
* the model's face: three optional inputs (``image`` UINT8 NHWC as the decoder produces it,
  ``normalized`` FP32 NCHW, ``encoded`` BYTES of PNG/JPEG files), two outputs (``probabilities``,
  ``logits``), Triton's classification extension, and the metadata and configuration documents.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from igcv2.names import VERSION_TEXT
from igcv2.store import ArtifactConfig, InputSpec
from service.config import MAX_REQUEST_TIMEOUT_S
from service.errors import BadInput, NotFound, TooLarge

if TYPE_CHECKING:
    from service.catalog import ServedModel

# Little-endian, as the binary tensor data extension specifies; BYTES is length-prefixed (below).
DATATYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": None,
}  # fmt: skip
MAX_TIMEOUT_US = MAX_REQUEST_TIMEOUT_S * 1_000_000
MAX_JSON_DEPTH = 32  # nested "data" arrays deeper than any tensor we accept are refused, not recursed into

IMAGE, NORMALIZED, ENCODED = "image", "normalized", "encoded"
PROBABILITIES, LOGITS = "probabilities", "logits"
OUTPUTS = (PROBABILITIES, LOGITS)
PLATFORM = BACKEND = "pytorch"
SERVER_NAME = "igcv2"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]


# ----------------------------------------------------------------------------------------------
# Tensors on the wire
# ----------------------------------------------------------------------------------------------


class Encoding(Enum):
    """How a tensor's values travel."""

    JSON = "json"  # a JSON "data" array, flat or nested (BYTES elements: strings)
    BINARY = "binary"  # little-endian bytes, BYTES elements length-prefixed: HTTP's binary data, gRPC's raw contents
    VALUES = "values"  # a flat sequence of numbers, or of bytes for BYTES: gRPC's typed contents


@dataclass
class Tensor:
    """One input tensor as its header declares it; its values stay as sent until ``data`` is read.

    The model's checks (input names, datatypes, shapes, image count) need only the header, so a request
    they refuse never pays for converting its values: a 28 MiB ``data`` array held the event loop for 2 s.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    payload: Any = field(repr=False)  # as ``encoding`` says: the JSON "data" value, bytes, or a sequence of values
    encoding: Encoding = Encoding.JSON
    parameters: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def data(self) -> np.ndarray:
        """The values, of ``shape`` (an object array of ``bytes`` for BYTES); 400 when they do not fit it."""
        where = f"input {self.name!r}"
        if self.encoding is Encoding.BINARY:
            return _from_binary(bytes(self.payload), self.datatype, self.shape, where)
        if self.encoding is Encoding.VALUES:
            return _from_values(self.payload, self.datatype, self.shape, where)
        return _from_json(self.payload, self.datatype, self.shape, where)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: not said, the request's binary_data_output decides
    classification: int = 0  # > 0: Triton's classification extension, top-k "score:index:label"


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: the request named none (the model's defaults)
    id: str | None = None
    binary_output: bool = False  # request parameter "binary_data_output": the default for every output
    timeout_s: float | None = None  # Triton's "timeout" request parameter (sent in microseconds)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray  # its shape is the tensor's shape
    binary: bool = False


@dataclass
class InferResponse:
    model_name: str
    model_version: int
    outputs: list[OutputTensor]
    id: str | None = None


def _reject_constant(value: str) -> Any:
    raise BadInput(f"inference request header: {value} is not a valid JSON number")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _header_length(value: str | int | None, body_size: int) -> int:
    """The JSON part's size from Inference-Header-Content-Length; the whole body when absent."""
    if value is None:
        return body_size
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
    if not 0 < size <= body_size:
        raise BadInput(f"Inference-Header-Content-Length {size} does not fit a body of {body_size} bytes")
    return size


def parse_request(
    body: bytes, header_length: str | int | None = None, max_bytes_elements: int | None = None
) -> InferRequest:
    """Parse an inference request: JSON only, or JSON followed by binary tensor data.

    Only the headers are checked here; each tensor's values are converted when first read (:class:`Tensor`).
    ``max_bytes_elements`` bounds a BYTES tensor (one encoded image per element) before its elements
    are read: 8 million empty elements fit in 32 MiB and took 3 s of the event loop to read.
    """
    size = _header_length(header_length, len(body))
    try:
        header = json.loads(body[:size].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, 5000-digit ints
        raise BadInput(f"inference request header is not valid JSON: {exc}") from exc
    header = _object(header, "inference request")
    binary = memoryview(body)[size:]
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadInput("inference request needs a non-empty 'inputs' list")
    offset, inputs = 0, []
    for index, raw in enumerate(raw_inputs):
        tensor, used = _parse_input(_object(raw, f"inputs[{index}]"), index, binary[offset:], max_bytes_elements)
        offset += used
        inputs.append(tensor)
    if offset != len(binary):
        raise BadInput(
            f"{len(binary)} bytes of binary data follow the JSON header but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    check_unique("input", [t.name for t in inputs])
    parameters = _object(header.get("parameters") or {}, "'parameters'")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput(f"'id' must be a string, got {type(request_id).__name__}")
    return InferRequest(
        inputs=inputs,
        outputs=_parse_outputs(header.get("outputs")),
        id=request_id,
        binary_output=_flag(parameters, "binary_data_output", "request parameter"),
        timeout_s=request_timeout(parameters.get("timeout")),
        parameters=parameters,
    )


def check_unique(kind: str, names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise BadInput(f"{kind} names must be unique, got {names}")


def _flag(parameters: dict[str, Any], key: str, what: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise BadInput(f"{what} {key!r} must be true or false, got {value!r}")
    return value


def request_timeout(value: Any) -> float | None:
    """Triton's per-request timeout, in microseconds; 0 or absent: the server's default."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMEOUT_US:
        got = "a larger integer" if isinstance(value, int) and value.bit_length() > 64 else repr(value)[:60]
        raise BadInput(
            f"request parameter 'timeout' must be an integer from 0 to {MAX_TIMEOUT_US} (microseconds: "
            f"an hour, as for X-Request-Timeout), got {got}"
        )
    return value / 1e6


def _parse_shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise BadInput(f"{where}: 'shape' must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def input_header(
    index: int, name: Any, datatype: Any, shape: Any, parameters: dict[str, Any], max_bytes_elements: int | None
) -> tuple[str, tuple[int, ...]]:
    """An input tensor's header as either wire carries it, checked: its name and shape. 400, or 413 for a
    BYTES tensor of more elements than ``max_bytes_elements``, before any value is read."""
    if not isinstance(name, str) or not name:
        raise BadInput(f"inputs[{index}] needs a 'name' string")
    where = f"input {name!r}"
    if datatype not in DATATYPES:
        raise BadInput(f"{where}: unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}")
    shape = _parse_shape(shape, where)
    count = math.prod(shape)
    if datatype == "BYTES" and max_bytes_elements is not None and count > max_bytes_elements:
        raise TooLarge(
            f"{where}: {count} BYTES elements; the limit is {max_bytes_elements} (one image each, "
            "IGCV2_MAX_IMAGES_PER_REQUEST)"
        )
    if "shared_memory_region" in parameters:
        raise BadInput(f"{where}: the shared-memory extension is not supported; send the data in the request")
    return name, shape


def check_binary_size(name: str, datatype: str, shape: tuple[int, ...], size: int, what: str) -> None:
    """400 unless ``size`` bytes of ``what`` hold ``shape`` of ``datatype`` (BYTES: checked when read)."""
    dtype = DATATYPES[datatype]
    needed = math.prod(shape) * dtype.itemsize if dtype is not None else size
    if size != needed:
        raise BadInput(f"input {name!r}: {size} bytes of {what}, shape {list(shape)} of {datatype} needs {needed}")


def _parse_input(
    raw: dict[str, Any], index: int, binary: memoryview, max_bytes_elements: int | None
) -> tuple[Tensor, int]:
    """One input tensor, and how many bytes of the binary section it took."""
    parameters = _object(raw.get("parameters") or {}, f"inputs[{index}] 'parameters'")
    datatype = raw.get("datatype")
    name, shape = input_header(index, raw.get("name"), datatype, raw.get("shape"), parameters, max_bytes_elements)
    where = f"input {name!r}"
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadInput(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if "data" in raw:
            raise BadInput(f"{where}: has both 'data' and binary_data_size; send one")
        if size > len(binary):
            raise BadInput(f"{where}: binary_data_size {size} but only {len(binary)} bytes of binary data remain")
        check_binary_size(name, datatype, shape, size, "binary data")
        return Tensor(name, datatype, shape, binary[:size], Encoding.BINARY, parameters), size
    if "data" not in raw:
        raise BadInput(f"{where}: no 'data' and no binary_data_size parameter")
    return Tensor(name, datatype, shape, raw["data"], Encoding.JSON, parameters), 0


def _from_binary(raw: bytes, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A tensor's binary data; its size was checked against the shape by :func:`_parse_input`."""
    dtype = DATATYPES[datatype]
    if dtype is None:
        count = math.prod(shape)
        items = deserialize_bytes(raw, where, count)
        if len(items) != count:
            raise BadInput(
                f"{where}: {len(items)} BYTES elements in the binary data; shape {list(shape)} needs {count}"
            )
        return _object_array(items, shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _flatten(data: Any, where: str, depth: int = 0) -> list[Any]:
    """Row-major elements of a flat or nested JSON array (Triton accepts both).

    A flat array is told apart in C (``map(type, ...)``: JSON gives exact types), so a wrong element
    count is refused before any element is looked at in Python."""
    if not isinstance(data, list):
        return [data]
    if depth > MAX_JSON_DEPTH:
        raise BadInput(f"{where}: 'data' is nested deeper than {MAX_JSON_DEPTH} levels")
    if list not in map(type, data):
        return data
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item, where, depth + 1))
    return out


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A tensor's JSON values: the element count first, then each element's type, then the array."""
    count = math.prod(shape)
    flat = _flatten(data, where)
    if len(flat) != count:
        raise BadInput(f"{where}: {len(flat)} elements in 'data', shape {list(shape)} needs {count}")
    dtype = DATATYPES[datatype]
    if dtype is None:
        if not all(isinstance(x, str) for x in flat):
            raise BadInput(f"{where}: BYTES elements in JSON must be strings")
        return _object_array([x.encode("utf-8") for x in flat], shape)
    if dtype.kind == "b":
        valid = all(isinstance(x, bool) for x in flat)
    elif dtype.kind in "iu":
        valid = all(isinstance(x, int) and not isinstance(x, bool) for x in flat)
    else:
        valid = all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat)
    if not valid:
        raise BadInput(
            f"{where}: every element of a {datatype} tensor must be a JSON "
            f"{'boolean' if dtype.kind == 'b' else 'integer' if dtype.kind in 'iu' else 'number'}"
        )
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError as exc:
        raise BadInput(f"{where}: a value is out of range for {datatype}: {exc}") from exc


def _from_values(values: Sequence[Any], datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A tensor's typed values (a flat sequence, as gRPC's typed contents carry them in a wider type:
    UINT8 as uint32, for instance); the count first, then the range of the datatype."""
    count = math.prod(shape)
    if len(values) != count:
        raise BadInput(f"{where}: {len(values)} values in its contents, shape {list(shape)} needs {count}")
    dtype = DATATYPES[datatype]
    if dtype is None:
        return _object_array(list(values), shape)
    wide = np.array(values)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise BadInput(f"{where}: a value is out of range for {datatype} ({info.min} to {info.max})")
    return wide.astype(dtype, copy=False).reshape(shape)


def _object_array(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def deserialize_bytes(raw: bytes, where: str = "tensor", expected: int | None = None) -> list[bytes]:
    """BYTES tensor data: each element a 4-byte little-endian length, then that many bytes; reading
    stops at the first element beyond ``expected``."""
    items, offset = [], 0
    while offset < len(raw):
        if expected is not None and len(items) == expected:
            raise BadInput(f"{where}: more than the {expected} BYTES elements its shape holds in the binary data")
        if offset + 4 > len(raw):
            raise BadInput(f"{where}: truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadInput(f"{where}: BYTES element of {length} bytes at byte {offset} runs past the data")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def serialize_bytes(array: np.ndarray) -> bytes:
    """The length-prefixed binary form of a BYTES tensor, row-major."""
    parts = []
    for item in array.ravel():
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def _parse_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadInput("'outputs' must be a list")
    outputs = []
    for index, item in enumerate(raw):
        item = _object(item, f"outputs[{index}]")
        parameters = _object(item.get("parameters") or {}, f"outputs[{index}] 'parameters'")
        outputs.append(requested_output(index, item.get("name"), parameters))
    check_unique("output", [out.name for out in outputs])
    return outputs


def requested_output(index: int, name: Any, parameters: dict[str, Any]) -> RequestedOutput:
    """A requested output as either wire carries it, checked: Triton's classification extension
    (``classification``: top k) and HTTP's ``binary_data``."""
    if not isinstance(name, str) or not name:
        raise BadInput(f"outputs[{index}] needs a 'name' string")
    if "shared_memory_region" in parameters:
        raise BadInput(f"output {name!r}: the shared-memory extension is not supported")
    k = parameters.get("classification", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise BadInput(f"output {name!r}: 'classification' must be a non-negative integer, got {k!r}")
    binary = parameters.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise BadInput(f"output {name!r}: 'binary_data' must be true or false, got {binary!r}")
    return RequestedOutput(name, binary, k)


def encode_response(response: InferResponse) -> tuple[bytes, int | None]:
    """Response body, and the JSON header's length when binary output data follows it (else None)."""
    outputs, chunks = [], []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.data.shape)}
        if out.binary:
            chunk = raw_bytes(out)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        elif out.datatype == "BYTES":
            entry["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in out.data.ravel()]
        else:
            entry["data"] = out.data.ravel().tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": str(response.model_version)}
    if response.id is not None:
        document["id"] = response.id
    document["outputs"] = outputs
    header = json.dumps(document, allow_nan=False, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def raw_bytes(out: OutputTensor) -> bytes:
    """An output's values in the binary form: little-endian, BYTES elements length-prefixed."""
    dtype = DATATYPES[out.datatype]
    if dtype is None:
        return serialize_bytes(out.data)
    return np.ascontiguousarray(out.data, dtype=dtype).tobytes()


# ----------------------------------------------------------------------------------------------
# IGCV2 image classifiers on the protocol
# ----------------------------------------------------------------------------------------------


def input_layouts(spec: InputSpec) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{input name: (datatype, per-image dims, Triton format)}; the batch dimension comes first."""
    return {
        IMAGE: ("UINT8", (spec.height, spec.width, spec.channels), "FORMAT_NHWC"),
        NORMALIZED: ("FP32", (spec.channels, spec.height, spec.width), "FORMAT_NCHW"),
        ENCODED: ("BYTES", (1,), "FORMAT_NONE"),
    }


def input_metadata(spec: InputSpec) -> list[dict[str, Any]]:
    return [{"name": n, "datatype": d, "shape": [-1, *dims]} for n, (d, dims, _) in input_layouts(spec).items()]


def output_metadata(num_classes: int) -> list[dict[str, Any]]:
    return [{"name": name, "datatype": "FP32", "shape": [-1, num_classes]} for name in OUTPUTS]


def model_input(request: InferRequest, spec: InputSpec) -> Tensor:
    """The request's one image input, its header checked against the model's layout (400 on any
    mismatch); its values are not read, so the caller can check the image count before they are."""
    layouts = input_layouts(spec)
    accepted = ", ".join(f"{n!r} ({d} {[-1, *dims]})" for n, (d, dims, _) in layouts.items())
    if len(request.inputs) != 1:
        raise BadInput(f"send exactly one input, one of {accepted}; got {[t.name for t in request.inputs]}")
    tensor = request.inputs[0]
    if tensor.name not in layouts:
        raise BadInput(f"unknown input {tensor.name!r}; this model takes one of {accepted}")
    datatype, dims, _ = layouts[tensor.name]
    if tensor.datatype != datatype:
        raise BadInput(f"input {tensor.name!r} must be {datatype}, got {tensor.datatype}")
    shape = tensor.shape
    if not shape or shape[0] < 1:
        raise BadInput(
            f"input {tensor.name!r} holds no image: the first dimension is the batch size, got shape {list(shape)}"
        )
    if tensor.name == ENCODED:
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadInput(
                f"input {ENCODED!r} must have shape [N] or [N, 1] (one encoded image each), got {list(shape)}"
            )
    elif len(shape) != 1 + len(dims) or tuple(shape[1:]) != dims:
        raise BadInput(f"input {tensor.name!r} must have shape {[-1, *dims]} (batch first), got {list(shape)}")
    return tensor


def batch_size(tensor: Tensor) -> int:
    return tensor.shape[0]


def image_arrays(tensor: Tensor) -> np.ndarray:
    """The batch as native-endian values: uint8 (N, H, W, C) or float32 (N, C, H, W); 400 for a
    ``normalized`` value that is NaN or infinite (only binary data can carry one)."""
    if tensor.name == NORMALIZED and not np.isfinite(tensor.data).all():
        raise BadInput(f"input {NORMALIZED!r} holds NaN or infinite values")
    return np.asarray(tensor.data, dtype=np.uint8 if tensor.datatype == "UINT8" else np.float32)


def encoded_images(tensor: Tensor) -> list[bytes]:
    """The files of an ``encoded`` input; JSON cannot carry raw bytes, so there they are base64."""
    items = list(tensor.data.ravel())
    if tensor.encoding is not Encoding.JSON:
        return items
    try:
        return [base64.b64decode(item, validate=True) for item in items]
    except (binascii.Error, ValueError) as exc:
        raise BadInput(
            f"input {ENCODED!r}: JSON elements must be base64-encoded image files ({exc}); "
            "or send raw bytes with the binary data extension"
        ) from exc


def resolve_outputs(request: InferRequest) -> list[RequestedOutput]:
    """The outputs to return: those requested (checked), else ``probabilities``; binary defaults
    to the request's ``binary_data_output`` parameter, as in Triton."""
    if not request.outputs:
        return [RequestedOutput(PROBABILITIES, request.binary_output)]
    resolved = []
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise BadInput(f"unknown output {out.name!r}; this model produces {', '.join(map(repr, OUTPUTS))}")
        binary = request.binary_output if out.binary is None else out.binary
        resolved.append(RequestedOutput(out.name, binary, out.classification))
    return resolved


def classification(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: the top ``k`` of each row as ``"score:index:label"``
    (score printed as C's ``%f``, as Triton does), BYTES of shape (N, min(k, classes))."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    array = np.empty((scores.shape[0], k), dtype=object)
    for r, (row, best) in enumerate(zip(scores, order, strict=True)):
        array[r, :] = [f"{float(row[i]):f}:{int(i)}:{labels[i]}".encode() for i in best]
    return array


def make_outputs(
    requested: list[RequestedOutput], values: dict[str, np.ndarray], labels: list[str]
) -> list[OutputTensor]:
    """Output tensors from the computed ``values`` ({output name: (N, classes) scores})."""
    outputs = []
    for out in requested:
        data, binary = values[out.name], bool(out.binary)
        if out.classification:
            outputs.append(OutputTensor(out.name, "BYTES", classification(data, out.classification, labels), binary))
        else:
            outputs.append(OutputTensor(out.name, "FP32", data.astype(np.float32, copy=False), binary))
    return outputs


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS}


def refuse_load_parameters(names: list[str]) -> None:
    """A repository load carries no parameters here (Triton's take a config or files): 400 for any."""
    if names:
        raise BadInput(
            f"load parameters are not supported ({', '.join(sorted(names))}): "
            "the model store's config.json is the configuration"
        )


def model_version(name: str, version: str | None) -> int | None:
    """The version a request names (None or empty: none, the server picks); anything but a positive
    integer names no version of the model (404)."""
    if not version:
        return None
    if not VERSION_TEXT.fullmatch(version):
        raise NotFound(f"model {name!r} has no version {version!r} (versions are positive integers)")
    return int(version)


def model_metadata(name: str, versions: list[int], config: ArtifactConfig) -> dict[str, Any]:
    """The protocol's model metadata: inputs and outputs with datatypes, batch dimension -1."""
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": input_metadata(config.input),
        "outputs": output_metadata(len(config.labels)),
    }


def model_config(served: ServedModel) -> dict[str, Any]:
    """Triton's model configuration document (model configuration extension) of a ready version.

    Field names and enum spellings are Triton's (``TYPE_STRING`` for BYTES, ``FORMAT_NHWC``,
    ``KIND_GPU``), so tools that read Triton configs (perf_analyzer, model_analyzer) understand it.
    The input normalisation and labels ride in ``parameters``: a client sending ``normalized``
    needs the mean and std.
    """
    config, batching, runtime = served.ready_config, served.batching, served.runtime
    gpu = runtime.get("device", "cpu").startswith("cuda")
    inputs = [
        {
            "name": name,
            "data_type": f"TYPE_{'STRING' if datatype == 'BYTES' else datatype}",
            "format": fmt,
            "dims": list(dims),
            "optional": True,
        }
        for name, (datatype, dims, fmt) in input_layouts(config.input).items()
    ]
    group: dict[str, Any] = {
        "name": served.name,
        "kind": "KIND_GPU" if gpu else "KIND_CPU",
        "count": batching["instances"],
    }
    if gpu:
        group["gpus"] = [int(runtime["device"].partition(":")[2] or 0)]
    parameters = {"mean": config.input.mean, "std": config.input.std, "labels": config.labels}
    if runtime:
        parameters.update(precision=runtime["precision"], compiled=runtime["compiled"])
    return {
        "name": served.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"specific": {"versions": [served.version]}},
        "max_batch_size": batching["max_batch_size"],
        "input": inputs,
        "output": [{"name": name, "data_type": "TYPE_FP32", "dims": [len(config.labels)]} for name in OUTPUTS],
        "dynamic_batching": {
            "preferred_batch_size": runtime.get("buckets", [batching["max_batch_size"]]),
            "max_queue_delay_microseconds": round(batching["max_queue_delay_ms"] * 1000),
            "preserve_ordering": False,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": round(batching["request_timeout_s"] * 1e6),
                "allow_timeout_override": True,
                "max_queue_size": batching["max_queue_size"],
            },
        },
        "instance_group": [group],
        "parameters": {key: {"string_value": json.dumps(value)} for key, value in parameters.items()},
    }
