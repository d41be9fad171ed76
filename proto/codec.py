"""The one codec for every Diptych message: a msgpack header frame, then raw payload frames.

Wire layout of one message (a ZeroMQ multipart message, after any ROUTER identity frames):

    frame 0   msgpack map {"v": PROTOCOL_VERSION, "t": <message type tag>, "b": <body map>}
    frame 1.. raw bytes of the message's payload buffers (e.g. KV blocks), in order, never msgpack-encoded

Only fields declared with ``payload_field()`` travel as raw frames; the header records how many there are, so a
receiver can take them zero-copy (``memoryview`` over the received frame, then ``torch.frombuffer``).

Invariants:
- every message type is a dataclass registered with ``@message("tag")`` (which applies ``@dataclass``); tags
  are unique;
- ``decode(encode(m)) == m`` for every registered message (payload frames come back as ``memoryview``/``bytes``);
- ``decode`` raises ``ProtocolError`` (never anything else) for malformed, unknown or wrong-version input, so a
  service can reply with an error or drop the message and keep serving.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, TypeVar

import msgpack

PROTOCOL_VERSION = 1

_REGISTRY: dict[str, type] = {}
_TAGS: dict[type, str] = {}

T = TypeVar("T")


class ProtocolError(ValueError):
    """A frame could not be decoded: malformed msgpack, unknown type, bad fields or a protocol version mismatch."""


class ProtocolVersionError(ProtocolError):
    """The peer speaks another protocol version."""


def message(tag: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass as a wire message under ``tag``."""

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(cls)
        if tag in _REGISTRY:
            raise ValueError(f"duplicate message tag {tag!r}")
        _REGISTRY[tag] = cls
        _TAGS[cls] = tag
        return cls

    return register


def payload_field(**kwargs: Any) -> Any:
    """A dataclass field whose value (a list of buffers) travels as raw frames after the header."""
    return dataclasses.field(default_factory=list, metadata={"payload": True}, **kwargs)


def tag_of(msg: Any) -> str:
    return _TAGS[type(msg)]


def encode(msg: Any) -> list[Any]:
    """Encode a registered message into frames: [header, *payload buffers]."""
    cls = type(msg)
    if cls not in _TAGS:
        raise TypeError(f"{cls.__name__} is not a registered message")
    body: dict[str, Any] = {}
    frames: list[Any] = []
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.metadata.get("payload"):
            body[f.name] = len(value)
            frames.extend(value)
        else:
            body[f.name] = _to_wire(value)
    header = msgpack.packb({"v": PROTOCOL_VERSION, "t": _TAGS[cls], "b": body}, use_bin_type=True)
    return [header, *frames]


def decode(frames: list[Any]) -> Any:
    """Decode frames produced by ``encode``. Raises ``ProtocolError`` on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict) or not {"v", "t", "b"} <= header.keys():
        raise ProtocolError("header must be a map with keys v, t, b")
    if header["v"] != PROTOCOL_VERSION:
        raise ProtocolVersionError(f"protocol version {header['v']!r} != {PROTOCOL_VERSION}")
    cls = _REGISTRY.get(header["t"]) if isinstance(header["t"], str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {header['t']!r}")
    body = header["b"]
    if not isinstance(body, dict):
        raise ProtocolError("body must be a map")
    payload = list(frames[1:])
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{header['t']}: missing field {f.name!r}")
            continue
        if f.metadata.get("payload"):
            count = body[f.name]
            if not isinstance(count, int) or count < 0 or count > len(payload):
                raise ProtocolError(f"{header['t']}: payload count {count!r} does not match frames")
            kwargs[f.name], payload = payload[:count], payload[count:]
        else:
            kwargs[f.name] = _from_wire(body[f.name], hints[f.name], f"{header['t']}.{f.name}")
    if payload:
        raise ProtocolError(f"{header['t']}: {len(payload)} unexpected extra frames")
    return cls(**kwargs)


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the field's type hint and rebuild nested dataclasses."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_wire(value, arg, where)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(f"{where}: {value!r} matches none of {args}")
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        return [_from_wire(v, args[0], where) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_from_wire(k, kt, where): _from_wire(v, vt, where) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a {hint.__name__} map")
        sub_hints = typing.get_type_hints(hint)
        known = {f.name for f in dataclasses.fields(hint)}
        try:
            return hint(**{k: _from_wire(v, sub_hints[k], f"{where}.{k}") for k, v in value.items() if k in known})
        except TypeError as exc:
            raise ProtocolError(f"{where}: {exc}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where}: expected an integer, got {type(value).__name__}")
        return value
    if hint in (str, bool, bytes):
        if not isinstance(value, hint):
            raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    return value
