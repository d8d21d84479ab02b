import datetime

from fleetlm.inference.v1 import inference_pb2 as _inference_pb2
from google.protobuf import duration_pb2 as _duration_pb2
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
