import datetime

from fleetlm.controlplane.v1 import node_pb2 as _node_pb2
from fleetlm.inference.v1 import inference_pb2 as _inference_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinTokenState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOIN_TOKEN_STATE_UNSPECIFIED: _ClassVar[JoinTokenState]
    JOIN_TOKEN_STATE_VALID: _ClassVar[JoinTokenState]
    JOIN_TOKEN_STATE_EXPIRED: _ClassVar[JoinTokenState]
    JOIN_TOKEN_STATE_REVOKED: _ClassVar[JoinTokenState]
JOIN_TOKEN_STATE_UNSPECIFIED: JoinTokenState
JOIN_TOKEN_STATE_VALID: JoinTokenState
JOIN_TOKEN_STATE_EXPIRED: JoinTokenState
JOIN_TOKEN_STATE_REVOKED: JoinTokenState

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

class ApiKeyLimits(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent_requests: int
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., max_concurrent_requests: _Optional[int] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "name", "models", "expires_at", "limits", "revoked", "prefix", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    models: _containers.RepeatedScalarFieldContainer[str]
    expires_at: _timestamp_pb2.Timestamp
    limits: ApiKeyLimits
    revoked: bool
    prefix: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limits: _Optional[_Union[ApiKeyLimits, _Mapping]] = ..., revoked: _Optional[bool] = ..., prefix: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("name", "models", "expires_at", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    models: _containers.RepeatedScalarFieldContainer[str]
    expires_at: _timestamp_pb2.Timestamp
    limits: ApiKeyLimits
    def __init__(self, name: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limits: _Optional[_Union[ApiKeyLimits, _Mapping]] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class WatchApiKeysRequest(_message.Message):
    __slots__ = ("edge_id",)
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    def __init__(self, edge_id: _Optional[str] = ...) -> None: ...

class ApiKeyRecord(_message.Message):
    __slots__ = ("key", "hash")
    KEY_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    hash: bytes
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., hash: _Optional[bytes] = ...) -> None: ...

class WatchApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKeyRecord]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKeyRecord, _Mapping]]] = ...) -> None: ...

class AcquireQuotaRequest(_message.Message):
    __slots__ = ("edge_id", "key_id", "requests", "tokens_used", "in_flight", "requests_returned")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RETURNED_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    key_id: str
    requests: int
    tokens_used: int
    in_flight: int
    requests_returned: int
    def __init__(self, edge_id: _Optional[str] = ..., key_id: _Optional[str] = ..., requests: _Optional[int] = ..., tokens_used: _Optional[int] = ..., in_flight: _Optional[int] = ..., requests_returned: _Optional[int] = ...) -> None: ...

class AcquireQuotaResponse(_message.Message):
    __slots__ = ("requests_granted", "requests_remaining", "tokens_remaining", "reset_seconds", "others_in_flight", "edges")
    REQUESTS_GRANTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OTHERS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    requests_granted: int
    requests_remaining: int
    tokens_remaining: int
    reset_seconds: float
    others_in_flight: int
    edges: int
    def __init__(self, requests_granted: _Optional[int] = ..., requests_remaining: _Optional[int] = ..., tokens_remaining: _Optional[int] = ..., reset_seconds: _Optional[float] = ..., others_in_flight: _Optional[int] = ..., edges: _Optional[int] = ...) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("ttl", "description")
    TTL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ttl: _duration_pb2.Duration
    description: str
    def __init__(self, ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., description: _Optional[str] = ...) -> None: ...

class JoinToken(_message.Message):
    __slots__ = ("id", "state", "created_at", "expires_at", "description")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JoinTokenState
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    description: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JoinTokenState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., description: _Optional[str] = ...) -> None: ...

class CreateJoinTokenResponse(_message.Message):
    __slots__ = ("token", "join_token", "ca_fingerprint")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    token: str
    join_token: JoinToken
    ca_fingerprint: str
    def __init__(self, token: _Optional[str] = ..., join_token: _Optional[_Union[JoinToken, _Mapping]] = ..., ca_fingerprint: _Optional[str] = ...) -> None: ...

class ListJoinTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJoinTokensResponse(_message.Message):
    __slots__ = ("join_tokens",)
    JOIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    join_tokens: _containers.RepeatedCompositeFieldContainer[JoinToken]
    def __init__(self, join_tokens: _Optional[_Iterable[_Union[JoinToken, _Mapping]]] = ...) -> None: ...

class RevokeJoinTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeJoinTokenResponse(_message.Message):
    __slots__ = ("join_token",)
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    join_token: JoinToken
    def __init__(self, join_token: _Optional[_Union[JoinToken, _Mapping]] = ...) -> None: ...
