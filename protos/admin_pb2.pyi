from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelVersionInfo(_message.Message):
    __slots__ = ("name", "version", "state", "traffic_percent", "risk_category", "owner", "metrics", "loaded_in_workers", "load_error")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RISK_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LOADED_IN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: str
    traffic_percent: float
    risk_category: str
    owner: str
    metrics: _containers.ScalarMap[str, float]
    loaded_in_workers: _containers.RepeatedScalarFieldContainer[int]
    load_error: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., traffic_percent: _Optional[float] = ..., risk_category: _Optional[str] = ..., owner: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., loaded_in_workers: _Optional[_Iterable[int]] = ..., load_error: _Optional[str] = ...) -> None: ...

class TrafficState(_message.Message):
    __slots__ = ("name", "primary", "previous", "canary", "canary_weight", "steps", "step_interval_s", "generation", "halted_reason", "loaded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    HALTED_REASON_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    name: str
    primary: str
    previous: _containers.RepeatedScalarFieldContainer[str]
    canary: str
    canary_weight: float
    steps: _containers.RepeatedScalarFieldContainer[float]
    step_interval_s: float
    generation: int
    halted_reason: str
    loaded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., primary: _Optional[str] = ..., previous: _Optional[_Iterable[str]] = ..., canary: _Optional[str] = ..., canary_weight: _Optional[float] = ..., steps: _Optional[_Iterable[float]] = ..., step_interval_s: _Optional[float] = ..., generation: _Optional[int] = ..., halted_reason: _Optional[str] = ..., loaded: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("versions", "traffic")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionInfo]
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficState]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersionInfo, _Mapping]]] = ..., traffic: _Optional[_Iterable[_Union[TrafficState, _Mapping]]] = ...) -> None: ...

class ModelVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("name", "version", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class CanaryRequest(_message.Message):
    __slots__ = ("name", "version", "weight_percent", "steps", "step_interval_s", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    weight_percent: float
    steps: _containers.RepeatedScalarFieldContainer[float]
    step_interval_s: float
    force: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., weight_percent: _Optional[float] = ..., steps: _Optional[_Iterable[float]] = ..., step_interval_s: _Optional[float] = ..., force: _Optional[bool] = ...) -> None: ...

class ModelsChange(_message.Message):
    __slots__ = ("traffic", "message")
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    traffic: TrafficState
    message: str
    def __init__(self, traffic: _Optional[_Union[TrafficState, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class GetShadowRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShadowConfig(_message.Message):
    __slots__ = ("enabled", "primary", "model", "version", "endpoint", "rate_percent", "filter", "timeout_s", "endpoint_input", "generation")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RATE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_INPUT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    primary: str
    model: str
    version: str
    endpoint: str
    rate_percent: float
    filter: str
    timeout_s: float
    endpoint_input: str
    generation: int
    def __init__(self, enabled: _Optional[bool] = ..., primary: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., endpoint: _Optional[str] = ..., rate_percent: _Optional[float] = ..., filter: _Optional[str] = ..., timeout_s: _Optional[float] = ..., endpoint_input: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class ShadowStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlipCount(_message.Message):
    __slots__ = ("from_decision", "to_decision", "count")
    FROM_DECISION_FIELD_NUMBER: _ClassVar[int]
    TO_DECISION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    from_decision: str
    to_decision: str
    count: int
    def __init__(self, from_decision: _Optional[str] = ..., to_decision: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class ShadowPairStatus(_message.Message):
    __slots__ = ("primary_model", "primary_version", "shadow_model", "shadow_version", "mirrored", "dropped", "failed", "scored", "agreement_rate", "flips", "mean_abs_delta", "max_abs_delta", "correlation", "psi")
    PRIMARY_MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_MODEL_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_RATE_FIELD_NUMBER: _ClassVar[int]
    FLIPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_DELTA_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DELTA_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    primary_model: str
    primary_version: str
    shadow_model: str
    shadow_version: str
    mirrored: int
    dropped: int
    failed: int
    scored: int
    agreement_rate: float
    flips: _containers.RepeatedCompositeFieldContainer[FlipCount]
    mean_abs_delta: float
    max_abs_delta: float
    correlation: float
    psi: float
    def __init__(self, primary_model: _Optional[str] = ..., primary_version: _Optional[str] = ..., shadow_model: _Optional[str] = ..., shadow_version: _Optional[str] = ..., mirrored: _Optional[int] = ..., dropped: _Optional[int] = ..., failed: _Optional[int] = ..., scored: _Optional[int] = ..., agreement_rate: _Optional[float] = ..., flips: _Optional[_Iterable[_Union[FlipCount, _Mapping]]] = ..., mean_abs_delta: _Optional[float] = ..., max_abs_delta: _Optional[float] = ..., correlation: _Optional[float] = ..., psi: _Optional[float] = ...) -> None: ...

class WorkerShadowStatus(_message.Message):
    __slots__ = ("worker", "pid", "generation", "active", "target_error", "queued", "records_written")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TARGET_ERROR_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    worker: int
    pid: int
    generation: int
    active: bool
    target_error: str
    queued: int
    records_written: int
    def __init__(self, worker: _Optional[int] = ..., pid: _Optional[int] = ..., generation: _Optional[int] = ..., active: _Optional[bool] = ..., target_error: _Optional[str] = ..., queued: _Optional[int] = ..., records_written: _Optional[int] = ...) -> None: ...

class ShadowStatusResponse(_message.Message):
    __slots__ = ("config", "pairs", "workers", "records_dir")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_DIR_FIELD_NUMBER: _ClassVar[int]
    config: ShadowConfig
    pairs: _containers.RepeatedCompositeFieldContainer[ShadowPairStatus]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerShadowStatus]
    records_dir: str
    def __init__(self, config: _Optional[_Union[ShadowConfig, _Mapping]] = ..., pairs: _Optional[_Iterable[_Union[ShadowPairStatus, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerShadowStatus, _Mapping]]] = ..., records_dir: _Optional[str] = ...) -> None: ...

class DriftStatusRequest(_message.Message):
    __slots__ = ("model", "window")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    window: str
    def __init__(self, model: _Optional[str] = ..., window: _Optional[str] = ...) -> None: ...

class DriftValue(_message.Message):
    __slots__ = ("model", "version", "window", "column", "measure", "value", "count", "threshold", "alerting")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    MEASURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ALERTING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    window: str
    column: str
    measure: str
    value: float
    count: int
    threshold: float
    alerting: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., window: _Optional[str] = ..., column: _Optional[str] = ..., measure: _Optional[str] = ..., value: _Optional[float] = ..., count: _Optional[int] = ..., threshold: _Optional[float] = ..., alerting: _Optional[bool] = ...) -> None: ...

class FiringAlert(_message.Message):
    __slots__ = ("id", "rule", "severity", "model", "version", "window", "column", "measure", "value", "threshold", "started_at", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    MEASURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    rule: str
    severity: str
    model: str
    version: str
    window: str
    column: str
    measure: str
    value: float
    threshold: float
    started_at: float
    message: str
    def __init__(self, id: _Optional[str] = ..., rule: _Optional[str] = ..., severity: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., window: _Optional[str] = ..., column: _Optional[str] = ..., measure: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., started_at: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class DriftStatusResponse(_message.Message):
    __slots__ = ("values", "alerts", "evaluated_at", "validation")
    class ValidationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_AT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[DriftValue]
    alerts: _containers.RepeatedCompositeFieldContainer[FiringAlert]
    evaluated_at: float
    validation: _containers.ScalarMap[str, int]
    def __init__(self, values: _Optional[_Iterable[_Union[DriftValue, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[FiringAlert, _Mapping]]] = ..., evaluated_at: _Optional[float] = ..., validation: _Optional[_Mapping[str, int]] = ...) -> None: ...
