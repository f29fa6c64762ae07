"""FastCGI 1.0, sans-I/O (in the manner of h11).

Nothing here touches a socket, a thread or the log. The server feeds the bytes
it read to :meth:`Connection.receive` and gets back events:

- :class:`Request`: a complete request (params and body), ready to run;
- :class:`Abort`: the web server gave up on a request. One still being read is
  dropped and the server ends it with :func:`end_request`; one already handed
  out ends with its own answer (``handed_out`` tells which);
- :class:`Reply`: bytes to send back as they are (answers to management
  records and refusals of requests we do not take).

Malformed input raises :class:`ProtocolError`; the server then closes that connection
(the Connection is not usable after it). A well-formed request whose PARAMS are over
``max_params`` bytes is still read to its end, its PARAMS dropped as they come (never
held), and handed out with ``params_overflow`` set, for the server to answer 431. The
answer to a request is built with :func:`stdout_records` and :func:`end_request`.

An empty DATA record for the request being read or the last one handed out is
ignored (flup's FCGIApp ends every request with one, as a FILTER client would).

We do not multiplex: one request at a time is read per connection, and a
BEGIN_REQUEST for another id while one is being read is refused with
CANT_MPX_CONN. Records of a refused request are ignored, as the spec asks.
Once a :class:`Request` is out its id is free again on the input side, so a
kept-alive connection may begin the next request (nginx reuses id 1).
"""

from __future__ import annotations

import os
import struct
from typing import Dict, Iterable, List, Optional, Set, Tuple, Union

# The compiled PARAMS decoder: setup.py builds it when it can; LUAFCGID_PURE: never used.
_compiled_decode_pairs = _compiled_whole_request = _compiled_response_records = None
if not os.environ.get("LUAFCGID_PURE"):
    try:
        from luafcgid._speedups import decode_pairs as _compiled_decode_pairs
        from luafcgid._speedups import response_records as _compiled_response_records
        from luafcgid._speedups import whole_request as _compiled_whole_request
    except ImportError:
        pass
# True when PARAMS are decoded by the compiled speed-up.
COMPILED = _compiled_decode_pairs is not None

VERSION_1 = 1

BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11

RESPONDER = 1
AUTHORIZER = 2
FILTER = 3

KEEP_CONN = 1

REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3

MAX_CONTENT = 65535  # per record
# PARAMS bytes per request, all records together, by default (the max_params setting): more
# than Apache sends at most by default (100 header lines of 8190 bytes), and nginx (32 KiB of
# headers by default). Name-value pairs are not counted: these bytes bound them.
MAX_PARAMS_BYTES = 1024 * 1024
# Request ids are 16 bits and 0 is for management records: -1 matches no record.
_NO_REQUEST = -1

_RECORD_NAMES = {
    BEGIN_REQUEST: "BEGIN_REQUEST", ABORT_REQUEST: "ABORT_REQUEST",
    END_REQUEST: "END_REQUEST", PARAMS: "PARAMS", STDIN: "STDIN", STDOUT: "STDOUT",
    STDERR: "STDERR", DATA: "DATA", GET_VALUES: "GET_VALUES",
    GET_VALUES_RESULT: "GET_VALUES_RESULT", UNKNOWN_TYPE: "UNKNOWN_TYPE",
}

_HEADER = struct.Struct(">BBHHBx")
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack
_BEGIN_BODY = struct.Struct(">HB5x")
_END_BODY = struct.Struct(">IB3x")
# The empty STDOUT record that closes the stream, then END_REQUEST: one pack.
_END_REQUEST = struct.Struct(">BBHHBx" "BBHHBx" "IB3x")
_LONG_LENGTH = struct.Struct(">I")
_unpack_long_length = _LONG_LENGTH.unpack_from

# Padding that brings content of length n to a multiple of 8, indexed by n & 7.
_PADDING_LENGTHS = tuple((8 - n) % 8 for n in range(8))
_PADDINGS = tuple(b"\0" * length for length in _PADDING_LENGTHS)


class ProtocolError(Exception):
    """The peer sent something that is not FastCGI 1.0; the message says what."""


class _Event:
    """Equality and repr from ``__slots__``, so events compare in tests and read in logs."""

    __slots__ = ()

    _fields: Tuple[str, ...] = ()  # what equality and repr look at (default: __slots__)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, name) == getattr(other, name) for name in self._fields or self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}"
                           for name in self._fields or self.__slots__)
        return f"{type(self).__name__}({fields})"

    __hash__ = None  # type: ignore[assignment]


