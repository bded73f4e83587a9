"""OTLP trace protobuf, written straight from this service's own records: no SDK span objects.

The OpenTelemetry SDK builds a Python ``Span`` per span, then a protobuf message per span, attribute and value at
export: about 70 µs a span here, or half a millisecond for a request with its six stage spans, which cost a
sixth to a quarter of convnet's throughput at 8 connections on a 2-core machine. This service's spans have a fixed
shape (a server span and internal stage spans; string, int, bool and float attributes; an optional error status),
so each span is written as its wire bytes directly, and an export is those bytes framed: a few microseconds a
span.

Field numbers are those of opentelemetry/proto/trace/v1/trace.proto, common.proto and resource.proto; the fields
are written in field order, as protobuf's own serializer does. ``tests/test_otlp_wire.py`` parses what this writes
with the official generated messages and compares it with what the SDK's encoder makes of the same spans.
"""

from __future__ import annotations

import struct

_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack

SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
_STATUS_UNSET = b"\x7a\x00"  # Span.status (15), an empty Status: the SDK always writes one
_STATUS_ERROR = b"\x7a\x02\x18\x02"  # Status.code (3) = STATUS_CODE_ERROR
# Span.flags (16, fixed32): SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, and ..._IS_REMOTE_MASK when the parent is remote
_FLAGS_LOCAL_PARENT = b"\x85\x01" + struct.pack("<I", 0x100)
_FLAGS_REMOTE_PARENT = b"\x85\x01" + struct.pack("<I", 0x300)


def varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = tuple(bytes((value,)) for value in range(0x80))


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: a string, bytes or an embedded message."""
    size = len(payload)
    return varint(number << 3 | 2) + (_SMALL[size] if size < 0x80 else varint(size)) + payload


def any_value(value) -> bytes | None:
    """An AnyValue: string_value (1), bool_value (2), int_value (3) or double_value (4); None for any other
    value (None included), which is dropped, as the SDK drops it."""
    if isinstance(value, str):
        return field(1, value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: negative numbers as two's complement
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    return None


# Encoded KeyValues and names, by what they encode. Most repeat from request to request (route, status, model,
# version); the few that do not (a request ID) empty the cache now and then, which bounds it.
_encoded: dict = {}
_ENCODED_LIMIT = 4096


def _kept(key, encoded: bytes) -> bytes:
    """``encoded``, cached under ``key``."""
    if len(_encoded) >= _ENCODED_LIMIT:
        _encoded.clear()
    _encoded[key] = encoded
    return encoded


def _key_value(key: str, value) -> bytes:
    """A KeyValue message's bytes, or b"" for a value that is dropped."""
    cache_key = (key, value.__class__, value)  # the class: True == 1, and they encode differently
    encoded = _encoded.get(cache_key)
    if encoded is None:
        encoded_value = any_value(value)
        encoded = _kept(cache_key, b"" if encoded_value is None else field(1, key.encode()) + field(2, encoded_value))
    return encoded


def attributes(pairs: dict, number: int = 9) -> bytes:
    """Repeated KeyValue field ``number``: Span.attributes is 9, Resource's is 1 and Event's is 3."""
    return b"".join([field(number, pair) for pair in map(_key_value, pairs, pairs.values()) if pair])


def _name(name: str) -> bytes:
    """Span.name (5)."""
    encoded = _encoded.get(name)
    return _kept(name, field(5, name.encode())) if encoded is None else encoded


def event(time_ns: int, name: str, pairs: dict) -> bytes:
    """A Span.events (11) entry."""
    return field(11, b"\x09" + _FIXED64(time_ns) + field(2, name.encode()) + attributes(pairs, 3))


def span(trace_id: bytes, span_id: bytes, parent_id: bytes | None, trace_state: str, name: str, kind: int,
         start_ns: int, end_ns: int, encoded_attributes: bytes, events: bytes = b"", error: bool = False,
         remote_parent: bool = False) -> bytes:
    """One Span message's bytes. ``encoded_attributes`` and ``events`` are already fields (``attributes``,
    ``event``)."""
    return b"".join((
        b"\x0a\x10", trace_id, b"\x12\x08", span_id,
        field(3, trace_state.encode()) if trace_state else b"",
        b"\x22\x08" + parent_id if parent_id else b"",
        _name(name), b"\x30", _SMALL[kind],
        b"\x39", _FIXED64(start_ns), b"\x41", _FIXED64(end_ns),
        encoded_attributes, events,
        _STATUS_ERROR if error else _STATUS_UNSET,
        _FLAGS_REMOTE_PARENT if remote_parent else _FLAGS_LOCAL_PARENT,
    ))


class Envelope:
    """What every export of a worker shares: its resource and instrumentation scope. ``request(spans)`` is the
    ExportTraceServiceRequest holding those spans."""

    def __init__(self, resource_attributes: dict, scope_name: str, scope_version: str, resource_schema_url: str = ""):
        self._resource = field(1, attributes(resource_attributes, 1))  # ResourceSpans.resource
        self._scope = field(1, field(1, scope_name.encode()) + field(2, scope_version.encode()))  # ScopeSpans.scope
        self._schema = field(3, resource_schema_url.encode()) if resource_schema_url else b""

    def request(self, spans) -> bytes:
        scope_spans = self._scope + b"".join([field(2, span) for span in spans])  # ScopeSpans.spans
        resource_spans = self._resource + field(2, scope_spans) + self._schema
        return field(1, resource_spans)  # ExportTraceServiceRequest.resource_spans
