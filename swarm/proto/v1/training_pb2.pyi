from swarm.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobSpec(_message.Message):
    __slots__ = ("name", "steps", "epochs", "batch_size", "micro_batch_size", "seq_len", "lr", "compression", "checkpoint_every", "seed", "warmup_steps", "weight_decay", "grad_clip", "schedule", "num_stages", "num_replicas", "peer_timeout_s", "min_lr_ratio", "node_wait_s", "verify_prob")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PEER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    NODE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_PROB_FIELD_NUMBER: _ClassVar[int]
    name: str
    steps: int
    epochs: float
    batch_size: int
    micro_batch_size: int
    seq_len: int
    lr: float
    compression: str
    checkpoint_every: int
    seed: int
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    schedule: str
    num_stages: int
    num_replicas: int
    peer_timeout_s: float
    min_lr_ratio: float
    node_wait_s: float
    verify_prob: float
    def __init__(self, name: _Optional[str] = ..., steps: _Optional[int] = ..., epochs: _Optional[float] = ..., batch_size: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., lr: _Optional[float] = ..., compression: _Optional[str] = ..., checkpoint_every: _Optional[int] = ..., seed: _Optional[int] = ..., warmup_steps: _Optional[int] = ..., weight_decay: _Optional[float] = ..., grad_clip: _Optional[float] = ..., schedule: _Optional[str] = ..., num_stages: _Optional[int] = ..., num_replicas: _Optional[int] = ..., peer_timeout_s: _Optional[float] = ..., min_lr_ratio: _Optional[float] = ..., node_wait_s: _Optional[float] = ..., verify_prob: _Optional[float] = ...) -> None: ...

