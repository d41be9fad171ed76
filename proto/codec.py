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
- ``decode`` raises ``ProtocolError`` (never anything else) for malformed, unknown or wrong-version input, and for
  values outside the ranges their receivers rely on (``proto.validation``, registered per type with
  ``register_check``; every string at most ``MAX_TEXT_CHARS`` and every list at most ``MAX_LIST_ITEMS`` long), so a
  service can reply with an error or drop the message and keep serving.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:
    from typing_extensions import dataclass_transform

PROTOCOL_VERSION = 2

MAX_TEXT_CHARS = 16 << 20
"""Longest string any field may hold (a prompt text); ``proto.validation`` sets tighter limits per field."""
MAX_LIST_ITEMS = 1 << 22
"""Longest list any field may hold; ``proto.validation`` sets tighter limits per field."""

_REGISTRY: dict[str, type] = {}
_TAGS: dict[type, str] = {}
_CHECKS: dict[type, Callable[[Any], None]] = {}

T = TypeVar("T")


class ProtocolError(ValueError):
    """A frame could not be decoded: malformed msgpack, unknown type, bad fields or a protocol version mismatch."""


class ProtocolVersionError(ProtocolError):
    """The peer speaks another protocol version."""


@dataclass_transform(field_specifiers=(dataclasses.field,))
def message(tag: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass as a wire message under ``tag`` (applying ``@dataclass`` if needed).

    Declared a dataclass transform (PEP 681), so type checkers know each message's constructor and its keywords.
    """

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(cls)
        if tag in _REGISTRY:
            raise ValueError(f"duplicate message tag {tag!r}")
        _REGISTRY[tag] = cls
        _TAGS[cls] = tag
        return cls

    return register


def register_check(cls: type, check: Callable[[Any], None]) -> None:
    """Run ``check(msg)`` on every decoded ``cls`` message; it raises ``ProtocolError`` for out-of-range values."""
    _CHECKS[cls] = check


def payload_field(**kwargs: Any) -> Any:
    """A dataclass field whose value (a list of buffers) travels as raw frames after the header; defaults to ``[]``.

    Deliberately not one of ``message``'s field specifiers: type checkers then read ``= payload_field()`` as a
    default value, which it is (an empty list per instance).
    """
    return dataclasses.field(default_factory=list, metadata={"payload": True}, **kwargs)


def tag_of(msg: Any) -> str:
    return _TAGS[type(msg)]


def encode(msg: Any) -> list[Any]:
    """Encode a registered message into frames: [header, *payload buffers]."""
    cls: type = type(msg)
    if cls not in _TAGS:
        raise TypeError(f"{cls.__name__} is not a registered message")
    body: dict[str, Any] = {}
    frames: list[Any] = []
    for name, is_payload in _fields(cls):
        value = getattr(msg, name)
        if is_payload:
            body[name] = len(value)
            frames.extend(value)
        else:
            body[name] = value
    header = msgpack.packb({"v": PROTOCOL_VERSION, "t": _TAGS[cls], "b": body}, use_bin_type=True,
                           default=_dataclass_to_map)
    return [header, *frames]


def decode(frames: list[Any]) -> Any:
    """Decode frames produced by ``encode``. Raises ``ProtocolError`` on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 (msgpack raises several unrelated exception types)
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
    for name, required, convert in _body_fields(cls):
        if name not in body:
            if required:
                raise ProtocolError(f"{header['t']}: missing field {name!r}")
            continue
        if convert is None:  # a payload field: its value is the number of frames it takes
            count = body[name]
            if not isinstance(count, int) or count < 0 or count > len(payload):
                raise ProtocolError(f"{header['t']}: payload count {count!r} does not match frames")
            kwargs[name], payload = payload[:count], payload[count:]
        else:
            kwargs[name] = convert(body[name], f"{header['t']}.{name}")
    if payload:
        raise ProtocolError(f"{header['t']}: {len(payload)} unexpected extra frames")
    msg = cls(**kwargs)
    check = _CHECKS.get(cls)
    if check is not None:
        try:
            check(msg)
        except ProtocolError as exc:
            raise ProtocolError(f"{header['t']}: {exc}") from None
        except (TypeError, ValueError, OverflowError) as exc:  # a value no check foresaw: still the peer's fault
            raise ProtocolError(f"{header['t']}: {exc}") from None
    return msg


# Hot path: every token batch, request and handoff goes through these. Per-class field lists and per-type-hint
# converters are built once (``functools.cache``); msgpack's C packer walks lists and maps itself and calls back only
# for nested dataclasses.


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, bool], ...]:
    return tuple((f.name, bool(f.metadata.get("payload"))) for f in dataclasses.fields(cls))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _body_fields(cls: type) -> tuple[tuple[str, bool, Converter | None], ...]:
    """Per field of a message: name, whether it is required, its converter (None for a payload field)."""
    return tuple((f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                  None if f.metadata.get("payload") else _converter(_hints(cls)[f.name]))
                 for f in dataclasses.fields(cls))