class Request(_Event):
    """A complete request: PARAMS and STDIN both ended.

    ``body`` is ``b""`` and ``body_too_large`` is true when the body was over
    ``maxpost`` (it was read and dropped, never held). ``params_overflow`` is the number
    of PARAMS bytes received when they were over ``max_params`` (then ``params`` is empty
    and the body was dropped too); 0 otherwise. ``raw_params`` is the PARAMS stream the
    params were decoded from, for a decoder on the Lua side (b"" once the server changes
    ``params``); equality and repr leave it out.
    """

    _fields = ("request_id", "keep_conn", "params", "body", "body_too_large",
               "params_overflow")
    __slots__ = _fields + ("raw_params",)

    def __init__(self, request_id: int, keep_conn: bool, params: Dict[bytes, bytes],
                 body: bytes, body_too_large: bool, params_overflow: int = 0,
                 raw_params: bytes = b"") -> None:
        self.request_id = request_id
        self.keep_conn = keep_conn
        self.params = params
        self.body = body
        self.body_too_large = body_too_large
        self.params_overflow = params_overflow
        self.raw_params = raw_params


class Abort(_Event):
    """ABORT_REQUEST for the request being read or the last one handed out.

    A request still being read (``handed_out`` false) is dropped: the server
    must end it with :func:`end_request`. One already handed out as a
    :class:`Request` ends with the END_REQUEST of its own answer.
    """

    __slots__ = ("request_id", "handed_out")

    def __init__(self, request_id: int, handed_out: bool = False) -> None:
        self.request_id = request_id
        self.handed_out = handed_out


