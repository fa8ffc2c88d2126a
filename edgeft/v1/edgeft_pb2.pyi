from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAIN: _ClassVar[TaskKind]
    STATISTICS: _ClassVar[TaskKind]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
INT64: DType
TRAIN: TaskKind
STATISTICS: TaskKind

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("os", "cores", "ram_bytes", "free_disk_bytes", "ort_version", "execution_providers", "max_lora_rank", "engines")
    OS_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ORT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    os: str
    cores: int
    ram_bytes: int
    free_disk_bytes: int
    ort_version: str
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    max_lora_rank: int
    engines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, os: _Optional[str] = ..., cores: _Optional[int] = ..., ram_bytes: _Optional[int] = ..., free_disk_bytes: _Optional[int] = ..., ort_version: _Optional[str] = ..., execution_providers: _Optional[_Iterable[str]] = ..., max_lora_rank: _Optional[int] = ..., engines: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("device_id", "enrolment_token", "capabilities")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    enrolment_token: str
    capabilities: Capabilities
    def __init__(self, device_id: _Optional[str] = ..., enrolment_token: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("epochs", "max_steps", "batch_size", "learning_rate", "warmup_ratio", "grad_accum_steps", "pack")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    max_steps: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    grad_accum_steps: int
    pack: bool
    def __init__(self, epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., warmup_ratio: _Optional[float] = ..., grad_accum_steps: _Optional[int] = ..., pack: _Optional[bool] = ...) -> None: ...

class DataSchema(_message.Message):
    __slots__ = ("text_column", "label_column", "format", "image_column", "feature_columns")
    TEXT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COLUMN_FIELD_NUMBER: _ClassVar[int]
    FEATURE_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    text_column: str
    label_column: str
    format: str
    image_column: str
    feature_columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text_column: _Optional[str] = ..., label_column: _Optional[str] = ..., format: _Optional[str] = ..., image_column: _Optional[str] = ..., feature_columns: _Optional[_Iterable[str]] = ...) -> None: ...

