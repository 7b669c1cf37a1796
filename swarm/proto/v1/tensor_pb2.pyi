from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    TENSOR_KIND_ACTIVATION: _ClassVar[TensorKind]
    TENSOR_KIND_GRADIENT: _ClassVar[TensorKind]
    TENSOR_KIND_HIDDEN: _ClassVar[TensorKind]
    TENSOR_KIND_WITNESS_INPUT: _ClassVar[TensorKind]
    TENSOR_KIND_WITNESS_OUTPUT: _ClassVar[TensorKind]
    TENSOR_KIND_WITNESS_GRAD_OUT: _ClassVar[TensorKind]
    TENSOR_KIND_WITNESS_GRAD_IN: _ClassVar[TensorKind]
    TENSOR_KIND_KV_CACHE: _ClassVar[TensorKind]
    TENSOR_KIND_WITNESS_OUTPUT_REF: _ClassVar[TensorKind]
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_ACTIVATION: TensorKind
TENSOR_KIND_GRADIENT: TensorKind
TENSOR_KIND_HIDDEN: TensorKind
TENSOR_KIND_WITNESS_INPUT: TensorKind
TENSOR_KIND_WITNESS_OUTPUT: TensorKind
TENSOR_KIND_WITNESS_GRAD_OUT: TensorKind
TENSOR_KIND_WITNESS_GRAD_IN: TensorKind
TENSOR_KIND_KV_CACHE: TensorKind
TENSOR_KIND_WITNESS_OUTPUT_REF: TensorKind

class TensorHeader(_message.Message):
    __slots__ = ("job_id", "step", "micro_batch", "sample_ids", "shape", "dtype", "codec", "codec_meta", "payload_bytes", "payload_crc32", "kind", "boundary", "sender_id", "replica", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_META_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CRC32_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    micro_batch: int
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    codec: str
    codec_meta: bytes
    payload_bytes: int
    payload_crc32: int
    kind: TensorKind
    boundary: int
    sender_id: str
    replica: int
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., sample_ids: _Optional[_Iterable[int]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., codec: _Optional[str] = ..., codec_meta: _Optional[bytes] = ..., payload_bytes: _Optional[int] = ..., payload_crc32: _Optional[int] = ..., kind: _Optional[_Union[TensorKind, str]] = ..., boundary: _Optional[int] = ..., sender_id: _Optional[str] = ..., replica: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorAck(_message.Message):
    __slots__ = ("accepted", "reason", "received_bytes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    received_bytes: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., received_bytes: _Optional[int] = ...) -> None: ...
