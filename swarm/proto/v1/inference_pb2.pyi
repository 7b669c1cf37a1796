from swarm.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServeSamplingSpec(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ServeSessionEntry(_message.Message):
    __slots__ = ("session_id", "start_position", "num_tokens", "token_ids", "sampling", "reset", "replay_stages")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    REPLAY_STAGES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_position: int
    num_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: ServeSamplingSpec
    reset: bool
    replay_stages: int
    def __init__(self, session_id: _Optional[str] = ..., start_position: _Optional[int] = ..., num_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[ServeSamplingSpec, _Mapping]] = ..., reset: _Optional[bool] = ..., replay_stages: _Optional[int] = ...) -> None: ...

class ServeRouteHop(_message.Message):
    __slots__ = ("replica", "node_id", "address", "capability")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    replica: int
    node_id: str
    address: str
    capability: str
    def __init__(self, replica: _Optional[int] = ..., node_id: _Optional[str] = ..., address: _Optional[str] = ..., capability: _Optional[str] = ...) -> None: ...

class ServeStepRequest(_message.Message):
    __slots__ = ("model_name", "replica", "stage", "entries", "hidden", "close_session_ids", "hidden_codec", "commit_session_ids", "route", "commit_points", "step_nonce", "hidden_raw", "hidden_dtype")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_CODEC_FIELD_NUMBER: _ClassVar[int]
    COMMIT_SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_POINTS_FIELD_NUMBER: _ClassVar[int]
    STEP_NONCE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_RAW_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    replica: int
    stage: int
    entries: _containers.RepeatedCompositeFieldContainer[ServeSessionEntry]
    hidden: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorChunk]
    close_session_ids: _containers.RepeatedScalarFieldContainer[str]
    hidden_codec: str
    commit_session_ids: _containers.RepeatedScalarFieldContainer[str]
    route: _containers.RepeatedCompositeFieldContainer[ServeRouteHop]
    commit_points: _containers.RepeatedCompositeFieldContainer[ServeCommitPoints]
    step_nonce: bytes
    hidden_raw: bytes
    hidden_dtype: str
    def __init__(self, model_name: _Optional[str] = ..., replica: _Optional[int] = ..., stage: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[ServeSessionEntry, _Mapping]]] = ..., hidden: _Optional[_Iterable[_Union[_tensor_pb2.TensorChunk, _Mapping]]] = ..., close_session_ids: _Optional[_Iterable[str]] = ..., hidden_codec: _Optional[str] = ..., commit_session_ids: _Optional[_Iterable[str]] = ..., route: _Optional[_Iterable[_Union[ServeRouteHop, _Mapping]]] = ..., commit_points: _Optional[_Iterable[_Union[ServeCommitPoints, _Mapping]]] = ..., step_nonce: _Optional[bytes] = ..., hidden_raw: _Optional[bytes] = ..., hidden_dtype: _Optional[str] = ...) -> None: ...

class ServeCommitPoints(_message.Message):
    __slots__ = ("session_id", "positions")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., positions: _Optional[_Iterable[int]] = ...) -> None: ...

class ServeCommitment(_message.Message):
    __slots__ = ("stage", "session_id", "input", "output", "position", "token")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    stage: int
    session_id: str
    input: _containers.RepeatedScalarFieldContainer[float]
    output: _containers.RepeatedScalarFieldContainer[float]
    position: int
    token: int
    def __init__(self, stage: _Optional[int] = ..., session_id: _Optional[str] = ..., input: _Optional[_Iterable[float]] = ..., output: _Optional[_Iterable[float]] = ..., position: _Optional[int] = ..., token: _Optional[int] = ...) -> None: ...

