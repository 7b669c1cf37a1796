from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("node_id", "payload")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    payload: bytes
    def __init__(self, node_id: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ProbeChunk(_message.Message):
    __slots__ = ("data", "task_id")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    task_id: str
    def __init__(self, data: _Optional[bytes] = ..., task_id: _Optional[str] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("node_id", "bytes_received", "first_chunk_bytes", "first_to_last_s", "num_chunks")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TO_LAST_S_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    bytes_received: int
    first_chunk_bytes: int
    first_to_last_s: float
    num_chunks: int
    def __init__(self, node_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., first_chunk_bytes: _Optional[int] = ..., first_to_last_s: _Optional[float] = ..., num_chunks: _Optional[int] = ...) -> None: ...
