from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hardware(_message.Message):
    __slots__ = ("device_kind", "device_name", "memory_bytes", "memory_free_bytes", "compute_capability", "cpu_cores", "ram_bytes", "disk_free_bytes", "tflops", "tflops_dtype", "device", "mem_bandwidth_Bps")
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TFLOPS_FIELD_NUMBER: _ClassVar[int]
    TFLOPS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEM_BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    device_kind: str
    device_name: str
    memory_bytes: int
    memory_free_bytes: int
    compute_capability: str
    cpu_cores: int
    ram_bytes: int
    disk_free_bytes: int
    tflops: float
    tflops_dtype: str
    device: str
    mem_bandwidth_Bps: float
    def __init__(self, device_kind: _Optional[str] = ..., device_name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., compute_capability: _Optional[str] = ..., cpu_cores: _Optional[int] = ..., ram_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., tflops: _Optional[float] = ..., tflops_dtype: _Optional[str] = ..., device: _Optional[str] = ..., mem_bandwidth_Bps: _Optional[float] = ...) -> None: ...

class RegistrationPayload(_message.Message):
    __slots__ = ("protocol_version", "node_id", "name", "peer_address", "hardware", "timestamp_s", "nonce", "tls_public_key", "relay_port")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TLS_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    RELAY_PORT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: str
    node_id: str
    name: str
    peer_address: str
    hardware: Hardware
    timestamp_s: float
    nonce: bytes
    tls_public_key: bytes
    relay_port: int
    def __init__(self, protocol_version: _Optional[str] = ..., node_id: _Optional[str] = ..., name: _Optional[str] = ..., peer_address: _Optional[str] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., timestamp_s: _Optional[float] = ..., nonce: _Optional[bytes] = ..., tls_public_key: _Optional[bytes] = ..., relay_port: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("payload", "public_key", "signature", "token")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    public_key: bytes
    signature: bytes
    token: str
    def __init__(self, payload: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., token: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id", "session", "heartbeat_interval_s", "coordinator_version", "protocol_version", "certificate_pem")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session: str
    heartbeat_interval_s: float
    coordinator_version: str
    protocol_version: str
    certificate_pem: str
    def __init__(self, node_id: _Optional[str] = ..., session: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., coordinator_version: _Optional[str] = ..., protocol_version: _Optional[str] = ..., certificate_pem: _Optional[str] = ...) -> None: ...

class MeasureTask(_message.Message):
    __slots__ = ("task_id", "dst_node_id", "dst_address", "probe_bytes", "num_pings")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DST_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROBE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_PINGS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    dst_node_id: str
    dst_address: str
    probe_bytes: int
    num_pings: int
    def __init__(self, task_id: _Optional[str] = ..., dst_node_id: _Optional[str] = ..., dst_address: _Optional[str] = ..., probe_bytes: _Optional[int] = ..., num_pings: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("status", "metrics_json", "memory_free_bytes", "transfers", "probes_received")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    PROBES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    status: str
    metrics_json: str
    memory_free_bytes: int
    transfers: _containers.RepeatedCompositeFieldContainer[TransferObservation]
    probes_received: _containers.RepeatedCompositeFieldContainer[ProbeReceipt]
    def __init__(self, status: _Optional[str] = ..., metrics_json: _Optional[str] = ..., memory_free_bytes: _Optional[int] = ..., transfers: _Optional[_Iterable[_Union[TransferObservation, _Mapping]]] = ..., probes_received: _Optional[_Iterable[_Union[ProbeReceipt, _Mapping]]] = ...) -> None: ...

class ProbeReceipt(_message.Message):
    __slots__ = ("task_id", "bytes_received", "timed_bytes", "first_to_last_s")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TIMED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TO_LAST_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    bytes_received: int
    timed_bytes: int
    first_to_last_s: float
    def __init__(self, task_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., timed_bytes: _Optional[int] = ..., first_to_last_s: _Optional[float] = ...) -> None: ...

class TransferObservation(_message.Message):
    __slots__ = ("dst_node_id", "num_bytes", "seconds")
    DST_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    dst_node_id: str
    num_bytes: int
    seconds: float
    def __init__(self, dst_node_id: _Optional[str] = ..., num_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("tasks", "heartbeat_interval_s", "server_time_s", "certificate_pem", "probe_sources")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_S_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    PROBE_SOURCES_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[MeasureTask]
    heartbeat_interval_s: float
    server_time_s: float
    certificate_pem: str
    probe_sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tasks: _Optional[_Iterable[_Union[MeasureTask, _Mapping]]] = ..., heartbeat_interval_s: _Optional[float] = ..., server_time_s: _Optional[float] = ..., certificate_pem: _Optional[str] = ..., probe_sources: _Optional[_Iterable[str]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MeasurementReport(_message.Message):
    __slots__ = ("task_id", "dst_node_id", "rtt_s", "bandwidth_Bps", "probe_bytes", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DST_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    PROBE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    dst_node_id: str
    rtt_s: float
    bandwidth_Bps: float
    probe_bytes: int
    error: str
    def __init__(self, task_id: _Optional[str] = ..., dst_node_id: _Optional[str] = ..., rtt_s: _Optional[float] = ..., bandwidth_Bps: _Optional[float] = ..., probe_bytes: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class MeasurementAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReachabilityRequest(_message.Message):
    __slots__ = ("coordinator_host",)
    COORDINATOR_HOST_FIELD_NUMBER: _ClassVar[int]
    coordinator_host: str
    def __init__(self, coordinator_host: _Optional[str] = ...) -> None: ...

class ReachabilityReply(_message.Message):
    __slots__ = ("reachability", "advertised_address", "observed_address", "published_address", "relay_address", "relay_node_id", "dial_error", "relay_peer_address")
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    ADVERTISED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RELAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RELAY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DIAL_ERROR_FIELD_NUMBER: _ClassVar[int]
    RELAY_PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    reachability: str
    advertised_address: str
    observed_address: str
    published_address: str
    relay_address: str
    relay_node_id: str
    dial_error: str
    relay_peer_address: str
    def __init__(self, reachability: _Optional[str] = ..., advertised_address: _Optional[str] = ..., observed_address: _Optional[str] = ..., published_address: _Optional[str] = ..., relay_address: _Optional[str] = ..., relay_node_id: _Optional[str] = ..., dial_error: _Optional[str] = ..., relay_peer_address: _Optional[str] = ...) -> None: ...

class NodeRecord(_message.Message):
    __slots__ = ("node_id", "name", "state", "hardware", "peer_address", "registered_at_s", "last_seen_at_s", "metrics_json", "status", "measured_tflops", "quarantine_reason", "reachability", "observed_address", "relay_node_id", "slow_reason", "seen_mem_bandwidth_Bps")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_S_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AT_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_REASON_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RELAY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOW_REASON_FIELD_NUMBER: _ClassVar[int]
    SEEN_MEM_BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    state: str
    hardware: Hardware
    peer_address: str
    registered_at_s: float
    last_seen_at_s: float
    metrics_json: str
    status: str
    measured_tflops: float
    quarantine_reason: str
    reachability: str
    observed_address: str
    relay_node_id: str
    slow_reason: str
    seen_mem_bandwidth_Bps: float
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., peer_address: _Optional[str] = ..., registered_at_s: _Optional[float] = ..., last_seen_at_s: _Optional[float] = ..., metrics_json: _Optional[str] = ..., status: _Optional[str] = ..., measured_tflops: _Optional[float] = ..., quarantine_reason: _Optional[str] = ..., reachability: _Optional[str] = ..., observed_address: _Optional[str] = ..., relay_node_id: _Optional[str] = ..., slow_reason: _Optional[str] = ..., seen_mem_bandwidth_Bps: _Optional[float] = ...) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes", "server_time_s")
    NODES_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_S_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRecord]
    server_time_s: float
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeRecord, _Mapping]]] = ..., server_time_s: _Optional[float] = ...) -> None: ...

class GetNetworkRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinkRecord(_message.Message):
    __slots__ = ("src", "dst", "delay_s", "rtt_s", "bandwidth_Bps", "measured_at_s", "source", "confirmed", "disputed")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    DISPUTED_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    delay_s: float
    rtt_s: float
    bandwidth_Bps: float
    measured_at_s: float
    source: str
    confirmed: bool
    disputed: bool
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., delay_s: _Optional[float] = ..., rtt_s: _Optional[float] = ..., bandwidth_Bps: _Optional[float] = ..., measured_at_s: _Optional[float] = ..., source: _Optional[str] = ..., confirmed: _Optional[bool] = ..., disputed: _Optional[bool] = ...) -> None: ...

