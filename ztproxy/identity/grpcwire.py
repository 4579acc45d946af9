"""Istio's certificate API on the wire: the two protobuf messages and gRPC's HTTP/2 framing.

The service is ``istio.v1.auth.IstioCertificateService/CreateCertificate`` (istio/api
security/v1alpha1/ca.proto, the API istiod serves on port 15012 and ztunnel calls):

    message IstioCertificateRequest  { string csr = 1; int64 validity_duration = 2;
                                       google.protobuf.Struct metadata = 3; }
    message IstioCertificateResponse { repeated string cert_chain = 1; }

The message classes are built at import from a descriptor, so the ``protobuf`` package does all the
encoding and no generated ``_pb2`` file (tied to one protoc version) has to be kept in the tree. gRPC
itself is HTTP/2 with a 5-byte prefix per message (compressed flag, big-endian length) and the status in
trailers; that framing is small and lives here, the HTTP/2 is the ``h2`` library's (docs/identity.md).
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple
from urllib.parse import quote, unquote

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
PATH = f"/{SERVICE}/{METHOD}"
CONTENT_TYPE = "application/grpc"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # metadata key ztunnel sets (istio pkg/security)
MAX_MESSAGE = 256 * 1024  # a CSR or a chain is a few KiB; anything larger is refused

# gRPC status codes used here (grpc/doc/statuscodes.md).
OK = 0
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16


def _build_messages():
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="ztmesh/istio_ca.proto",
        package="istio.v1.auth",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    field = descriptor_pb2.FieldDescriptorProto
    request = proto.message_type.add(name="IstioCertificateRequest")
    request.field.add(name="csr", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    request.field.add(name="validity_duration", number=2, type=field.TYPE_INT64, label=field.LABEL_OPTIONAL)
    request.field.add(
        name="metadata",
        number=3,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_OPTIONAL,
        type_name=".google.protobuf.Struct",
    )
    response = proto.message_type.add(name="IstioCertificateResponse")
    response.field.add(name="cert_chain", number=1, type=field.TYPE_STRING, label=field.LABEL_REPEATED)
    pool.AddSerializedFile(proto.SerializeToString())
    classes = []
    for name in ("IstioCertificateRequest", "IstioCertificateResponse"):
        desc = pool.FindMessageTypeByName(f"istio.v1.auth.{name}")
        if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.21
            classes.append(message_factory.GetMessageClass(desc))
        else:  # protobuf 3.x
            classes.append(message_factory.MessageFactory(pool).GetPrototype(desc))
    return classes


IstioCertificateRequest, IstioCertificateResponse = _build_messages()


class GrpcError(Exception):
    """A gRPC status other than OK, from the peer or raised to be sent to it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"gRPC status {code}: {message}")
        self.code = code
        self.message = message


def frame(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


def unframe(body: bytes) -> bytes:
    """The single message of a unary call's body."""
    if len(body) < 5:
        raise GrpcError(INVALID_ARGUMENT, "truncated gRPC message")
    compressed, length = struct.unpack(">BI", body[:5])
    if compressed:
        raise GrpcError(
            UNIMPLEMENTED, "compressed gRPC messages are not supported (send grpc-encoding identity)"
        )
    if length > MAX_MESSAGE:
        raise GrpcError(RESOURCE_EXHAUSTED, f"gRPC message of {length} bytes exceeds {MAX_MESSAGE}")
    if len(body) != 5 + length:
        raise GrpcError(INVALID_ARGUMENT, "gRPC body length does not match its message prefix")
    return body[5:]


def make_request(csr_pem: str, validity_seconds: int, impersonate: Optional[str] = None) -> bytes:
    request = IstioCertificateRequest(csr=csr_pem, validity_duration=int(validity_seconds))
    if impersonate:
        request.metadata.fields[IMPERSONATED_IDENTITY].string_value = impersonate
    return request.SerializeToString()


def parse_request(payload: bytes) -> Tuple[str, int, Dict[str, str]]:
    request = IstioCertificateRequest()
    try:
        request.ParseFromString(payload)
    except Exception as exc:  # protobuf raises its own DecodeError; all mean the same to the caller
        raise GrpcError(INVALID_ARGUMENT, f"malformed IstioCertificateRequest: {exc}") from exc
    metadata = {
        key: value.string_value
        for key, value in request.metadata.fields.items()
        if value.WhichOneof("kind") == "string_value"
    }
    return request.csr, int(request.validity_duration), metadata


def make_response(chain: List[str]) -> bytes:
    return IstioCertificateResponse(cert_chain=chain).SerializeToString()


def parse_response(payload: bytes) -> List[str]:
    response = IstioCertificateResponse()
    try:
        response.ParseFromString(payload)
    except Exception as exc:
        raise GrpcError(INTERNAL, f"malformed IstioCertificateResponse: {exc}") from exc
    return list(response.cert_chain)


def percent_decode(message: str) -> str:
    """grpc-message is percent-encoded (gRPC over HTTP/2 spec)."""
    return unquote(message)


def percent_encode(message: str) -> str:
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
