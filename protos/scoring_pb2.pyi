from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_APPROVE: _ClassVar[Decision]
    DECISION_REVIEW: _ClassVar[Decision]
    DECISION_DECLINE: _ClassVar[Decision]

class Label(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_UNSPECIFIED: _ClassVar[Label]
    LABEL_LEGITIMATE: _ClassVar[Label]
    LABEL_FRAUD: _ClassVar[Label]
DECISION_UNSPECIFIED: Decision
DECISION_APPROVE: Decision
DECISION_REVIEW: Decision
DECISION_DECLINE: Decision
LABEL_UNSPECIFIED: Label
LABEL_LEGITIMATE: Label
LABEL_FRAUD: Label

class Transaction(_message.Message):
    __slots__ = ("transaction_id", "card_id", "merchant_id", "mcc", "amount", "currency", "country", "card_country", "channel", "event_time_ms")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    MCC_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    CARD_COUNTRY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    card_id: str
    merchant_id: str
    mcc: int
    amount: float
    currency: str
    country: str
    card_country: str
    channel: str
    event_time_ms: int
    def __init__(self, transaction_id: _Optional[str] = ..., card_id: _Optional[str] = ..., merchant_id: _Optional[str] = ..., mcc: _Optional[int] = ..., amount: _Optional[float] = ..., currency: _Optional[str] = ..., country: _Optional[str] = ..., card_country: _Optional[str] = ..., channel: _Optional[str] = ..., event_time_ms: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("transaction", "model_name", "model_version", "request_id", "top_reasons")
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_REASONS_FIELD_NUMBER: _ClassVar[int]
    transaction: Transaction
    model_name: str
    model_version: str
    request_id: str
    top_reasons: int
    def __init__(self, transaction: _Optional[_Union[Transaction, _Mapping]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., top_reasons: _Optional[int] = ...) -> None: ...

class ReasonCode(_message.Message):
    __slots__ = ("feature", "contribution", "value")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    feature: str
    contribution: float
    value: float
    def __init__(self, feature: _Optional[str] = ..., contribution: _Optional[float] = ..., value: _Optional[float] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "transaction_id", "probability", "decision", "model_name", "model_version", "reasons", "error", "flags")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transaction_id: str
    probability: float
    decision: Decision
    model_name: str
    model_version: str
    reasons: _containers.RepeatedCompositeFieldContainer[ReasonCode]
    error: ItemError
    flags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., transaction_id: _Optional[str] = ..., probability: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., reasons: _Optional[_Iterable[_Union[ReasonCode, _Mapping]]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ..., flags: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("transactions", "model_name", "model_version", "request_id", "top_reasons")
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_REASONS_FIELD_NUMBER: _ClassVar[int]
    transactions: _containers.RepeatedCompositeFieldContainer[Transaction]
    model_name: str
    model_version: str
    request_id: str
    top_reasons: int
    def __init__(self, transactions: _Optional[_Iterable[_Union[Transaction, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., top_reasons: _Optional[int] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("request_id", "model_name", "model_version", "results")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_name: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[ScoreResponse]
    def __init__(self, request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ScoreResponse, _Mapping]]] = ...) -> None: ...

class LabelledOutcome(_message.Message):
    __slots__ = ("request_id", "transaction_id", "label", "labelled_at_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABELLED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transaction_id: str
    label: Label
    labelled_at_ms: int
    def __init__(self, request_id: _Optional[str] = ..., transaction_id: _Optional[str] = ..., label: _Optional[_Union[Label, str]] = ..., labelled_at_ms: _Optional[int] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[LabelledOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[LabelledOutcome, _Mapping]]] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...
