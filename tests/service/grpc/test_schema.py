"""service/grpc's schema: the committed protoset is the .proto compiled, and every RPC, message, field and
enum value it declares is Triton's (tritonclient's own compiled definitions), so Triton's clients read and
write these messages unchanged."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from grpc_tools import protoc
from tritonclient.grpc import model_config_pb2, service_pb2

from service.grpc import schema

GRPC_DIR = Path(schema.__file__).parent
TRITON_FILES: list[FileDescriptor] = [service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR]


def triton_message(full_name: str) -> Descriptor:
    for file in TRITON_FILES:
        try:
            return file.pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise AssertionError(f"{full_name} is not one of Triton's messages")


def test_the_committed_protoset_is_the_proto_compiled(tmp_path: Path) -> None:
    out = tmp_path / "inference.protoset"
    code = protoc.main(["protoc", f"-I{GRPC_DIR}", f"--descriptor_set_out={out}", str(GRPC_DIR / "inference.proto")])
    assert code == 0
    assert out.read_bytes() == (GRPC_DIR / "inference.protoset").read_bytes(), (
        "service/grpc/inference.protoset is stale: python -m grpc_tools.protoc -Iservice/grpc "
        "--descriptor_set_out=service/grpc/inference.protoset service/grpc/inference.proto"
    )


def test_every_rpc_is_tritons() -> None:
    triton = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert schema.SERVICE.full_name == triton.full_name == "inference.GRPCInferenceService"
    for method in schema.SERVICE.methods:
        theirs = triton.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            theirs.input_type.full_name,
            theirs.output_type.full_name,
        ), method.name
        assert (method.client_streaming, method.server_streaming) == (theirs.client_streaming, theirs.server_streaming)


def check_enum(ours: EnumDescriptor, theirs: EnumDescriptor) -> None:
    for value in ours.values:
        assert theirs.values_by_name[value.name].number == value.number, f"{ours.full_name}.{value.name}"


def check_message(ours: Descriptor, theirs: Descriptor) -> int:
    """Every field of ``ours`` is Triton's field of that name: number, type, repeated, message or enum type."""
    checked = 0
    for field in ours.fields:
        where = f"{ours.full_name}.{field.name}"
        assert field.name in theirs.fields_by_name, f"{where}: not in Triton's definition"
        other = theirs.fields_by_name[field.name]
        assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated), where
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name, where
            checked += check_message(field.message_type, other.message_type)  # map entries too: key and value
        if field.enum_type is not None:
            assert field.enum_type.full_name == other.enum_type.full_name, where
            check_enum(field.enum_type, other.enum_type)
        if field.containing_oneof is not None:
            assert other.containing_oneof is not None and field.containing_oneof.name == other.containing_oneof.name
        checked += 1
    return checked


def test_every_message_field_and_enum_value_is_tritons() -> None:
    checked = 0
    for method in schema.SERVICE.methods:
        for ours in (method.input_type, method.output_type):
            checked += check_message(ours, triton_message(ours.full_name))
    assert checked > 100  # every message reached, the nested ones (ModelConfig's) included
