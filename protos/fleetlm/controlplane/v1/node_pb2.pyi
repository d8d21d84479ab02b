import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_PENDING: _ClassVar[ReplicaState]
    REPLICA_STATE_LOADING: _ClassVar[ReplicaState]
    REPLICA_STATE_READY: _ClassVar[ReplicaState]
    REPLICA_STATE_FAILED: _ClassVar[ReplicaState]

class Scheduling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULING_UNSPECIFIED: _ClassVar[Scheduling]
    SCHEDULING_ACTIVE: _ClassVar[Scheduling]
    SCHEDULING_CORDONED: _ClassVar[Scheduling]
    SCHEDULING_DRAINING: _ClassVar[Scheduling]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_PENDING: ReplicaState
REPLICA_STATE_LOADING: ReplicaState
REPLICA_STATE_READY: ReplicaState
REPLICA_STATE_FAILED: ReplicaState
SCHEDULING_UNSPECIFIED: Scheduling
SCHEDULING_ACTIVE: Scheduling
SCHEDULING_CORDONED: Scheduling
SCHEDULING_DRAINING: Scheduling

class Cpu(_message.Message):
    __slots__ = ("model", "cores")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    model: str
    cores: int
    def __init__(self, model: _Optional[str] = ..., cores: _Optional[int] = ...) -> None: ...

class Memory(_message.Message):
    __slots__ = ("total_bytes", "free_bytes")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    free_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "name", "uuid", "memory", "vendor")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    uuid: str
    memory: Memory
    vendor: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., memory: _Optional[_Union[Memory, _Mapping]] = ..., vendor: _Optional[str] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("path", "size_bytes", "format", "kv_bytes_per_token")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    format: str
    kv_bytes_per_token: int
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., format: _Optional[str] = ..., kv_bytes_per_token: _Optional[int] = ...) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("hostname", "cpu", "ram", "gpus", "models_disk_free_bytes", "model_files")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    RAM_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    MODELS_DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILES_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    cpu: Cpu
    ram: Memory
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    models_disk_free_bytes: int
    model_files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    def __init__(self, hostname: _Optional[str] = ..., cpu: _Optional[_Union[Cpu, _Mapping]] = ..., ram: _Optional[_Union[Memory, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., models_disk_free_bytes: _Optional[int] = ..., model_files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "path", "format", "engine", "context_size", "device", "max_running_requests", "max_queued_requests", "engine_args", "gpu_count", "startup_timeout", "command")
    class EngineArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ARGS_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    STARTUP_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    format: str
    engine: str
    context_size: int
    device: str
    max_running_requests: int
    max_queued_requests: int
    engine_args: _containers.ScalarMap[str, str]
    gpu_count: int
    startup_timeout: _duration_pb2.Duration
    command: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., format: _Optional[str] = ..., engine: _Optional[str] = ..., context_size: _Optional[int] = ..., device: _Optional[str] = ..., max_running_requests: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., engine_args: _Optional[_Mapping[str, str]] = ..., gpu_count: _Optional[int] = ..., startup_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., command: _Optional[_Iterable[str]] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("model", "state", "error", "running_requests", "queued_requests", "last_request_at", "assigned", "device", "rejected_requests", "load_progress", "loading_since", "context_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LAST_REQUEST_AT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LOADING_SINCE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    state: ReplicaState
    error: str
    running_requests: int
    queued_requests: int
    last_request_at: _timestamp_pb2.Timestamp
    assigned: bool
    device: str
    rejected_requests: int
    load_progress: float
    loading_since: _timestamp_pb2.Timestamp
    context_size: int
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., error: _Optional[str] = ..., running_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., last_request_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., assigned: _Optional[bool] = ..., device: _Optional[str] = ..., rejected_requests: _Optional[int] = ..., load_progress: _Optional[float] = ..., loading_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., context_size: _Optional[int] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("node_id", "inference_address", "inventory", "replicas", "registered_at", "last_heartbeat_at", "lease_id", "lease_ttl_seconds", "agent_version", "scheduling", "overcommitted")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    OVERCOMMITTED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    inference_address: str
    inventory: Inventory
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    registered_at: _timestamp_pb2.Timestamp
    last_heartbeat_at: _timestamp_pb2.Timestamp
    lease_id: int
    lease_ttl_seconds: int
    agent_version: str
    scheduling: Scheduling
    overcommitted: str
    def __init__(self, node_id: _Optional[str] = ..., inference_address: _Optional[str] = ..., inventory: _Optional[_Union[Inventory, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_id: _Optional[int] = ..., lease_ttl_seconds: _Optional[int] = ..., agent_version: _Optional[str] = ..., scheduling: _Optional[_Union[Scheduling, str]] = ..., overcommitted: _Optional[str] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("spec", "min_replicas", "max_replicas", "replicas", "idle_timeout", "cpu_offload_model", "created_at", "continue_on_failure")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CPU_OFFLOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    min_replicas: int
    max_replicas: int
    replicas: int
    idle_timeout: _duration_pb2.Duration
    cpu_offload_model: str
    created_at: _timestamp_pb2.Timestamp
    continue_on_failure: bool
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., replicas: _Optional[int] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cpu_offload_model: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., continue_on_failure: _Optional[bool] = ...) -> None: ...

class UndeployedDeployment(_message.Message):
    __slots__ = ("deployment", "undeployed_at")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    UNDEPLOYED_AT_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    undeployed_at: _timestamp_pb2.Timestamp
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., undeployed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("node_id", "model", "device", "gpu_indices", "memory_bytes", "assigned_at")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model: ModelSpec
    device: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    memory_bytes: int
    assigned_at: _timestamp_pb2.Timestamp
    def __init__(self, node_id: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., device: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., memory_bytes: _Optional[int] = ..., assigned_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