class ServeStepReply(_message.Message):
    __slots__ = ("token_ids", "compute_s", "commitments", "stage_compute_s", "signatures")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    STAGE_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    compute_s: float
    commitments: _containers.RepeatedCompositeFieldContainer[ServeCommitment]
    stage_compute_s: _containers.RepeatedScalarFieldContainer[float]
    signatures: _containers.RepeatedCompositeFieldContainer[ServeStageSignature]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., compute_s: _Optional[float] = ..., commitments: _Optional[_Iterable[_Union[ServeCommitment, _Mapping]]] = ..., stage_compute_s: _Optional[_Iterable[float]] = ..., signatures: _Optional[_Iterable[_Union[ServeStageSignature, _Mapping]]] = ...) -> None: ...

class ServeStageSignature(_message.Message):
    __slots__ = ("stage", "signature", "mac")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    stage: int
    signature: bytes
    mac: bytes
    def __init__(self, stage: _Optional[int] = ..., signature: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class ServeCloseSessionRequest(_message.Message):
    __slots__ = ("model_name", "replica", "session_ids")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    replica: int
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., replica: _Optional[int] = ..., session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ServeCloseSessionReply(_message.Message):
    __slots__ = ("num_closed",)
    NUM_CLOSED_FIELD_NUMBER: _ClassVar[int]
    num_closed: int
    def __init__(self, num_closed: _Optional[int] = ...) -> None: ...

class ServeStageAssignment(_message.Message):
    __slots__ = ("model_name", "model_digest", "replica", "stage", "num_stages", "first_layer", "last_layer_excl", "next_address", "next_node_id", "max_seq_len", "max_sessions", "hidden_codec", "shard_sources", "session_timeout_s", "dtype", "prev_node_id", "shard_source_node_ids", "kv_source_node_ids")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAST_LAYER_EXCL_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NEXT_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_CODEC_FIELD_NUMBER: _ClassVar[int]
    SHARD_SOURCES_FIELD_NUMBER: _ClassVar[int]
    SESSION_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREV_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_SOURCE_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_SOURCE_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_digest: str
    replica: int
    stage: int
    num_stages: int
    first_layer: int
    last_layer_excl: int
    next_address: str
    next_node_id: str
    max_seq_len: int
    max_sessions: int
    hidden_codec: str
    shard_sources: _containers.RepeatedScalarFieldContainer[str]
    session_timeout_s: float
    dtype: str
    prev_node_id: str
    shard_source_node_ids: _containers.RepeatedScalarFieldContainer[str]
    kv_source_node_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., model_digest: _Optional[str] = ..., replica: _Optional[int] = ..., stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., first_layer: _Optional[int] = ..., last_layer_excl: _Optional[int] = ..., next_address: _Optional[str] = ..., next_node_id: _Optional[str] = ..., max_seq_len: _Optional[int] = ..., max_sessions: _Optional[int] = ..., hidden_codec: _Optional[str] = ..., shard_sources: _Optional[_Iterable[str]] = ..., session_timeout_s: _Optional[float] = ..., dtype: _Optional[str] = ..., prev_node_id: _Optional[str] = ..., shard_source_node_ids: _Optional[_Iterable[str]] = ..., kv_source_node_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ServeLoadStageRequest(_message.Message):
    __slots__ = ("assignment",)
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    assignment: ServeStageAssignment
    def __init__(self, assignment: _Optional[_Union[ServeStageAssignment, _Mapping]] = ...) -> None: ...

class ServeLoadStageReply(_message.Message):
    __slots__ = ("node_id", "loaded_bytes", "load_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    loaded_bytes: int
    load_s: float
    def __init__(self, node_id: _Optional[str] = ..., loaded_bytes: _Optional[int] = ..., load_s: _Optional[float] = ...) -> None: ...

class ServeStepWireRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServeStepWireReply(_message.Message):
    __slots__ = ("port", "raw_hidden")
    PORT_FIELD_NUMBER: _ClassVar[int]
    RAW_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    port: int
    raw_hidden: bool
    def __init__(self, port: _Optional[int] = ..., raw_hidden: _Optional[bool] = ...) -> None: ...

class ServeUnloadStageRequest(_message.Message):
    __slots__ = ("model_name", "replica")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    replica: int
    def __init__(self, model_name: _Optional[str] = ..., replica: _Optional[int] = ...) -> None: ...

class ServeUnloadStageReply(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    def __init__(self, unloaded: _Optional[bool] = ...) -> None: ...

class ServeFetchShardRequest(_message.Message):
    __slots__ = ("model_name", "model_digest", "first_layer", "last_layer_excl", "include_embeddings", "include_head")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAST_LAYER_EXCL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HEAD_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_digest: str
    first_layer: int
    last_layer_excl: int
    include_embeddings: bool
    include_head: bool
    def __init__(self, model_name: _Optional[str] = ..., model_digest: _Optional[str] = ..., first_layer: _Optional[int] = ..., last_layer_excl: _Optional[int] = ..., include_embeddings: _Optional[bool] = ..., include_head: _Optional[bool] = ...) -> None: ...

class ServeShardChunk(_message.Message):
    __slots__ = ("tensor_name", "dtype", "shape", "tensor_bytes", "data", "tensor_crc32", "config_json")
    TENSOR_NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TENSOR_CRC32_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    tensor_name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    tensor_bytes: int
    data: bytes
    tensor_crc32: int
    config_json: str
    def __init__(self, tensor_name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., tensor_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., tensor_crc32: _Optional[int] = ..., config_json: _Optional[str] = ...) -> None: ...

class ServeUploadHeader(_message.Message):
    __slots__ = ("name", "num_replicas", "files", "max_seq_len", "sessions_per_replica", "objective", "hidden_codec", "num_stages", "dtype", "verify_prob", "routes", "disaggregate", "disaggregate_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_PER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_CODEC_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_PROB_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATE_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATE_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_replicas: int
    files: _containers.RepeatedCompositeFieldContainer[ServeUploadFile]
    max_seq_len: int
    sessions_per_replica: int
    objective: str
    hidden_codec: str
    num_stages: int
    dtype: str
    verify_prob: float
    routes: bool
    disaggregate: bool
    disaggregate_mode: str
    def __init__(self, name: _Optional[str] = ..., num_replicas: _Optional[int] = ..., files: _Optional[_Iterable[_Union[ServeUploadFile, _Mapping]]] = ..., max_seq_len: _Optional[int] = ..., sessions_per_replica: _Optional[int] = ..., objective: _Optional[str] = ..., hidden_codec: _Optional[str] = ..., num_stages: _Optional[int] = ..., dtype: _Optional[str] = ..., verify_prob: _Optional[float] = ..., routes: _Optional[bool] = ..., disaggregate: _Optional[bool] = ..., disaggregate_mode: _Optional[str] = ...) -> None: ...

class ServeUploadFile(_message.Message):
    __slots__ = ("path", "size_bytes", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ServeUploadChunk(_message.Message):
    __slots__ = ("header", "path", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ServeUploadHeader
    path: str
    data: bytes
    def __init__(self, header: _Optional[_Union[ServeUploadHeader, _Mapping]] = ..., path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ServeStageInfo(_message.Message):
    __slots__ = ("node_id", "address", "first_layer", "last_layer_excl", "state")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAST_LAYER_EXCL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    first_layer: int
    last_layer_excl: int
    state: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., first_layer: _Optional[int] = ..., last_layer_excl: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class ServeReplicaInfo(_message.Message):
    __slots__ = ("replica", "stages", "state", "predicted_latency_s")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    replica: int
    stages: _containers.RepeatedCompositeFieldContainer[ServeStageInfo]
    state: str
    predicted_latency_s: float
    def __init__(self, replica: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[ServeStageInfo, _Mapping]]] = ..., state: _Optional[str] = ..., predicted_latency_s: _Optional[float] = ...) -> None: ...

class ServeModelInfo(_message.Message):
    __slots__ = ("name", "family", "num_layers", "digest", "state", "replicas", "created_at_s", "size_bytes", "error", "max_seq_len", "healthy_replicas", "requested_replicas", "healing", "verify_prob", "num_checks", "num_check_failures", "num_checks_void", "routes_enabled", "routes", "disaggregation", "probation_node_ids", "num_referee_checks", "num_referee_void")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HEALING_FIELD_NUMBER: _ClassVar[int]
    VERIFY_PROB_FIELD_NUMBER: _ClassVar[int]
    NUM_CHECKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHECK_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHECKS_VOID_FIELD_NUMBER: _ClassVar[int]
    ROUTES_ENABLED_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATION_FIELD_NUMBER: _ClassVar[int]
    PROBATION_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_REFEREE_CHECKS_FIELD_NUMBER: _ClassVar[int]
    NUM_REFEREE_VOID_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    num_layers: int
    digest: str
    state: str
    replicas: _containers.RepeatedCompositeFieldContainer[ServeReplicaInfo]
    created_at_s: float
    size_bytes: int
    error: str
    max_seq_len: int
    healthy_replicas: int
    requested_replicas: int
    healing: str
    verify_prob: float
    num_checks: int
    num_check_failures: int
    num_checks_void: int
    routes_enabled: bool
    routes: _containers.RepeatedCompositeFieldContainer[ServeRouteInfo]
    disaggregation: ServeDisaggInfo
    probation_node_ids: _containers.RepeatedScalarFieldContainer[str]
    num_referee_checks: int
    num_referee_void: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., num_layers: _Optional[int] = ..., digest: _Optional[str] = ..., state: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ServeReplicaInfo, _Mapping]]] = ..., created_at_s: _Optional[float] = ..., size_bytes: _Optional[int] = ..., error: _Optional[str] = ..., max_seq_len: _Optional[int] = ..., healthy_replicas: _Optional[int] = ..., requested_replicas: _Optional[int] = ..., healing: _Optional[str] = ..., verify_prob: _Optional[float] = ..., num_checks: _Optional[int] = ..., num_check_failures: _Optional[int] = ..., num_checks_void: _Optional[int] = ..., routes_enabled: _Optional[bool] = ..., routes: _Optional[_Iterable[_Union[ServeRouteInfo, _Mapping]]] = ..., disaggregation: _Optional[_Union[ServeDisaggInfo, _Mapping]] = ..., probation_node_ids: _Optional[_Iterable[str]] = ..., num_referee_checks: _Optional[int] = ..., num_referee_void: _Optional[int] = ...) -> None: ...

class ServeDisaggInfo(_message.Message):
    __slots__ = ("enabled", "prefill_nodes", "decode_nodes", "predicted_gain", "predicted_tbt_p99_ratio", "reason", "kv_bytes_moved", "num_handoffs", "num_handoff_failures", "requested", "mode")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODES_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_GAIN_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TBT_P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    NUM_HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    NUM_HANDOFF_FAILURES_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    prefill_nodes: _containers.RepeatedScalarFieldContainer[str]
    decode_nodes: _containers.RepeatedScalarFieldContainer[str]
    predicted_gain: float
    predicted_tbt_p99_ratio: float
    reason: str
    kv_bytes_moved: int
    num_handoffs: int
    num_handoff_failures: int
    requested: bool
    mode: str
    def __init__(self, enabled: _Optional[bool] = ..., prefill_nodes: _Optional[_Iterable[str]] = ..., decode_nodes: _Optional[_Iterable[str]] = ..., predicted_gain: _Optional[float] = ..., predicted_tbt_p99_ratio: _Optional[float] = ..., reason: _Optional[str] = ..., kv_bytes_moved: _Optional[int] = ..., num_handoffs: _Optional[int] = ..., num_handoff_failures: _Optional[int] = ..., requested: _Optional[bool] = ..., mode: _Optional[str] = ...) -> None: ...

class ServeRouteInfo(_message.Message):
    __slots__ = ("replicas", "node_ids", "sessions", "predicted_s_per_token")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedScalarFieldContainer[int]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    sessions: int
    predicted_s_per_token: float
    def __init__(self, replicas: _Optional[_Iterable[int]] = ..., node_ids: _Optional[_Iterable[str]] = ..., sessions: _Optional[int] = ..., predicted_s_per_token: _Optional[float] = ...) -> None: ...

class ServeUploadReply(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ServeModelInfo
    def __init__(self, model: _Optional[_Union[ServeModelInfo, _Mapping]] = ...) -> None: ...

class ServeListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServeListModelsReply(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ServeModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ServeModelInfo, _Mapping]]] = ...) -> None: ...

class ServeGenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "prompt_token_ids", "max_new_tokens", "sampling", "stop")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    sampling: ServeSamplingSpec
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[ServeSamplingSpec, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class ServeGenerateEvent(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "num_prompt_tokens", "num_replays")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLAYS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    num_prompt_tokens: int
    num_replays: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_replays: _Optional[int] = ...) -> None: ...

class ServeConfirmRequest(_message.Message):
    __slots__ = ("assignment",)
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    assignment: ServeStageAssignment
    def __init__(self, assignment: _Optional[_Union[ServeStageAssignment, _Mapping]] = ...) -> None: ...

class ServeConfirmReply(_message.Message):
    __slots__ = ("confirmed", "step_capability", "commit_key")
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    STEP_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    COMMIT_KEY_FIELD_NUMBER: _ClassVar[int]
    confirmed: bool
    step_capability: str
    commit_key: bytes
    def __init__(self, confirmed: _Optional[bool] = ..., step_capability: _Optional[str] = ..., commit_key: _Optional[bytes] = ...) -> None: ...

class ServeConfirmFetchRequest(_message.Message):
    __slots__ = ("model_name", "node_id")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    node_id: str
    def __init__(self, model_name: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class ServeConfirmFetchReply(_message.Message):
    __slots__ = ("allowed",)
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    def __init__(self, allowed: _Optional[bool] = ...) -> None: ...

class ServeUnserveRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ServeUnserveReply(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class ServePushKVRequest(_message.Message):
    __slots__ = ("model_name", "replica", "session_id", "target", "num_positions", "handoff_nonce")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NUM_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_NONCE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    replica: int
    session_id: str
    target: ServeRouteHop
    num_positions: int
    handoff_nonce: bytes
    def __init__(self, model_name: _Optional[str] = ..., replica: _Optional[int] = ..., session_id: _Optional[str] = ..., target: _Optional[_Union[ServeRouteHop, _Mapping]] = ..., num_positions: _Optional[int] = ..., handoff_nonce: _Optional[bytes] = ...) -> None: ...

class ServePushKVReply(_message.Message):
    __slots__ = ("kv_bytes", "sent_digest", "sent_sketch", "receipt")
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SENT_SKETCH_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    kv_bytes: int
    sent_digest: bytes
    sent_sketch: _containers.RepeatedScalarFieldContainer[float]
    receipt: ServeKVReceipt
    def __init__(self, kv_bytes: _Optional[int] = ..., sent_digest: _Optional[bytes] = ..., sent_sketch: _Optional[_Iterable[float]] = ..., receipt: _Optional[_Union[ServeKVReceipt, _Mapping]] = ...) -> None: ...

class ServeKVReceipt(_message.Message):
    __slots__ = ("digest", "sketch", "positions", "signature")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SKETCH_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    sketch: _containers.RepeatedScalarFieldContainer[float]
    positions: int
    signature: bytes
    def __init__(self, digest: _Optional[bytes] = ..., sketch: _Optional[_Iterable[float]] = ..., positions: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ServeKVChunk(_message.Message):
    __slots__ = ("model_name", "replica", "tensor", "handoff_nonce")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_NONCE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    replica: int
    tensor: _tensor_pb2.TensorChunk
    handoff_nonce: bytes
    def __init__(self, model_name: _Optional[str] = ..., replica: _Optional[int] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., handoff_nonce: _Optional[bytes] = ...) -> None: ...

class ServeImportKVReply(_message.Message):
    __slots__ = ("kv_bytes", "receipt")
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    kv_bytes: int
    receipt: ServeKVReceipt
    def __init__(self, kv_bytes: _Optional[int] = ..., receipt: _Optional[_Union[ServeKVReceipt, _Mapping]] = ...) -> None: ...
