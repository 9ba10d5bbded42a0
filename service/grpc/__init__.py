"""The Open Inference Protocol over gRPC (KServe v2's ``inference.GRPCInferenceService``, with Triton's
extensions), served beside HTTP by every server process: same engine, batches, limits, deadlines and keys.

Rooms: ``inference.proto`` the schema (compiled into ``inference.protoset``), :mod:`.schema` its messages,
:mod:`.tensors` inference messages to and from :mod:`service.oip`, :mod:`.servicer` the RPCs, :mod:`.server`
the grpc.aio server around them (auth, draining, metrics, status codes, health checking, reflection).
"""
