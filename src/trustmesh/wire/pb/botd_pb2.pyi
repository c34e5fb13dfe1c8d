from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Init(_message.Message):
    __slots__ = ("id", "sender_pubkey", "recipient_pubkey", "ephemeral_pubkey", "signature")
    ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    id: str
    sender_pubkey: bytes
    recipient_pubkey: bytes
    ephemeral_pubkey: bytes
    signature: bytes
    def __init__(self, id: _Optional[str] = ..., sender_pubkey: _Optional[bytes] = ..., recipient_pubkey: _Optional[bytes] = ..., ephemeral_pubkey: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("id", "init_id", "ephemeral_pubkey", "signature")
    ID_FIELD_NUMBER: _ClassVar[int]
    INIT_ID_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    id: str
    init_id: str
    ephemeral_pubkey: bytes
    signature: bytes
    def __init__(self, id: _Optional[str] = ..., init_id: _Optional[str] = ..., ephemeral_pubkey: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("id", "ping_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    PING_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    ping_id: str
    def __init__(self, id: _Optional[str] = ..., ping_id: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("init", "ack", "finished", "ping", "pong", "data", "close")
    INIT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    init: Init
    ack: Ack
    finished: Finished
    ping: Ping
    pong: Pong
    data: bytes
    close: Close
    def __init__(self, init: _Optional[_Union[Init, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., data: _Optional[bytes] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...
