"""ModelInfer's messages to and from the protocol's wire-free requests and responses (:mod:`service.oip`).

The checks are HTTP's (the same functions, the same messages), plus Triton's rules for this wire: an input's
values travel in the typed field of its datatype (``contents.uint_contents`` for UINT8, ...), or, for every
input at once, in ``raw_input_contents``; outputs always travel raw, as Triton sends them.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from service import oip
from service.errors import BadInput
from service.grpc.schema import message

ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")

# The InferTensorContents field of each datatype (FP16 has none: it travels raw only).
CONTENTS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def parameters(entries: Any) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain values (an unset parameter: None)."""
    out = {}
    for key, value in entries.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = None if which is None else getattr(value, which)
    return out


def infer_request(request: Message, max_bytes_elements: int | None) -> oip.InferRequest:
    """The protocol request a ModelInferRequest carries; 400 (:class:`BadInput`) or 413 on what HTTP refuses."""
    raw = request.raw_input_contents
    if not request.inputs:
        raise BadInput("inference request needs a non-empty 'inputs' list")
    if raw and len(raw) != len(request.inputs):
        raise BadInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send one per input, "
            "in order, or none"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        extra = parameters(tensor.parameters)
        datatype = tensor.datatype
        name, shape = oip.input_header(index, tensor.name, datatype, list(tensor.shape), extra, max_bytes_elements)
        sent = [field.name for field, _ in tensor.contents.ListFields()]
        if raw:
            if sent:
                raise BadInput(f"input {name!r}: values in both contents and raw_input_contents; send one")
            oip.check_binary_size(name, datatype, shape, len(raw[index]), f"raw_input_contents[{index}]")
            inputs.append(oip.Tensor(name, datatype, shape, raw[index], oip.Encoding.BINARY, extra))
            continue
        field = CONTENTS.get(datatype)
        if field is None:
            raise BadInput(f"input {name!r}: {datatype} values travel in raw_input_contents only")
        if stray := [f"contents.{other}" for other in sent if other != field]:
            raise BadInput(f"input {name!r}: {datatype} values go in contents.{field}, got {', '.join(stray)}")
        inputs.append(oip.Tensor(name, datatype, shape, getattr(tensor.contents, field), oip.Encoding.VALUES, extra))
    oip.check_unique("input", [t.name for t in inputs])
    outputs = [oip.requested_output(i, out.name, parameters(out.parameters)) for i, out in enumerate(request.outputs)]
    oip.check_unique("output", [out.name for out in outputs])
    extra = parameters(request.parameters)
    return oip.InferRequest(
        inputs=inputs,
        outputs=outputs or None,
        id=request.id or None,
        timeout_s=oip.request_timeout(extra.get("timeout")),
        parameters=extra,
    )


def infer_response(response: oip.InferResponse) -> Message:
    message = ModelInferResponse(
        model_name=response.model_name, model_version=str(response.model_version), id=response.id or ""
    )
    for out in response.outputs:
        message.outputs.add(name=out.name, datatype=out.datatype, shape=out.data.shape)
        message.raw_output_contents.append(oip.raw_bytes(out))
    return message