def _dataclass_to_map(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: getattr(value, name) for name, _ in _fields(type(value))}
    raise TypeError(f"cannot encode {type(value).__name__}")


Converter = Callable[[Any, str], Any]
"""``convert(value, where)``: ``value`` checked against a type hint (nested dataclasses rebuilt); ``where`` names the
field in error messages."""


@functools.cache
def _converter(hint: Any) -> Converter:
    """The converter for one type hint (built once per hint)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        return _union(args)
    if origin is list:
        return _list(args[0] if args else Any)
    if origin is dict:
        return _dict(*(args if args else (Any, Any)))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass(hint)
    if hint is float:
        return _float
    if hint is int:
        return _int
    if hint is str:
        return _str
    if hint in (bool, bytes):
        return _exact(hint)
    return lambda value, where: value


def _union(args: tuple) -> Converter:
    nullable = type(None) in args
    options = [_converter(arg) for arg in args if arg is not type(None)]

    def convert(value: Any, where: str) -> Any:
        if value is None and nullable:
            return None
        for option in options:
            try:
                return option(value, where)
            except ProtocolError:
                pass
        raise ProtocolError(f"{where}: {value!r} matches none of {args}")

    return convert


def _list(item_hint: Any) -> Converter:
    if item_hint is int:  # token ids, block ids: one pass, no call per element
        def convert_ints(value: Any, where: str) -> Any:
            if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
                raise ProtocolError(f"{where}: expected a list of at most {MAX_LIST_ITEMS} items")
            for v in value:
                if type(v) is not int:
                    return [_int(v, where) for v in value]  # raises with the offending value
            return value

        return convert_ints
    item = _converter(item_hint)
    check_items = item_hint is not Any

    def convert(value: Any, where: str) -> Any:
        if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
            raise ProtocolError(f"{where}: expected a list of at most {MAX_LIST_ITEMS} items")
        return [item(v, where) for v in value] if check_items else value

    return convert


def _dict(key_hint: Any, value_hint: Any) -> Converter:
    key, item = _converter(key_hint), _converter(value_hint)

    def convert(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        return {key(k, where): item(v, where) for k, v in value.items()}

    return convert


def _dataclass(cls: type) -> Converter:
    hints = _hints(cls)
    fields = {name: (_converter(hints[name]), "." + name) for name, _ in _fields(cls)}

    def convert(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a {cls.__name__} map")
        try:
            return cls(**{k: fields[k][0](v, where + fields[k][1]) for k, v in value.items() if k in fields})
        except TypeError as exc:
            raise ProtocolError(f"{where}: {exc}") from None

    return convert


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
    return float(value)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where}: expected an integer, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: expected str, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise ProtocolError(f"{where}: {len(value)} characters, more than {MAX_TEXT_CHARS}")
    return value


def _exact(hint: type) -> Converter:
    def convert(value: Any, where: str) -> Any:
        if not isinstance(value, hint):
            raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value

    return convert
