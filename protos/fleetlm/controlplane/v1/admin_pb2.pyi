from fleetlm.controlplane.v1 import node_pb2 as _node_pb2
from fleetlm.inference.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeployModelRequest(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: _node_pb2.Deployment
    def __init__(self, deployment: _Optional[_Union[_node_pb2.Deployment, _Mapping]] = ...) -> None: ...

class DeployModelResponse(_message.Message):
    __slots__ = ("deployment", "assignments")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    deployment: _node_pb2.Deployment
    assignments: _containers.RepeatedCompositeFieldContainer[_node_pb2.Assignment]
    def __init__(self, deployment: _Optional[_Union[_node_pb2.Deployment, _Mapping]] = ..., assignments: _Optional[_Iterable[_Union[_node_pb2.Assignment, _Mapping]]] = ...) -> None: ...

class UndeployModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UndeployModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeploymentStatus(_message.Message):
    __slots__ = ("deployment", "assignments", "replicas")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    deployment: _node_pb2.Deployment
    assignments: _containers.RepeatedCompositeFieldContainer[_node_pb2.Assignment]
    replicas: _containers.RepeatedCompositeFieldContainer[ModelReplica]
    def __init__(self, deployment: _Optional[_Union[_node_pb2.Deployment, _Mapping]] = ..., assignments: _Optional[_Iterable[_Union[_node_pb2.Assignment, _Mapping]]] = ..., replicas: _Optional[_Iterable[_Union[ModelReplica, _Mapping]]] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[DeploymentStatus]
    def __init__(self, deployments: _Optional[_Iterable[_Union[DeploymentStatus, _Mapping]]] = ...) -> None: ...

class ScaleDeploymentRequest(_message.Message):
    __slots__ = ("name", "replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    replicas: int
    def __init__(self, name: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class ScaleDeploymentResponse(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: _node_pb2.Deployment
    def __init__(self, deployment: _Optional[_Union[_node_pb2.Deployment, _Mapping]] = ...) -> None: ...

class ExplainPlacementRequest(_message.Message):
    __slots__ = ("name", "deployment")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    deployment: _node_pb2.Deployment
    def __init__(self, name: _Optional[str] = ..., deployment: _Optional[_Union[_node_pb2.Deployment, _Mapping]] = ...) -> None: ...

class NodeVerdict(_message.Message):
    __slots__ = ("node_id", "fits", "reason", "score", "device")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    fits: bool
    reason: str
    score: float
    device: str
    def __init__(self, node_id: _Optional[str] = ..., fits: _Optional[bool] = ..., reason: _Optional[str] = ..., score: _Optional[float] = ..., device: _Optional[str] = ...) -> None: ...

class ExplainPlacementResponse(_message.Message):
    __slots__ = ("verdicts", "chosen_node_id")
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[NodeVerdict]
    chosen_node_id: str
    def __init__(self, verdicts: _Optional[_Iterable[_Union[NodeVerdict, _Mapping]]] = ..., chosen_node_id: _Optional[str] = ...) -> None: ...

class CordonNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class CordonNodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UncordonNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class UncordonNodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("replicas_to_move",)
    REPLICAS_TO_MOVE_FIELD_NUMBER: _ClassVar[int]
    replicas_to_move: int
    def __init__(self, replicas_to_move: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_node_pb2.Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[_node_pb2.Node, _Mapping]]] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class GetNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: _node_pb2.Node
    def __init__(self, node: _Optional[_Union[_node_pb2.Node, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelReplica(_message.Message):
    __slots__ = ("node_id", "state", "error")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: _node_pb2.ReplicaState
    error: str
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[_node_pb2.ReplicaState, str]] = ..., error: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("spec", "info", "replicas")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    spec: _node_pb2.ModelSpec
    info: _inference_pb2.ModelInfo
    replicas: _containers.RepeatedCompositeFieldContainer[ModelReplica]
    def __init__(self, spec: _Optional[_Union[_node_pb2.ModelSpec, _Mapping]] = ..., info: _Optional[_Union[_inference_pb2.ModelInfo, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ModelReplica, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class EnsureReplicaRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class EnsureReplicaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLeaderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLeaderResponse(_message.Message):
    __slots__ = ("leader_address", "address", "is_leader", "fencing_revision")
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IS_LEADER_FIELD_NUMBER: _ClassVar[int]
    FENCING_REVISION_FIELD_NUMBER: _ClassVar[int]
    leader_address: str
    address: str
    is_leader: bool
    fencing_revision: int
    def __init__(self, leader_address: _Optional[str] = ..., address: _Optional[str] = ..., is_leader: _Optional[bool] = ..., fencing_revision: _Optional[int] = ...) -> None: ...