class FileHeader(_message.Message):
    __slots__ = ("name", "size_bytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class SubmitJobChunk(_message.Message):
    __slots__ = ("spec", "file", "data")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    file: FileHeader
    data: bytes
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., file: _Optional[_Union[FileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class JobRecord(_message.Message):
    __slots__ = ("job_id", "state", "reason", "spec", "created_at_s", "updated_at_s", "step", "total_steps", "loss", "tokens_per_s", "detail_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: str
    reason: str
    spec: JobSpec
    created_at_s: float
    updated_at_s: float
    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    detail_json: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., created_at_s: _Optional[float] = ..., updated_at_s: _Optional[float] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., detail_json: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobRecord]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobRecord, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PeerRef(_message.Message):
    __slots__ = ("node_id", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class StageAssignment(_message.Message):
    __slots__ = ("job_id", "attempt", "stage", "num_stages", "replica", "num_replicas", "first_layer", "last_layer_excl", "prev", "next", "stage_replicas", "spec", "model_config_json", "num_samples", "dataset_key", "resume_step", "fence", "switch_step", "verify_json", "state_source", "state_serves", "checkpoint_keeper", "keeps", "pipeline", "share_index", "share_count", "prev_holders", "next_holders", "has_pipeline", "fence_all_live", "fence_live_members", "fence_dropped")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAST_LAYER_EXCL_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    STAGE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_KEY_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEP_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    SWITCH_STEP_FIELD_NUMBER: _ClassVar[int]
    VERIFY_JSON_FIELD_NUMBER: _ClassVar[int]
    STATE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_SERVES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEEPER_FIELD_NUMBER: _ClassVar[int]
    KEEPS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    SHARE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PREV_HOLDERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOLDERS_FIELD_NUMBER: _ClassVar[int]
    HAS_PIPELINE_FIELD_NUMBER: _ClassVar[int]
    FENCE_ALL_LIVE_FIELD_NUMBER: _ClassVar[int]
    FENCE_LIVE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    FENCE_DROPPED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    stage: int
    num_stages: int
    replica: int
    num_replicas: int
    first_layer: int
    last_layer_excl: int
    prev: PeerRef
    next: PeerRef
    stage_replicas: _containers.RepeatedCompositeFieldContainer[PeerRef]
    spec: JobSpec
    model_config_json: str
    num_samples: int
    dataset_key: str
    resume_step: int
    fence: bool
    switch_step: int
    verify_json: str
    state_source: StateSource
    state_serves: _containers.RepeatedCompositeFieldContainer[StateServe]
    checkpoint_keeper: PeerRef
    keeps: _containers.RepeatedCompositeFieldContainer[KeptStage]
    pipeline: int
    share_index: int
    share_count: int
    prev_holders: _containers.RepeatedCompositeFieldContainer[PeerRef]
    next_holders: _containers.RepeatedCompositeFieldContainer[PeerRef]
    has_pipeline: bool
    fence_all_live: bool
    fence_live_members: _containers.RepeatedScalarFieldContainer[int]
    fence_dropped: _containers.RepeatedCompositeFieldContainer[DroppedShare]
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., replica: _Optional[int] = ..., num_replicas: _Optional[int] = ..., first_layer: _Optional[int] = ..., last_layer_excl: _Optional[int] = ..., prev: _Optional[_Union[PeerRef, _Mapping]] = ..., next: _Optional[_Union[PeerRef, _Mapping]] = ..., stage_replicas: _Optional[_Iterable[_Union[PeerRef, _Mapping]]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., model_config_json: _Optional[str] = ..., num_samples: _Optional[int] = ..., dataset_key: _Optional[str] = ..., resume_step: _Optional[int] = ..., fence: _Optional[bool] = ..., switch_step: _Optional[int] = ..., verify_json: _Optional[str] = ..., state_source: _Optional[_Union[StateSource, _Mapping]] = ..., state_serves: _Optional[_Iterable[_Union[StateServe, _Mapping]]] = ..., checkpoint_keeper: _Optional[_Union[PeerRef, _Mapping]] = ..., keeps: _Optional[_Iterable[_Union[KeptStage, _Mapping]]] = ..., pipeline: _Optional[int] = ..., share_index: _Optional[int] = ..., share_count: _Optional[int] = ..., prev_holders: _Optional[_Iterable[_Union[PeerRef, _Mapping]]] = ..., next_holders: _Optional[_Iterable[_Union[PeerRef, _Mapping]]] = ..., has_pipeline: _Optional[bool] = ..., fence_all_live: _Optional[bool] = ..., fence_live_members: _Optional[_Iterable[int]] = ..., fence_dropped: _Optional[_Iterable[_Union[DroppedShare, _Mapping]]] = ...) -> None: ...

class KeptStage(_message.Message):
    __slots__ = ("peer", "stage", "replica")
    PEER_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    peer: PeerRef
    stage: int
    replica: int
    def __init__(self, peer: _Optional[_Union[PeerRef, _Mapping]] = ..., stage: _Optional[int] = ..., replica: _Optional[int] = ...) -> None: ...

class StateSource(_message.Message):
    __slots__ = ("peer", "step", "weights_sha256", "optimizer_sha256", "stage", "required")
    PEER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    peer: PeerRef
    step: int
    weights_sha256: str
    optimizer_sha256: str
    stage: int
    required: bool
    def __init__(self, peer: _Optional[_Union[PeerRef, _Mapping]] = ..., step: _Optional[int] = ..., weights_sha256: _Optional[str] = ..., optimizer_sha256: _Optional[str] = ..., stage: _Optional[int] = ..., required: _Optional[bool] = ...) -> None: ...

class StateServe(_message.Message):
    __slots__ = ("stage", "step", "node_ids")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    step: int
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stage: _Optional[int] = ..., step: _Optional[int] = ..., node_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PollAssignmentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PollAssignmentsReply(_message.Message):
    __slots__ = ("assignments", "cancelled_job_ids")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[StageAssignment]
    cancelled_job_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, assignments: _Optional[_Iterable[_Union[StageAssignment, _Mapping]]] = ..., cancelled_job_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ProgressReport(_message.Message):
    __slots__ = ("job_id", "attempt", "stage", "replica", "step", "has_loss", "loss", "tokens_per_s", "bytes_sent", "bytes_raw", "step_s", "compute_s", "wait_s", "comm_s", "state", "error", "tokens", "bytes_forward", "bytes_backward", "micro_batch_losses", "checks", "blame_node_id", "param_digest", "param_sketch", "state_from", "state_bytes", "wait_activation_s", "wait_gradient_s", "kept_step", "digests")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HAS_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RAW_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COMM_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FORWARD_FIELD_NUMBER: _ClassVar[int]
    BYTES_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_LOSSES_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    BLAME_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PARAM_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARAM_SKETCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FROM_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WAIT_ACTIVATION_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_GRADIENT_S_FIELD_NUMBER: _ClassVar[int]
    KEPT_STEP_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    stage: int
    replica: int
    step: int
    has_loss: bool
    loss: float
    tokens_per_s: float
    bytes_sent: int
    bytes_raw: int
    step_s: float
    compute_s: float
    wait_s: float
    comm_s: float
    state: str
    error: str
    tokens: int
    bytes_forward: int
    bytes_backward: int
    micro_batch_losses: _containers.RepeatedScalarFieldContainer[float]
    checks: _containers.RepeatedCompositeFieldContainer[SpotCheck]
    blame_node_id: str
    param_digest: str
    param_sketch: _containers.RepeatedScalarFieldContainer[float]
    state_from: str
    state_bytes: int
    wait_activation_s: float
    wait_gradient_s: float
    kept_step: int
    digests: _containers.RepeatedCompositeFieldContainer[TensorDigest]
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., stage: _Optional[int] = ..., replica: _Optional[int] = ..., step: _Optional[int] = ..., has_loss: _Optional[bool] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_raw: _Optional[int] = ..., step_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., wait_s: _Optional[float] = ..., comm_s: _Optional[float] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., tokens: _Optional[int] = ..., bytes_forward: _Optional[int] = ..., bytes_backward: _Optional[int] = ..., micro_batch_losses: _Optional[_Iterable[float]] = ..., checks: _Optional[_Iterable[_Union[SpotCheck, _Mapping]]] = ..., blame_node_id: _Optional[str] = ..., param_digest: _Optional[str] = ..., param_sketch: _Optional[_Iterable[float]] = ..., state_from: _Optional[str] = ..., state_bytes: _Optional[int] = ..., wait_activation_s: _Optional[float] = ..., wait_gradient_s: _Optional[float] = ..., kept_step: _Optional[int] = ..., digests: _Optional[_Iterable[_Union[TensorDigest, _Mapping]]] = ...) -> None: ...

class TensorDigest(_message.Message):
    __slots__ = ("micro_batch", "what", "digest")
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    micro_batch: int
    what: str
    digest: bytes
    def __init__(self, micro_batch: _Optional[int] = ..., what: _Optional[str] = ..., digest: _Optional[bytes] = ...) -> None: ...

class SpotCheck(_message.Message):
    __slots__ = ("stage", "replica", "step", "micro_batch", "what", "match", "error", "tolerance", "repeated_match", "value", "copies")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    REPEATED_MATCH_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    stage: int
    replica: int
    step: int
    micro_batch: int
    what: str
    match: bool
    error: float
    tolerance: float
    repeated_match: bool
    value: float
    copies: _containers.RepeatedCompositeFieldContainer[TensorDigest]
    def __init__(self, stage: _Optional[int] = ..., replica: _Optional[int] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., what: _Optional[str] = ..., match: _Optional[bool] = ..., error: _Optional[float] = ..., tolerance: _Optional[float] = ..., repeated_match: _Optional[bool] = ..., value: _Optional[float] = ..., copies: _Optional[_Iterable[_Union[TensorDigest, _Mapping]]] = ...) -> None: ...

class ProgressAck(_message.Message):
    __slots__ = ("stop", "reason", "start", "fence", "switch_step", "fence_all_live", "fence_live_members", "fence_dropped")
    STOP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    SWITCH_STEP_FIELD_NUMBER: _ClassVar[int]
    FENCE_ALL_LIVE_FIELD_NUMBER: _ClassVar[int]
    FENCE_LIVE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    FENCE_DROPPED_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    reason: str
    start: bool
    fence: bool
    switch_step: int
    fence_all_live: bool
    fence_live_members: _containers.RepeatedScalarFieldContainer[int]
    fence_dropped: _containers.RepeatedCompositeFieldContainer[DroppedShare]
    def __init__(self, stop: _Optional[bool] = ..., reason: _Optional[str] = ..., start: _Optional[bool] = ..., fence: _Optional[bool] = ..., switch_step: _Optional[int] = ..., fence_all_live: _Optional[bool] = ..., fence_live_members: _Optional[_Iterable[int]] = ..., fence_dropped: _Optional[_Iterable[_Union[DroppedShare, _Mapping]]] = ...) -> None: ...

class DroppedShare(_message.Message):
    __slots__ = ("node_id", "stage", "share_index", "share_count")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SHARE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARE_COUNT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    stage: int
    share_index: int
    share_count: int
    def __init__(self, node_id: _Optional[str] = ..., stage: _Optional[int] = ..., share_index: _Optional[int] = ..., share_count: _Optional[int] = ...) -> None: ...

class FetchJobDataRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class FetchStageWeightsRequest(_message.Message):
    __slots__ = ("job_id", "stage", "optimizer_state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    stage: int
    optimizer_state: bool
    def __init__(self, job_id: _Optional[str] = ..., stage: _Optional[int] = ..., optimizer_state: _Optional[bool] = ...) -> None: ...

class DownloadResultRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ResumeJobRequest(_message.Message):
    __slots__ = ("job_id", "spec")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: FileHeader
    data: bytes
    def __init__(self, file: _Optional[_Union[FileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CheckpointHeader(_message.Message):
    __slots__ = ("job_id", "stage", "replica", "step", "final", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    stage: int
    replica: int
    step: int
    final: bool
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., stage: _Optional[int] = ..., replica: _Optional[int] = ..., step: _Optional[int] = ..., final: _Optional[bool] = ..., attempt: _Optional[int] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("header", "file", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CheckpointHeader
    file: FileHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[CheckpointHeader, _Mapping]] = ..., file: _Optional[_Union[FileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CheckpointAck(_message.Message):
    __slots__ = ("step", "bytes_received")
    STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    step: int
    bytes_received: int
    def __init__(self, step: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class RendezvousRequest(_message.Message):
    __slots__ = ("job_id", "stage", "replica", "maddrs", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    stage: int
    replica: int
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., stage: _Optional[int] = ..., replica: _Optional[int] = ..., maddrs: _Optional[_Iterable[str]] = ..., attempt: _Optional[int] = ...) -> None: ...

class RendezvousReply(_message.Message):
    __slots__ = ("maddrs", "num_joined")
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    NUM_JOINED_FIELD_NUMBER: _ClassVar[int]
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    num_joined: int
    def __init__(self, maddrs: _Optional[_Iterable[str]] = ..., num_joined: _Optional[int] = ...) -> None: ...

class FetchStageStateRequest(_message.Message):
    __slots__ = ("job_id", "stage", "attempt", "step", "replica")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    stage: int
    attempt: int
    step: int
    replica: int
    def __init__(self, job_id: _Optional[str] = ..., stage: _Optional[int] = ..., attempt: _Optional[int] = ..., step: _Optional[int] = ..., replica: _Optional[int] = ...) -> None: ...

class TensorFrame(_message.Message):
    __slots__ = ("seq", "header", "payload")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    header: _tensor_pb2.TensorHeader
    payload: bytes
    def __init__(self, seq: _Optional[int] = ..., header: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class TensorFrameAck(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...
