"""Stand-ins for the modules componentize-py generates, so `app.py` can be
tested with plain Python: `python3 -m unittest`, no build, no Kafka.

`app.py` imports `wit_world`, `wit_world.imports.host`,
`wit_world.imports.types` and `componentize_py_types`, which only exist
inside a componentize-py build. Importing this module puts look-alikes into
`sys.modules` (import it before `app`): the WIT records as dataclasses with
the same snake_case field names, `Err` as an exception carrying `.value`,
and a `host` whose `config` answers from the `config` dict below and whose
`log` appends to `logged`.
"""

import sys
from dataclasses import dataclass, field
from enum import Enum
from types import ModuleType
from typing import Dict, List, Optional, Tuple, Union


# componentize_py_types


class Err(Exception):
    """What a handler raises to return the `err` of its result."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value


# wit_world.imports.types (the `types` interface of wit/plugin.wit)


@dataclass
class Header:
    key: str
    value: bytes


@dataclass
class Event:
    id: str
    event_type: str
    schema_version: str
    key: Optional[bytes]
    payload: bytes
    content_type: str
    headers: List[Header]
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    correlation_id: str
    causation_id: Optional[str]
    attempt: int


@dataclass
class Output:
    topic: str
    key: Optional[bytes]
    event_type: str
    schema_version: str
    content_type: str
    payload: bytes
    headers: List[Header]


@dataclass
class HandlerError_Retriable:
    value: str


@dataclass
class HandlerError_Fatal:
    value: str


HandlerError = Union[HandlerError_Retriable, HandlerError_Fatal]


# wit_world.imports.host (the `host` interface)


class Level(Enum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4


config: Dict[str, str] = {}
"""What `host.config` answers: the handler's `[handler.config]` table."""

logged: List[Tuple[Level, str]] = []
"""Every `host.log(level, message)` call, in order."""


def _config(key: str) -> Optional[str]:
    return config.get(key)


def _log(level: Level, message: str) -> None:
    logged.append((level, message))


def reset(**settings: str) -> None:
    """Sets the config to `settings` and forgets what was logged."""
    config.clear()
    config.update(settings)
    logged.clear()


# Building events


def event(
    payload: Union[bytes, str] = b"{}",
    *,
    event_type: str = "greeting.sent",
    content_type: str = "application/json",
    key: Optional[bytes] = None,
    topic: str = "greetings",
    attempt: int = 1,
    id: str = "e-1",
    headers: Optional[List[Header]] = None,
) -> Event:
    """An event as the runtime passes it; a `str` payload is UTF-8 encoded.
    An empty `event_type` makes a raw (unenveloped) event."""
    return Event(
        id=id,
        event_type=event_type,
        schema_version="1" if event_type else "",
        key=key,
        payload=payload.encode() if isinstance(payload, str) else payload,
        content_type=content_type,
        headers=headers or [],
        topic=topic,
        partition=0,
        offset=0,
        timestamp_ms=0,
        correlation_id="c-1",
        causation_id=None,
        attempt=attempt,
    )


# Installing the stand-ins


def _module(name: str, **attributes) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class _WitWorld:
    """The base class of the handler (a Protocol in the generated code)."""


_module("componentize_py_types", Err=Err)
_types = _module(
    "wit_world.imports.types",
    Header=Header,
    Event=Event,
    Output=Output,
    HandlerError_Retriable=HandlerError_Retriable,
    HandlerError_Fatal=HandlerError_Fatal,
    HandlerError=HandlerError,
)
_host = _module("wit_world.imports.host", Level=Level, config=_config, log=_log)
_imports = _module("wit_world.imports", types=_types, host=_host, __path__=[])
_module("wit_world", WitWorld=_WitWorld, imports=_imports, __path__=[])