class Reply(_Event):
    """Bytes the server sends as they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


Event = Union[Request, Abort, Reply]


def encode_record(record_type: int, request_id: int, content: bytes = b"") -> bytes:
    """One record: header, content, padding to a multiple of 8 bytes."""
    length = len(content)
    if length > MAX_CONTENT:
        raise ValueError(f"record content of {length} bytes, at most {MAX_CONTENT} fit")
    return b"".join((
        _pack_header(VERSION_1, record_type, request_id, length, _PADDING_LENGTHS[length & 7]),
        content, _PADDINGS[length & 7]))


def _encode_length(length: int) -> bytes:
    if length < 128:
        return bytes((length,))
    return _LONG_LENGTH.pack(length | 0x80000000)


def encode_pairs(pairs: Iterable[Tuple[bytes, bytes]]) -> bytes:
    """Name-value pairs: each length in 1 byte below 128, else 4 bytes with the high bit set."""
    parts = []
    for name, value in pairs:
        parts += (_encode_length(len(name)), _encode_length(len(value)), name, value)
    return b"".join(parts)


def _decode_pairs(data: bytes, pos: int, end: int) -> Dict[bytes, bytes]:
    """The pairs in ``data[pos:end]``, read in place (no slice of the whole)."""
    if _compiled_decode_pairs is not None and data.__class__ is bytes:
        try:
            return _compiled_decode_pairs(data, pos, end)
        except ValueError as error:
            raise ProtocolError(str(error)) from None
    return _python_decode_pairs(data, pos, end)


def _python_decode_pairs(data: bytes, pos: int, end: int) -> Dict[bytes, bytes]:
    """:func:`_decode_pairs` in Python: the pure path, and the reference the compiled one
    is tested against."""
    pairs = {}
    try:
        while pos < end:
            name_length = data[pos]
            if name_length < 128:
                pos += 1
            else:
                name_length = _unpack_long_length(data, pos)[0] & 0x7FFFFFFF
                pos += 4
            value_length = data[pos]
            if value_length < 128:
                pos += 1
            else:
                value_length = _unpack_long_length(data, pos)[0] & 0x7FFFFFFF
                pos += 4
            value_start = pos + name_length
            value_end = value_start + value_length
            if value_end > end:
                raise ProtocolError(
                    f"truncated name-value pair: lengths {name_length} and {value_length}"
                    f" run {value_end - end} bytes past the end of the data")
            pairs[data[pos:value_start]] = data[value_start:value_end]
            pos = value_end
    except (IndexError, struct.error):
        raise ProtocolError("truncated name-value pair: the data ends inside a length") from None
    return pairs


def decode_pairs(data: bytes) -> Dict[bytes, bytes]:
    """Name-value pairs → dict (a repeated name keeps its last value)."""
    return _decode_pairs(data, 0, len(data))


def stdout_records(request_id: int, data: bytes) -> bytes:
    """``data`` as STDOUT records of at most 65535 bytes each (``b""`` for no data)."""
    return b"".join(_stdout_parts(request_id, data))


def _python_response_records(request_id: int, data: bytes) -> bytes:
    """A whole answer in one copy: ``data`` as STDOUT records, then :func:`end_request`."""
    parts = _stdout_parts(request_id, data)
    parts.append(end_request(request_id))
    return b"".join(parts)


# The compiled one when built: the same bytes (tests/test_speedups.py), one allocation.
response_records = _compiled_response_records or _python_response_records


def _stdout_parts(request_id: int, data: bytes) -> list:
    length = len(data)
    if length <= MAX_CONTENT:
        if not length:
            return []
        return [_pack_header(VERSION_1, STDOUT, request_id, length, _PADDING_LENGTHS[length & 7]),
                data, _PADDINGS[length & 7]]
    view = memoryview(data)
    parts = []
    for start in range(0, length, MAX_CONTENT):
        chunk = view[start:start + MAX_CONTENT]
        size = len(chunk)
        parts += (_pack_header(VERSION_1, STDOUT, request_id, size, _PADDING_LENGTHS[size & 7]),
                  chunk, _PADDINGS[size & 7])
    return parts


def end_request(request_id: int, app_status: int = 0,
                protocol_status: int = REQUEST_COMPLETE) -> bytes:
    """The empty STDOUT record that closes the stream, then END_REQUEST."""
    return _END_REQUEST.pack(VERSION_1, STDOUT, request_id, 0, 0,
                             VERSION_1, END_REQUEST, request_id, 8, 0,
                             app_status, protocol_status)


def _refusal(request_id: int, protocol_status: int) -> Reply:
    """END_REQUEST alone: a refused request never opened its STDOUT."""
    return Reply(encode_record(END_REQUEST, request_id, _END_BODY.pack(0, protocol_status)))


def _unknown_type(record_type: int) -> Reply:
    return Reply(encode_record(UNKNOWN_TYPE, 0, bytes((record_type, 0, 0, 0, 0, 0, 0, 0))))


class Connection:
    """The input side of one FastCGI connection: bytes in, events out.

    ``max_conns`` and ``max_reqs`` are what GET_VALUES is told (FCGI_MAX_CONNS,
    FCGI_MAX_REQS); ``maxpost`` is the largest body kept and ``max_params`` the largest
    PARAMS taken, in bytes.
    """

    __slots__ = (
        "_max_conns", "_max_reqs", "_maxpost", "_max_params", "_partial", "_needed",
        "_request_id", "_keep_conn", "_last_id", "_refused",
        "_params", "_raw_params", "_params_ref", "_params_buffer", "_params_overflow",
        "_body_chunks", "_body_size", "_body_ended",
    )

    def __init__(self, max_conns: int, max_reqs: int, maxpost: int,
                 max_params: int = MAX_PARAMS_BYTES) -> None:
        self._max_conns = max_conns
        self._max_reqs = max_reqs
        self._maxpost = maxpost
        self._max_params = max_params
        self._partial = bytearray()  # the start of a record not yet complete
        self._needed = 0             # bytes _partial must hold before parsing again
        self._keep_conn = False
        self._last_id = 0            # the last request handed out (it may still be aborted)
        self._refused: Set[int] = set()  # ids answered with CANT_MPX_CONN / UNKNOWN_ROLE
        self._params_buffer = bytearray()  # PARAMS content spread over records or inputs
        self._clear_request()

    def _clear_request(self) -> None:
        """No request is being read: let go of what was held for one."""
        self._request_id = _NO_REQUEST
        self._params: Optional[Dict[bytes, bytes]] = None  # decoded once PARAMS ended
        self._raw_params = b""  # ... from these bytes
        # PARAMS content still lying in one record of the current input: (data, start, end).
        self._params_ref: Optional[Tuple[bytes, int, int]] = None
        self._params_buffer.clear()
        self._params_overflow = 0  # PARAMS bytes seen once over max_params (dropped)
        self._body_chunks: Optional[List[bytes]] = []  # None: over maxpost, drained unkept
        self._body_size = 0
        self._body_ended = False

    @property
    def between_requests(self) -> bool:
        """True when no request and no record is half-read: closing now loses nothing."""
        return self._request_id == _NO_REQUEST and not self._partial

    def receive(self, data: bytes) -> List[Event]:
        """Feed bytes read from the web server, split anywhere; return the events completed."""
        if (_compiled_whole_request is not None and not self._partial
                and self._request_id == _NO_REQUEST and not self._refused
                and data.__class__ is bytes):
            # One whole request in one input (what a web server sends), read in one C call;
            # None for anything else, which the loop below reads record by record.
            whole = _compiled_whole_request(data, self._maxpost, self._max_params)
            if whole is not None:
                request_id, self._keep_conn, params, raw_params, body = whole
                self._last_id = request_id
                return [Request(request_id, self._keep_conn, params, body, False, 0,
                                raw_params)]
        if self._partial:
            self._partial += data
            if len(self._partial) < self._needed:
                return []
            data = bytes(self._partial)
            self._partial.clear()
        events: List[Event] = []
        size = len(data)
        pos = 0
        while size - pos >= 8:
            version, record_type, request_id, length, padding = _unpack_header(data, pos)
            if version != VERSION_1:
                raise ProtocolError(f"unknown FastCGI version {version}")
            start = pos + 8
            end = start + length
            if end + padding > size:
                self._needed = end + padding - pos
                break
            pos = end + padding
            if request_id == self._request_id:
                if record_type == PARAMS:
                    if self._on_params(data, start, end):
                        events.append(self._finish())
                    continue
                if record_type == STDIN:
                    if self._on_stdin(data, start, end):
                        events.append(self._finish())
                    continue
            if record_type == BEGIN_REQUEST and request_id:
                event = self._begin(request_id, data, start, end)
            else:
                event = self._on_other(record_type, request_id, data, start, end)
            if event is not None:
                events.append(event)
        else:
            self._needed = 8
        if pos < size:
            self._partial += memoryview(data)[pos:]
        if self._params_ref is not None:
            self._keep_params_ref()  # rather than keep this whole input alive
        return events

    def _on_params(self, data: bytes, start: int, end: int) -> bool:
        """Take one PARAMS record; true when it completed the request."""
        if self._params is not None:
            raise ProtocolError(
                f"PARAMS record after the end of PARAMS of request {self._request_id}")
        if start != end:
            if self._params_overflow:
                self._params_overflow += end - start
            elif (self._params_ref is None and not self._params_buffer
                    and end - start <= self._max_params):
                # Only point at it: nginx sends all PARAMS in one record.
                self._params_ref = (data, start, end)
            else:
                self._buffer_params(data, start, end)
            return False
        ref = self._params_ref
        if self._params_overflow:
            self._body_chunks = None  # a request answered 431 keeps no body either
            params = {}
        elif ref is not None:
            self._params_ref = None
            data, start, end = ref
            params = _decode_pairs(data, start, end)
            self._raw_params = data[start:end]
        else:
            self._raw_params = bytes(self._params_buffer)
            params = decode_pairs(self._raw_params)
            self._params_buffer.clear()
        self._params = params
        announced = params.get(b"CONTENT_LENGTH")
        if announced and _exceeds(announced, self._maxpost):
            self._body_chunks = None
        return self._body_ended

    def _buffer_params(self, data: bytes, start: int, end: int) -> None:
        self._keep_params_ref()
        self._params_buffer += memoryview(data)[start:end]
        if len(self._params_buffer) > self._max_params:
            self._params_overflow = len(self._params_buffer)
            self._params_buffer.clear()

    def _keep_params_ref(self) -> None:
        """Copy the PARAMS content pointed at into the buffer."""
        ref = self._params_ref
        if ref is not None:
            data, start, end = ref
            self._params_buffer += memoryview(data)[start:end]
            self._params_ref = None

    def _on_stdin(self, data: bytes, start: int, end: int) -> bool:
        """Take one STDIN record; true when it completed the request."""
        if self._body_ended:
            raise ProtocolError(
                f"STDIN record after the end of STDIN of request {self._request_id}")
        if start == end:
            self._body_ended = True
            return self._params is not None
        chunks = self._body_chunks
        if chunks is not None:
            self._body_size += end - start
            if self._body_size > self._maxpost:
                self._body_chunks = None
            else:
                chunks.append(data[start:end])
        return False

    def _finish(self) -> Request:
        """Hand the request out; its id is free again for input."""
        chunks = self._body_chunks
        if not chunks:
            body = b""
        elif len(chunks) == 1:
            body = chunks[0]
        else:
            body = b"".join(chunks)
        assert self._params is not None
        request = Request(self._request_id, self._keep_conn, self._params, body, chunks is None,
                          self._params_overflow, self._raw_params)
        self._last_id = self._request_id
        self._clear_request()
        return request

    def _on_other(self, record_type: int, request_id: int, data: bytes, start: int,
                  end: int) -> Optional[Event]:
        """Every record but BEGIN_REQUEST, and PARAMS and STDIN of the request being read."""
        if request_id == 0:
            if record_type == GET_VALUES:
                return self._get_values(data, start, end)
            return _unknown_type(record_type)
        if record_type == 0 or record_type > UNKNOWN_TYPE:
            return _unknown_type(record_type)
        if request_id in self._refused:
            return None
        if record_type == ABORT_REQUEST:
            return self._abort(request_id)
        if record_type == PARAMS or record_type == STDIN:
            raise ProtocolError(f"record for request {request_id} which is not active")
        if (record_type == DATA and start == end
                and (request_id == self._request_id or request_id == self._last_id)):
            # The empty DATA stream some clients (flup's FCGIApp) send after STDIN: a
            # RESPONDER has no DATA stream, and an empty one says nothing (php-fpm
            # ignores it too). DATA with content is still refused below.
            return None
        name = _RECORD_NAMES[record_type]
        raise ProtocolError(f"unexpected {name} record for request {request_id}")

    def _get_values(self, data: bytes, start: int, end: int) -> Reply:
        """GET_VALUES: our figures for the names asked; unknown names are left out."""
        # Built here, not per connection: almost no connection asks.
        values = {b"FCGI_MAX_CONNS": str(self._max_conns).encode(),
                  b"FCGI_MAX_REQS": str(self._max_reqs).encode(),
                  b"FCGI_MPXS_CONNS": b"0"}
        known = [(name, values[name]) for name in _decode_pairs(data, start, end)
                 if name in values]
        return Reply(encode_record(GET_VALUES_RESULT, 0, encode_pairs(known)))

    def _begin(self, request_id: int, data: bytes, start: int, end: int) -> Optional[Reply]:
        if end - start != 8:
            raise ProtocolError(f"BEGIN_REQUEST body of {end - start} bytes, 8 expected")
        if request_id == self._request_id:
            raise ProtocolError(f"BEGIN_REQUEST for request {request_id} which is already active")
        role, flags = _BEGIN_BODY.unpack_from(data, start)
        if self._request_id != _NO_REQUEST:
            self._refused.add(request_id)
            return _refusal(request_id, CANT_MPX_CONN)
        if role != RESPONDER:
            self._refused.add(request_id)
            return _refusal(request_id, UNKNOWN_ROLE)
        if self._refused:
            self._refused.discard(request_id)
        self._request_id = request_id
        self._keep_conn = bool(flags & KEEP_CONN)
        return None

    def _abort(self, request_id: int) -> Abort:
        if request_id == self._request_id:
            self._clear_request()
            return Abort(request_id, handed_out=False)
        if request_id == self._last_id:
            self._last_id = 0
            return Abort(request_id, handed_out=True)
        raise ProtocolError(f"record for request {request_id} which is not active")


def _exceeds(content_length: bytes, maxpost: int) -> bool:
    """CONTENT_LENGTH announces a body over maxpost (a malformed one is not trusted)."""
    try:
        return int(content_length) > maxpost
    except ValueError:
        return False


# --- the web server's side: requests out, answers in ------------------------------------------
#
# What nginx does on its end of the connection, for luafcgid's own client (``luafcgid
# request``), the tests and the fuzzer: :func:`request_records` encodes a request, and a
# :class:`ResponseReader` turns the application's records, split anywhere, into events:
# :class:`Stdout` and :class:`Stderr` data, then :class:`EndRequest` with the application's
# and the protocol's status. The empty record that ends a stream gives no event (h11 does
# not report an empty body chunk either). Anything else an application must not send is a
# ProtocolError, as on the server's side.


class _StreamData(_Event):
    """Content of one record of an output stream (never empty)."""

    __slots__ = ("request_id", "data")
    _fields = __slots__  # the subclasses' own __slots__ are empty
    record_type = 0

    def __init__(self, request_id: int, data: bytes) -> None:
        self.request_id = request_id
        self.data = data


class Stdout(_StreamData):
    """Content of one STDOUT record (never empty)."""

    __slots__ = ()
    record_type = STDOUT


class Stderr(_StreamData):
    """Content of one STDERR record (never empty)."""

    __slots__ = ()
    record_type = STDERR


class EndRequest(_Event):
    """END_REQUEST: the request is over (``protocol_status`` REQUEST_COMPLETE when it ran)."""

    __slots__ = ("request_id", "app_status", "protocol_status")
    record_type = END_REQUEST

    def __init__(self, request_id: int, app_status: int = 0,
                 protocol_status: int = REQUEST_COMPLETE) -> None:
        self.request_id = request_id
        self.app_status = app_status
        self.protocol_status = protocol_status


class Values(_Event):
    """GET_VALUES_RESULT: the figures the application gave for the names asked."""

    __slots__ = ("values",)
    record_type = GET_VALUES_RESULT
    request_id = 0

    def __init__(self, values: Dict[bytes, bytes]) -> None:
        self.values = values


class UnknownType(_Event):
    """UNKNOWN_TYPE: the application did not know a management record we sent."""

    __slots__ = ("unknown_type",)
    record_type = UNKNOWN_TYPE
    request_id = 0

    def __init__(self, unknown_type: int) -> None:
        self.unknown_type = unknown_type


ClientEvent = Union[Stdout, Stderr, EndRequest, Values, UnknownType]


def begin_request(request_id: int, keep_conn: bool = False, role: int = RESPONDER) -> bytes:
    """BEGIN_REQUEST for ``role``; ``keep_conn`` asks the application to keep the connection."""
    return encode_record(BEGIN_REQUEST, request_id,
                         _BEGIN_BODY.pack(role, KEEP_CONN if keep_conn else 0))


def stream_records(record_type: int, request_id: int, data: bytes,
                   chunk: int = MAX_CONTENT) -> bytes:
    """``data`` as records of at most ``chunk`` bytes, then the empty record that ends it."""
    view = memoryview(data)
    records = [encode_record(record_type, request_id, view[start:start + chunk])
               for start in range(0, len(data), chunk)]
    records.append(encode_record(record_type, request_id))
    return b"".join(records)


def request_records(request_id: int,
                    params: Union[Dict[bytes, bytes], Iterable[Tuple[bytes, bytes]]],
                    body: bytes = b"", keep_conn: bool = False, role: int = RESPONDER) -> bytes:
    """One whole request as nginx sends it: BEGIN_REQUEST, then PARAMS and STDIN, each
    split at the record limit and ended by an empty record."""
    pairs = params.items() if isinstance(params, dict) else params
    return b"".join((begin_request(request_id, keep_conn, role),
                     stream_records(PARAMS, request_id, encode_pairs(pairs)),
                     stream_records(STDIN, request_id, body)))


class ResponseReader:
    """The web server's input side of one connection: bytes in, :data:`ClientEvent` out.

    Not tied to one request: on a kept-alive connection the next answer's records follow
    the last END_REQUEST, and their events carry their request ids.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()  # the start of a record not yet complete

    @property
    def pending(self) -> int:
        """Bytes held of a record not yet complete (0: the input ended on a record end)."""
        return len(self._buffer)

    def receive(self, data: bytes) -> List[ClientEvent]:
        """Feed bytes read from the application, split anywhere; return the events completed."""
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        events: List[ClientEvent] = []
        pos = 0
        while size - pos >= 8:
            version, record_type, request_id, length, padding = _unpack_header(buffer, pos)
            if version != VERSION_1:
                raise ProtocolError(f"unknown FastCGI version {version}")
            start = pos + 8
            end = start + length
            if end + padding > size:
                break
            pos = end + padding
            event = _client_event(record_type, request_id, bytes(buffer[start:end]))
            if event is not None:
                events.append(event)
        del buffer[:pos]
        return events


def _client_event(record_type: int, request_id: int, content: bytes) -> Optional[ClientEvent]:
    """The event one record from the application makes (None for the end of a stream)."""
    if record_type == STDOUT:
        return Stdout(request_id, content) if content else None
    if record_type == STDERR:
        return Stderr(request_id, content) if content else None
    if record_type == END_REQUEST:
        if len(content) != 8:
            raise ProtocolError(f"END_REQUEST body of {len(content)} bytes, 8 expected")
        app_status, protocol_status = _END_BODY.unpack(content)
        return EndRequest(request_id, app_status, protocol_status)
    if record_type == GET_VALUES_RESULT and request_id == 0:
        return Values(decode_pairs(content))
    if record_type == UNKNOWN_TYPE and request_id == 0:
        if len(content) != 8:
            raise ProtocolError(f"UNKNOWN_TYPE body of {len(content)} bytes, 8 expected")
        return UnknownType(content[0])
    name = _RECORD_NAMES.get(record_type, f"type {record_type}")
    raise ProtocolError(f"unexpected {name} record for request {request_id} from the application")
