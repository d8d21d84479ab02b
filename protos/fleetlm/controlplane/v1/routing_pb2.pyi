import datetime

from fleetlm.controlplane.v1 import node_pb2 as _node_pb2
from fleetlm.inference.v1 import inference_pb2 as _inference_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PickReplicaRequest(_message.Message):
    __slots__ = ("model", "user", "prefix_hash", "wait_for_ready")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HASH_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_READY_FIELD_NUMBER: _ClassVar[int]
    model: str
    user: str
    prefix_hash: str
    wait_for_ready: _duration_pb2.Duration
    def __init__(self, model: _Optional[str] = ..., user: _Optional[str] = ..., prefix_hash: _Optional[str] = ..., wait_for_ready: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReplicaEndpoint(_message.Message):
    __slots__ = ("node_id", "inference_address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    inference_address: str
    def __init__(self, node_id: _Optional[str] = ..., inference_address: _Optional[str] = ...) -> None: ...

class PickReplicaResponse(_message.Message):
    __slots__ = ("node_id", "inference_address", "alternates", "cpu_offload_model", "device")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ALTERNATES_FIELD_NUMBER: _ClassVar[int]
    CPU_OFFLOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    inference_address: str
    alternates: _containers.RepeatedCompositeFieldContainer[ReplicaEndpoint]
    cpu_offload_model: str
    device: str
    def __init__(self, node_id: _Optional[str] = ..., inference_address: _Optional[str] = ..., alternates: _Optional[_Iterable[_Union[ReplicaEndpoint, _Mapping]]] = ..., cpu_offload_model: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ListServedModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServedModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_inference_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_inference_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...

class WatchRoutesRequest(_message.Message):
    __slots__ = ("edge_id",)
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    def __init__(self, edge_id: _Optional[str] = ...) -> None: ...

class ReplicaRoute(_message.Message):
    __slots__ = ("model", "state", "error", "device", "running_requests", "queued_requests", "capacity", "load_progress")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    model: str
    state: _node_pb2.ReplicaState
    error: str
    device: str
    running_requests: int
    queued_requests: int
    capacity: int
    load_progress: float
    def __init__(self, model: _Optional[str] = ..., state: _Optional[_Union[_node_pb2.ReplicaState, str]] = ..., error: _Optional[str] = ..., device: _Optional[str] = ..., running_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., capacity: _Optional[int] = ..., load_progress: _Optional[float] = ...) -> None: ...

class NodeRoutes(_message.Message):
    __slots__ = ("node_id", "inference_address", "draining", "replicas")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    inference_address: str
    draining: bool
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaRoute]
    def __init__(self, node_id: _Optional[str] = ..., inference_address: _Optional[str] = ..., draining: _Optional[bool] = ..., replicas: _Optional[_Iterable[_Union[ReplicaRoute, _Mapping]]] = ...) -> None: ...

class ModelRoute(_message.Message):
    __slots__ = ("info", "deployed", "cpu_offload_model", "continue_on_failure")
    INFO_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_FIELD_NUMBER: _ClassVar[int]
    CPU_OFFLOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    info: _inference_pb2.ModelInfo
    deployed: bool
    cpu_offload_model: str
    continue_on_failure: bool
    def __init__(self, info: _Optional[_Union[_inference_pb2.ModelInfo, _Mapping]] = ..., deployed: _Optional[bool] = ..., cpu_offload_model: _Optional[str] = ..., continue_on_failure: _Optional[bool] = ...) -> None: ...

class WatchRoutesResponse(_message.Message):
    __slots__ = ("snapshot", "nodes", "removed_node_ids", "models", "removed_models", "published_at")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    snapshot: bool
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRoutes]
    removed_node_ids: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedCompositeFieldContainer[ModelRoute]
    removed_models: _containers.RepeatedScalarFieldContainer[str]
    published_at: _timestamp_pb2.Timestamp
    def __init__(self, snapshot: _Optional[bool] = ..., nodes: _Optional[_Iterable[_Union[NodeRoutes, _Mapping]]] = ..., removed_node_ids: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[_Union[ModelRoute, _Mapping]]] = ..., removed_models: _Optional[_Iterable[str]] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
