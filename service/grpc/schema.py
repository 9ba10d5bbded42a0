"""The protocol's messages, from the compiled schema (``inference.protoset``) in a descriptor pool of their own.

Not protoc's generated ``*_pb2`` modules: those register their messages in protobuf's default pool, where
Triton's client registers the same names (``inference.*``) from its own files, so a process holding both
(a test, a benchmark) would fail to import the second ("duplicate symbol"). And no code generator at run
time: protoc (grpcio-tools) is a test dependency only, to check that the protoset is the .proto compiled.
"""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

PACKAGE = "inference"
PROTOSET = resources.files(__package__).joinpath("inference.protoset")

POOL = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(PROTOSET.read_bytes()).file:
    POOL.Add(_file)
# The health and reflection services' own schemas, so that reflection can describe every service served.
for _module in (health_pb2, reflection_pb2):
    POOL.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)

SERVICE = POOL.FindServiceByName(f"{PACKAGE}.GRPCInferenceService")


def message(name: str) -> type[Message]:
    """The class of the protocol's message ``name`` (e.g. ``ModelInferRequest``)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