class GetNetworkReply(_message.Message):
    __slots__ = ("links", "server_time_s")
    LINKS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_S_FIELD_NUMBER: _ClassVar[int]
    links: _containers.RepeatedCompositeFieldContainer[LinkRecord]
    server_time_s: float
    def __init__(self, links: _Optional[_Iterable[_Union[LinkRecord, _Mapping]]] = ..., server_time_s: _Optional[float] = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ComputeChallenge(_message.Message):
    __slots__ = ("challenge_id", "seed", "n", "count", "target_s")
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TARGET_S_FIELD_NUMBER: _ClassVar[int]
    challenge_id: str
    seed: int
    n: int
    count: int
    target_s: float
    def __init__(self, challenge_id: _Optional[str] = ..., seed: _Optional[int] = ..., n: _Optional[int] = ..., count: _Optional[int] = ..., target_s: _Optional[float] = ...) -> None: ...

class ChallengeCommit(_message.Message):
    __slots__ = ("challenge_id", "commitment", "count_done")
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    COUNT_DONE_FIELD_NUMBER: _ClassVar[int]
    challenge_id: str
    commitment: bytes
    count_done: int
    def __init__(self, challenge_id: _Optional[str] = ..., commitment: _Optional[bytes] = ..., count_done: _Optional[int] = ...) -> None: ...

class ChallengeOpen(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rows: _Optional[_Iterable[int]] = ...) -> None: ...

class ChallengeAnswer(_message.Message):
    __slots__ = ("challenge_id", "row_digests", "rows")
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    challenge_id: str
    row_digests: bytes
    rows: bytes
    def __init__(self, challenge_id: _Optional[str] = ..., row_digests: _Optional[bytes] = ..., rows: _Optional[bytes] = ...) -> None: ...

class ChallengeResult(_message.Message):
    __slots__ = ("passed", "measured_tflops", "message")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    MEASURED_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    measured_tflops: float
    message: str
    def __init__(self, passed: _Optional[bool] = ..., measured_tflops: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...
