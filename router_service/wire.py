"""Tensor payloads in protobuf messages without protobuf copying them: one copy to send, none to receive.

The messages are the API's (``fleet.proto``); only how their large ``bytes``
field is written and read changes. Through the protobuf library a 16 MB
tensor is copied four times on the way out (``tobytes``, into a ``Tensor``,
into the enclosing message, serialized) and three on the way in (parsed,
read as ``bytes``, made writable); with gRPC moving a 16 MB request and its
reply this cost 125 ms against 45 ms for the same bytes sent raw
(``benchmarks/RESULTS.md``, serving cost).

- :func:`encode` serializes the message with its tensor's ``data`` left
  empty, then appends the data as a second occurrence of the tensor field
  holding only ``data``. The protobuf wire format merges repeated
  occurrences of an embedded message field, so every parser reads the same
  message; the tensor's bytes are copied once, into the joined result.
- :func:`decode` walks the message's top-level fields (and the tensor
  field's own fields), takes the tensor's ``data`` as a view of the received
  bytes, and has protobuf parse everything else (small). Anything it does not
  expect (groups, a malformed field) falls back to protobuf's own parse, which
  accepts or rejects the message as it always has.
"""

from __future__ import annotations

from google.protobuf.message import Message

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_DATA = 1  # Tensor.data


class _Unexpected(Exception):
    """Wire data the fast path does not handle: protobuf parses the message itself."""


def varint(n: int) -> bytes:
    """``n >= 0`` as a protobuf varint."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unexpected("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int):
    """(number, wire type, field start, payload start, field end) of each field in ``buf[pos:end]``."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _Unexpected("field number 0")
        if wire_type == _VARINT:
            _, stop = _read_varint(buf, pos, end)
        elif wire_type == _I64:
            stop = pos + 8
        elif wire_type == _I32:
            stop = pos + 4
        elif wire_type == _LEN:
            n, pos = _read_varint(buf, pos, end)
            stop = pos + n
        else:  # groups (3, 4) and invalid types
            raise _Unexpected(f"wire type {wire_type}")
        if stop > end:
            raise _Unexpected("field runs past the message")
        yield number, wire_type, start, pos, stop
        pos = stop


def encode(msg: Message, field: str, data) -> bytes:
    """``msg`` serialized with ``data`` (a buffer: the tensor's bytes) as the ``data`` of its Tensor field ``field``.

    ``msg.<field>`` carries the tensor's shape and dtype and no data. The
    result is what ``msg.SerializeToString()`` would give with the data set,
    up to field order, which the wire format leaves free.
    """
    head = msg.SerializeToString()
    view = memoryview(data).cast("B")
    if not view.nbytes:
        return head
    number = msg.DESCRIPTOR.fields_by_name[field].number
    inner = _key(_DATA, _LEN) + varint(view.nbytes)
    return b"".join((head, _key(number, _LEN), varint(len(inner) + view.nbytes), inner, view))


def decode(raw: bytes, cls: type[Message], field: str) -> tuple[Message, memoryview | None]:
    """Parse ``raw`` as ``cls``; the ``data`` of its Tensor field ``field`` comes back as a view of ``raw``.

    Returns ``(message, data)``: the message with that tensor's data empty,
    and the data (a zero-copy memoryview of ``raw``), or None when the
    message is parsed by protobuf alone (then the data is in the message).
    Raises ``google.protobuf.message.DecodeError`` for a message protobuf rejects.
    """
    buf = memoryview(raw).cast("B")
    number = cls.DESCRIPTOR.fields_by_name[field].number
    try:
        pieces: list = []  # the message less the tensor's data
        data = None
        done = 0
        for num, wt, start, pos, stop in _fields(buf, 0, len(buf)):
            if num != number:
                continue
            if wt != _LEN:
                raise _Unexpected("tensor field is not length-delimited")
            inner: list = []
            for inum, iwt, istart, ipos, istop in _fields(buf, pos, stop):
                if inum == _DATA:
                    if iwt != _LEN:
                        raise _Unexpected("data is not length-delimited")
                    data = buf[ipos:istop]  # the last occurrence wins, as when parsed
                else:
                    inner.append(buf[istart:istop])
            pieces.append(buf[done:start])
            rest = b"".join(inner)
            pieces.append(_key(number, _LEN) + varint(len(rest)) + rest)
            done = stop
    except _Unexpected:
        return cls.FromString(raw), None
    if not pieces:
        return cls.FromString(raw), None
    pieces.append(buf[done:])
    return cls.FromString(b"".join(pieces)), data