class PollTaskRequest(_message.Message):
    __slots__ = ("device_id", "wait_seconds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    wait_seconds: int
    def __init__(self, device_id: _Optional[str] = ..., wait_seconds: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("job_id", "round", "bundle_digest", "train", "global_adapter", "deadline_unix_ms", "upload_dtype", "data", "kind", "secure_aggregation", "asynchronous", "upload_message_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    ASYNCHRONOUS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    bundle_digest: str
    train: TrainSpec
    global_adapter: _containers.RepeatedCompositeFieldContainer[Tensor]
    deadline_unix_ms: int
    upload_dtype: DType
    data: DataSchema
    kind: TaskKind
    secure_aggregation: SecAggSettings
    asynchronous: AsyncTask
    upload_message_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., bundle_digest: _Optional[str] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., global_adapter: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ..., upload_dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[_Union[DataSchema, _Mapping]] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., secure_aggregation: _Optional[_Union[SecAggSettings, _Mapping]] = ..., asynchronous: _Optional[_Union[AsyncTask, _Mapping]] = ..., upload_message_bytes: _Optional[int] = ...) -> None: ...

class AsyncTask(_message.Message):
    __slots__ = ("base_version", "upload_id")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    base_version: int
    upload_id: str
    def __init__(self, base_version: _Optional[int] = ..., upload_id: _Optional[str] = ...) -> None: ...

class PollTaskResponse(_message.Message):
    __slots__ = ("task", "retry_after_seconds", "finished")
    TASK_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    task: Task
    retry_after_seconds: int
    finished: str
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., retry_after_seconds: _Optional[int] = ..., finished: _Optional[str] = ...) -> None: ...

class BundleFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ("bundle_digest",)
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    bundle_digest: str
    def __init__(self, bundle_digest: _Optional[str] = ...) -> None: ...

class BundleInfo(_message.Message):
    __slots__ = ("bundle_digest", "manifest_json", "files")
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    bundle_digest: str
    manifest_json: bytes
    files: _containers.RepeatedCompositeFieldContainer[BundleFile]
    def __init__(self, bundle_digest: _Optional[str] = ..., manifest_json: _Optional[bytes] = ..., files: _Optional[_Iterable[_Union[BundleFile, _Mapping]]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("bundle_digest", "file", "offset")
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    bundle_digest: str
    file: str
    offset: int
    def __init__(self, bundle_digest: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class BundleChunk(_message.Message):
    __slots__ = ("file", "offset", "data", "chunk_sha256")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    file: str
    offset: int
    data: bytes
    chunk_sha256: str
    def __init__(self, file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., chunk_sha256: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("job_id", "round", "device_id", "upload_id", "n_examples", "metrics", "base_version")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    N_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    device_id: str
    upload_id: str
    n_examples: int
    metrics: _containers.ScalarMap[str, float]
    base_version: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., device_id: _Optional[str] = ..., upload_id: _Optional[str] = ..., n_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., base_version: _Optional[int] = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("header", "chunk", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: TensorChunk
    chunks: TensorChunks
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., chunks: _Optional[_Union[TensorChunks, _Mapping]] = ...) -> None: ...

class TensorChunks(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("duplicate", "message")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    message: str
    def __init__(self, duplicate: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, device_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecAggSettings(_message.Message):
    __slots__ = ("bits", "clip", "ring_bits", "threshold", "weighted", "max_weight", "clip_norm")
    BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    bits: int
    clip: float
    ring_bits: int
    threshold: int
    weighted: bool
    max_weight: int
    clip_norm: float
    def __init__(self, bits: _Optional[int] = ..., clip: _Optional[float] = ..., ring_bits: _Optional[int] = ..., threshold: _Optional[int] = ..., weighted: _Optional[bool] = ..., max_weight: _Optional[int] = ..., clip_norm: _Optional[float] = ...) -> None: ...

class SecAggPublicKeys(_message.Message):
    __slots__ = ("device_id", "cipher_public_key", "mask_public_key")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    cipher_public_key: bytes
    mask_public_key: bytes
    def __init__(self, device_id: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class SecAggEncryptedShares(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShareKeys(_message.Message):
    __slots__ = ("self_mask_commitment", "shares")
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    self_mask_commitment: bytes
    shares: _containers.RepeatedCompositeFieldContainer[SecAggEncryptedShares]
    def __init__(self, self_mask_commitment: _Optional[bytes] = ..., shares: _Optional[_Iterable[_Union[SecAggEncryptedShares, _Mapping]]] = ...) -> None: ...

class SecAggMaskedInput(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmask(_message.Message):
    __slots__ = ("self_mask_shares", "mask_key_shares")
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, self_mask_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("job_id", "round", "device_id", "wait_seconds", "advertise", "share_keys", "masked_input", "unmask")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    device_id: str
    wait_seconds: int
    advertise: SecAggPublicKeys
    share_keys: SecAggShareKeys
    masked_input: SecAggMaskedInput
    unmask: SecAggUnmask
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., device_id: _Optional[str] = ..., wait_seconds: _Optional[int] = ..., advertise: _Optional[_Union[SecAggPublicKeys, _Mapping]] = ..., share_keys: _Optional[_Union[SecAggShareKeys, _Mapping]] = ..., masked_input: _Optional[_Union[SecAggMaskedInput, _Mapping]] = ..., unmask: _Optional[_Union[SecAggUnmask, _Mapping]] = ...) -> None: ...

class SecAggRoster(_message.Message):
    __slots__ = ("threshold", "keys")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    threshold: int
    keys: _containers.RepeatedCompositeFieldContainer[SecAggPublicKeys]
    def __init__(self, threshold: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[SecAggPublicKeys, _Mapping]]] = ...) -> None: ...

class SecAggInbox(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SecAggEncryptedShares]
    def __init__(self, shares: _Optional[_Iterable[_Union[SecAggEncryptedShares, _Mapping]]] = ...) -> None: ...

class SecAggSurvivors(_message.Message):
    __slots__ = ("device_ids",)
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggResponse(_message.Message):
    __slots__ = ("retry_after_seconds", "roster", "inbox", "survivors", "accepted", "aborted")
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    retry_after_seconds: int
    roster: SecAggRoster
    inbox: SecAggInbox
    survivors: SecAggSurvivors
    accepted: str
    aborted: str
    def __init__(self, retry_after_seconds: _Optional[int] = ..., roster: _Optional[_Union[SecAggRoster, _Mapping]] = ..., inbox: _Optional[_Union[SecAggInbox, _Mapping]] = ..., survivors: _Optional[_Union[SecAggSurvivors, _Mapping]] = ..., accepted: _Optional[str] = ..., aborted: _Optional[str] = ...) -> None: ...
