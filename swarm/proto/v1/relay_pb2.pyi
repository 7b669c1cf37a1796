from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RelayListenRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RelayEvent(_message.Message):
    __slots__ = ("connection_id", "punch_id", "peer_node_id")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    PUNCH_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: bytes
    punch_id: bytes
    peer_node_id: str
    def __init__(self, connection_id: _Optional[bytes] = ..., punch_id: _Optional[bytes] = ..., peer_node_id: _Optional[str] = ...) -> None: ...

class PunchRequest(_message.Message):
    __slots__ = ("peer_node_id",)
    PEER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    peer_node_id: str
    def __init__(self, peer_node_id: _Optional[str] = ...) -> None: ...

class PunchReply(_message.Message):
    __slots__ = ("punch_id",)
    PUNCH_ID_FIELD_NUMBER: _ClassVar[int]
    punch_id: bytes
    def __init__(self, punch_id: _Optional[bytes] = ...) -> None: ...
