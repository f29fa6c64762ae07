"""The sans-I/O FastCGI layer: exact bytes out, events in, any split of the input."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luafcgid import protocol
from luafcgid.protocol import (
    Abort,
    Connection,
    ProtocolError,
    Reply,
    Request,
    begin_request,
    decode_pairs,
    encode_pairs,
    encode_record,
    end_request,
    stdout_records,
    stream_records,
)

MAXPOST = 1 << 20


def header(record_type: int, request_id: int, length: int, padding: int) -> bytes:
    return bytes([1, record_type, request_id >> 8, request_id & 0xFF,
                  length >> 8, length & 0xFF, padding, 0])


def begin(request_id: int = 1, role: int = protocol.RESPONDER, keep_conn: bool = False) -> bytes:
    return begin_request(request_id, keep_conn, role)


stream = stream_records  # ``content`` as records of at most ``chunk`` bytes, then the end


def request_bytes(params: dict, body: bytes = b"", request_id: int = 1, keep_conn: bool = False,
                  params_chunk: int = 65535, body_chunk: int = 65535) -> bytes:
    """A request with its streams cut into records of the sizes given."""
    return (begin(request_id, keep_conn=keep_conn)
            + stream(protocol.PARAMS, request_id, encode_pairs(params.items()), params_chunk)
            + stream(protocol.STDIN, request_id, body, body_chunk))


def connection(maxpost: int = MAXPOST, max_params: int = protocol.MAX_PARAMS_BYTES) -> Connection:
    return Connection(max_conns=1024, max_reqs=4, maxpost=maxpost, max_params=max_params)


NGINX_PARAMS = {
    b"QUERY_STRING": b"a=1", b"REQUEST_METHOD": b"POST", b"CONTENT_TYPE": b"text/plain",
    b"CONTENT_LENGTH": b"5", b"SCRIPT_NAME": b"/hello.lua", b"REQUEST_URI": b"/hello.lua?a=1",
    b"DOCUMENT_ROOT": b"/srv/www", b"SCRIPT_FILENAME": b"/srv/www/hello.lua",
    b"SERVER_PROTOCOL": b"HTTP/1.1", b"HTTP_HOST": b"localhost",
}


# --- output: exact bytes -------------------------------------------------------------------

@pytest.mark.parametrize("length, padding", [(0, 0), (1, 7), (7, 1), (8, 0), (9, 7), (65535, 1)])
def test_encode_record_pads_to_a_multiple_of_8(length: int, padding: int) -> None:
    content = b"x" * length
    assert (encode_record(protocol.STDIN, 0x0102, content)
            == b"\x01\x05\x01\x02" + length.to_bytes(2, "big") + bytes([padding, 0])
            + content + b"\0" * padding)


def test_encode_record_refuses_content_over_65535_bytes() -> None:
    with pytest.raises(ValueError, match="65536"):
        encode_record(protocol.STDOUT, 1, b"x" * 65536)


def test_encode_pairs_short_lengths_take_one_byte() -> None:
    assert encode_pairs([(b"A", b"bc"), (b"N" * 127, b"")]) == (
        b"\x01\x02Abc" + b"\x7f\x00" + b"N" * 127)


def test_encode_pairs_long_lengths_take_four_bytes_with_the_high_bit() -> None:
    name, value = b"n" * 128, b"v" * 70000
    assert encode_pairs([(name, value)]) == (
        b"\x80\x00\x00\x80" + b"\x80\x01\x11\x70" + name + value)
    assert encode_pairs([(b"x", b"y" * 300)]) == b"\x01\x80\x00\x01\x2c" + b"x" + b"y" * 300


def test_stdout_records_small_is_one_padded_record() -> None:
    assert stdout_records(1, b"hello") == header(protocol.STDOUT, 1, 5, 3) + b"hello\0\0\0"


def test_stdout_records_empty_data_is_no_record() -> None:
    assert stdout_records(1, b"") == b""


def test_stdout_records_split_at_65535() -> None:
    assert stdout_records(7, b"a" * 65535) == header(6, 7, 65535, 1) + b"a" * 65535 + b"\0"
    data = bytes(range(256)) * 512  # 131072 bytes: 65535 + 65535 + 2
    assert stdout_records(7, data) == (
        header(6, 7, 65535, 1) + data[:65535] + b"\0"
        + header(6, 7, 65535, 1) + data[65535:131070] + b"\0"
        + header(6, 7, 2, 6) + data[131070:] + b"\0" * 6)


def test_end_request_closes_stdout_then_ends() -> None:
    assert end_request(1) == (header(protocol.STDOUT, 1, 0, 0)
                              + header(protocol.END_REQUEST, 1, 8, 0) + b"\0" * 8)
    assert end_request(0x0203, app_status=0x01020304, protocol_status=protocol.OVERLOADED) == (
        header(protocol.STDOUT, 0x0203, 0, 0) + header(protocol.END_REQUEST, 0x0203, 8, 0)
        + b"\x01\x02\x03\x04\x02\0\0\0")


# --- management records ---------------------------------------------------------------------

def test_get_values_answers_the_known_names_asked() -> None:
    asked = encode_pairs([(b"FCGI_MAX_CONNS", b""), (b"FCGI_UNHEARD_OF", b""),
                          (b"FCGI_MAX_REQS", b""), (b"FCGI_MPXS_CONNS", b"")])
    events = connection().receive(encode_record(protocol.GET_VALUES, 0, asked))
    content = (b"\x0e\x04FCGI_MAX_CONNS1024" + b"\x0d\x01FCGI_MAX_REQS4"
               + b"\x0f\x01FCGI_MPXS_CONNS0")
    assert len(content) == 54
    assert events == [Reply(header(protocol.GET_VALUES_RESULT, 0, 54, 2) + content + b"\0\0")]


def test_get_values_with_only_unknown_names_gets_an_empty_result() -> None:
    asked = encode_pairs([(b"SOMETHING", b"")])
    events = connection().receive(encode_record(protocol.GET_VALUES, 0, asked))
    assert events == [Reply(header(protocol.GET_VALUES_RESULT, 0, 0, 0))]


@pytest.mark.parametrize("record_type, request_id", [(12, 0), (255, 0), (12, 1), (0, 3),
                                                    (protocol.END_REQUEST, 0),
                                                    (protocol.STDIN, 0)])
def test_unknown_record_type_gets_unknown_type(record_type: int, request_id: int) -> None:
    events = connection().receive(encode_record(record_type, request_id, b"abc"))
    assert events == [Reply(header(protocol.UNKNOWN_TYPE, 0, 8, 0)
                            + bytes([record_type]) + b"\0" * 7)]


# --- requests -----------------------------------------------------------------------------

def test_a_request_in_one_read() -> None:
    events = connection().receive(request_bytes(NGINX_PARAMS, b"hello"))
    assert events == [Request(1, False, NGINX_PARAMS, b"hello", False)]


@pytest.mark.parametrize("keep_conn", [True, False])
def test_keep_conn_flag(keep_conn: bool) -> None:
    (request,) = connection().receive(request_bytes(NGINX_PARAMS, keep_conn=keep_conn))
    assert request.keep_conn is keep_conn


def test_no_params_and_no_body() -> None:
    assert connection().receive(request_bytes({})) == [Request(1, False, {}, b"", False)]


def test_request_comes_out_only_when_both_streams_ended() -> None:
    conn = connection()
    assert conn.receive(begin(5) + stream(protocol.PARAMS, 5, encode_pairs([(b"A", b"1")]))) == []
    assert conn.receive(encode_record(protocol.STDIN, 5, b"body")) == []
    assert conn.receive(encode_record(protocol.STDIN, 5)) == [
        Request(5, False, {b"A": b"1"}, b"body", False)]


def test_stdin_may_end_before_params() -> None:
    conn = connection()
    data = begin(2) + stream(protocol.STDIN, 2, b"xy") + stream(protocol.PARAMS, 2, b"\x01\x01AB")
    assert conn.receive(data) == [Request(2, False, {b"A": b"B"}, b"xy", False)]


def test_pair_split_across_params_records_at_every_byte() -> None:
    pairs = encode_pairs([(b"NAME", b"v" * 200), (b"L" * 130, b"value")])
    for cut in range(1, len(pairs)):
        data = (begin() + encode_record(protocol.PARAMS, 1, pairs[:cut])
                + encode_record(protocol.PARAMS, 1, pairs[cut:])
                + encode_record(protocol.PARAMS, 1) + stream(protocol.STDIN, 1, b""))
        (request,) = connection().receive(data)
        assert request.params == {b"NAME": b"v" * 200, b"L" * 130: b"value"}


def test_header_split_over_two_reads() -> None:
    data = request_bytes(NGINX_PARAMS, b"body")
    for cut in range(1, 8):
        conn = connection()
        assert conn.receive(data[:cut]) == []
        assert conn.receive(data[cut:]) == [Request(1, False, NGINX_PARAMS, b"body", False)]


def dribble_seconds(record_length: int) -> float:
    """Best of three: the time to feed 65520 bytes of STDIN in records of ``record_length``
    bytes, one byte per read."""
    records = b"".join(encode_record(protocol.STDIN, 1, b"x" * record_length)
                       for _ in range(65520 // record_length))
    pieces = [records[index:index + 1] for index in range(len(records))]
    best = float("inf")
    for _ in range(3):
        conn = connection()
        conn.receive(begin())
        started = time.perf_counter()
        for piece in pieces:
            conn.receive(piece)
        best = min(best, time.perf_counter() - started)
    return best


def test_a_record_dribbled_byte_by_byte_costs_linear_time() -> None:
    # Same bytes in as many reads, so about the same time. Reparsing what is held on
    # every read would make the one big record cost ~3x as much as the 65 small ones.
    assert dribble_seconds(65520) < 2 * dribble_seconds(1008)


def test_kept_alive_connection_reuses_request_id_1() -> None:
    conn = connection()
    first = request_bytes({b"N": b"1"}, keep_conn=True)
    second = request_bytes({b"N": b"2"}, b"x", keep_conn=True)
    assert conn.receive(first + second) == [Request(1, True, {b"N": b"1"}, b"", False),
                                            Request(1, True, {b"N": b"2"}, b"x", False)]
    assert conn.receive(first) == [Request(1, True, {b"N": b"1"}, b"", False)]


def test_empty_data_record_after_stdin_is_ignored_as_flup_sends_it() -> None:
    """flup's FCGIApp: BEGIN (no KEEP_CONN), PARAMS, STDIN, then an empty DATA record."""
    flup = (header(protocol.BEGIN_REQUEST, 1, 8, 0) + b"\x00\x01\x00\x00\x00\x00\x00\x00"
            + header(protocol.PARAMS, 1, 4, 4) + b"\x01\x01AB\x00\x00\x00\x00"
            + header(protocol.PARAMS, 1, 0, 0)
            + header(protocol.STDIN, 1, 2, 6) + b"hi\x00\x00\x00\x00\x00\x00"
            + header(protocol.STDIN, 1, 0, 0)
            + header(protocol.DATA, 1, 0, 0))
    assert connection().receive(flup) == [Request(1, False, {b"A": b"B"}, b"hi", False)]
    # The DATA record in a later read than the request it follows, then the next request.
    conn = connection()
    cut = len(flup) - 8
    assert conn.receive(flup[:cut]) == [Request(1, False, {b"A": b"B"}, b"hi", False)]
    assert conn.receive(flup[cut:]) == []
    assert conn.between_requests
    assert conn.receive(request_bytes({}, request_id=1)) == [Request(1, False, {}, b"", False)]


def test_empty_data_record_while_the_request_is_read_is_ignored() -> None:
    data = (begin(2) + stream(protocol.PARAMS, 2, b"\x01\x01AB")
            + encode_record(protocol.DATA, 2) + stream(protocol.STDIN, 2, b"xy"))
    assert connection().receive(data) == [Request(2, False, {b"A": b"B"}, b"xy", False)]


def test_data_with_content_or_for_another_request_is_still_refused() -> None:
    protocol_error(request_bytes({}) + encode_record(protocol.DATA, 1, b"filter input"),
                   "unexpected DATA record for request 1")
    protocol_error(request_bytes({}) + encode_record(protocol.DATA, 7),
                   "unexpected DATA record for request 7")


def test_large_body_over_many_records() -> None:
    body = bytes(range(256)) * 1000
    (request,) = connection().receive(request_bytes(NGINX_PARAMS, body, body_chunk=1000))
    assert request.body == body and not request.body_too_large


@pytest.mark.parametrize("role", [protocol.AUTHORIZER, protocol.FILTER])
def test_authorizer_and_filter_get_unknown_role(role: int) -> None:
    conn = connection()
    refused = (begin(3, role=role) + stream(protocol.PARAMS, 3, b"\x01\x01AB")
               + stream(protocol.STDIN, 3, b"in") + stream(protocol.DATA, 3, b"filtered"))
    assert conn.receive(refused) == [Reply(header(protocol.END_REQUEST, 3, 8, 0)
                                           + b"\0\0\0\0\x03\0\0\0")]
    # The connection goes on serving responders, the refused id included.
    assert conn.receive(begin(3) + encode_record(protocol.ABORT_REQUEST, 3)) == [Abort(3)]
    assert conn.receive(request_bytes({}, request_id=3)) == [Request(3, False, {}, b"", False)]


def test_second_request_id_while_one_is_read_gets_cant_mpx_conn() -> None:
    conn = connection()
    events = conn.receive(begin(1) + encode_record(protocol.PARAMS, 1, b"\x01\x01AB")
                          + request_bytes({b"X": b"Y"}, b"ignored", request_id=2)
                          + encode_record(protocol.PARAMS, 1) + stream(protocol.STDIN, 1, b""))
    assert events == [Reply(header(protocol.END_REQUEST, 2, 8, 0) + b"\0\0\0\0\x01\0\0\0"),
                      Request(1, False, {b"A": b"B"}, b"", False)]


def test_management_record_in_the_middle_of_a_request() -> None:
    conn = connection()
    asked = encode_record(protocol.GET_VALUES, 0, encode_pairs([(b"FCGI_MPXS_CONNS", b"")]))
    events = conn.receive(begin() + encode_record(protocol.PARAMS, 1, b"\x01\x01AB") + asked
                          + encode_record(protocol.PARAMS, 1) + stream(protocol.STDIN, 1, b""))
    assert events == [Reply(header(protocol.GET_VALUES_RESULT, 0, 18, 6)
                            + b"\x0f\x01FCGI_MPXS_CONNS0" + b"\0" * 6),
                      Request(1, False, {b"A": b"B"}, b"", False)]


def test_unfinished_params_do_not_keep_the_whole_read_alive() -> None:
    conn = connection(maxpost=16)
    tracemalloc.start()
    try:
        read = (begin() + encode_record(protocol.PARAMS, 1, b"\x01\x01AB")
                + stream(protocol.STDIN, 1, b"x" * 300_000))
        assert conn.receive(read) == []
        del read
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 64 * 1024
    assert conn.receive(encode_record(protocol.PARAMS, 1)) == [Request(1, False, {b"A": b"B"},
                                                                       b"", True)]


def test_abort_while_the_request_is_read_drops_it() -> None:
    conn = connection()
    events = conn.receive(begin(1) + encode_record(protocol.PARAMS, 1, b"\x01\x01AB")
                          + encode_record(protocol.ABORT_REQUEST, 1))
    assert events == [Abort(1)]
    # Nothing of the dropped request leaks into the next one.
    assert conn.receive(request_bytes({b"C": b"D"})) == [Request(1, False, {b"C": b"D"}, b"",
                                                                 False)]


def test_abort_after_the_request_was_handed_out() -> None:
    conn = connection()
    events = conn.receive(request_bytes({}, request_id=4)
                          + encode_record(protocol.ABORT_REQUEST, 4))
    assert events == [Request(4, False, {}, b"", False), Abort(4, handed_out=True)]


# --- maxpost ---------------------------------------------------------------------------------

def test_body_of_exactly_maxpost_is_kept() -> None:
    (request,) = connection(maxpost=10).receive(request_bytes({}, b"x" * 10, body_chunk=3))
    assert request.body == b"x" * 10 and not request.body_too_large


def test_body_over_maxpost_is_dropped() -> None:
    (request,) = connection(maxpost=10).receive(request_bytes({}, b"x" * 11, body_chunk=3))
    assert request.body == b"" and request.body_too_large


def test_content_length_over_maxpost_drops_the_body() -> None:
    (request,) = connection(maxpost=10).receive(
        request_bytes({b"CONTENT_LENGTH": b"11"}, b"x" * 5))
    assert request.body == b"" and request.body_too_large


@pytest.mark.parametrize("content_length", [b"", b"10", b"junk"])
def test_content_length_within_maxpost_or_malformed_is_not_trusted(content_length: bytes) -> None:
    (request,) = connection(maxpost=10).receive(
        request_bytes({b"CONTENT_LENGTH": content_length}, b"x" * 4))
    assert request.body == b"x" * 4 and not request.body_too_large


@pytest.mark.parametrize("announce", [True, False], ids=["CONTENT_LENGTH", "actual-bytes"])
def test_body_over_maxpost_streams_through_in_bounded_memory(announce: bool) -> None:
    total = 10 * 1024 * 1024
    params = {b"CONTENT_LENGTH": str(total).encode()} if announce else {}
    record = encode_record(protocol.STDIN, 1, b"z" * 65528)  # 65536 bytes, no padding
    # 40000-byte reads cut records at ever different places.
    reads = [record[:40000], record[40000:]]
    conn = connection(maxpost=64 * 1024)
    assert conn.receive(begin() + stream(protocol.PARAMS, 1, encode_pairs(params.items()))) == []
    tracemalloc.start()
    try:
        for _ in range(total // 65528 + 1):
            for read in reads:
                assert conn.receive(read) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024
    (request,) = conn.receive(encode_record(protocol.STDIN, 1))
    assert request.body == b"" and request.body_too_large


# --- malformed input --------------------------------------------------------------------------

def protocol_error(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        connection().receive(data)


def test_unknown_version() -> None:
    protocol_error(b"\x02" + begin()[1:], "unknown FastCGI version 2")


def test_unknown_version_is_seen_before_the_record_is_complete() -> None:
    protocol_error(b"\x00\x01\x00\x01\xff\xff\x00\x00", "unknown FastCGI version 0")


def test_record_for_a_request_that_is_not_active() -> None:
    protocol_error(stream(protocol.PARAMS, 3, b"\x01\x01AB"),
                   "record for request 3 which is not active")
    protocol_error(encode_record(protocol.ABORT_REQUEST, 3),
                   "record for request 3 which is not active")


def test_record_after_the_request_was_handed_out() -> None:
    protocol_error(request_bytes({}) + encode_record(protocol.STDIN, 1, b"late"),
                   "record for request 1 which is not active")


def test_params_after_the_end_of_params() -> None:
    protocol_error(begin() + stream(protocol.PARAMS, 1, b"")
                   + encode_record(protocol.PARAMS, 1, b"x"),
                   "PARAMS record after the end of PARAMS")


def test_stdin_after_the_end_of_stdin() -> None:
    protocol_error(begin() + stream(protocol.STDIN, 1, b"")
                   + encode_record(protocol.STDIN, 1, b"x"), "STDIN record after the end of STDIN")


def test_second_begin_for_the_active_request() -> None:
    protocol_error(begin() + begin(), "BEGIN_REQUEST for request 1 which is already active")


def test_begin_request_body_of_the_wrong_size() -> None:
    protocol_error(encode_record(protocol.BEGIN_REQUEST, 1, b"\0\1\0"),
                   "BEGIN_REQUEST body of 3 bytes")


def test_output_record_types_from_the_web_server() -> None:
    protocol_error(begin() + encode_record(protocol.STDOUT, 1, b"x"),
                   "unexpected STDOUT record for request 1")


def test_params_over_max_params_are_answered_not_an_error() -> None:
    pairs = encode_pairs([(b"BIG", b"v" * 65600)])
    conn = connection(max_params=65536)
    (request,) = conn.receive(begin() + stream(protocol.PARAMS, 1, pairs)
                              + stream(protocol.STDIN, 1, b"body"))
    assert request == Request(1, False, {}, b"", True, len(pairs))
    assert conn.between_requests


def test_params_of_exactly_64_kib_are_accepted() -> None:
    value = b"v" * (65536 - 1 - 4 - 3)  # 1 + 4 length bytes, a 3-byte name; two records
    pairs = encode_pairs([(b"BIG", value)])
    assert len(pairs) == 65536
    (request,) = connection().receive(request_bytes({b"BIG": value}))
    assert request.params == {b"BIG": value}


@pytest.mark.parametrize("pairs, match", [
    (b"\x05\x01AB", "truncated name-value pair"),
    (b"\x01", "truncated name-value pair"),
    (b"\x80\x00", "truncated name-value pair"),
    (b"\x80\x00\x10\x00\x01abc", "truncated name-value pair"),  # 4-byte length past the data
    (b"\x01\x80\x00\x00\x05AB", "truncated name-value pair"),
])
def test_malformed_pairs(pairs: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_pairs(pairs)
    protocol_error(request_bytes({}).replace(stream(protocol.PARAMS, 1, b""),
                                             stream(protocol.PARAMS, 1, pairs)), match)


def test_pair_that_runs_into_the_next_record_is_truncated() -> None:
    # The PARAMS record ends inside a pair; the bytes that follow belong to other records.
    protocol_error(begin() + encode_record(protocol.PARAMS, 1, b"\x01\x05AB")
                   + encode_record(protocol.PARAMS, 1) + stream(protocol.STDIN, 1, b"xyzzy"),
                   "truncated name-value pair")


# --- properties ---------------------------------------------------------------------------------

names = st.binary(min_size=1, max_size=140)
values = st.one_of(st.binary(max_size=20), st.binary(min_size=120, max_size=400))
params_strategy = st.dictionaries(names, values, max_size=8)


@st.composite
def requests(draw: st.DrawFn) -> tuple:
    """One valid request: its bytes (cut into records of random sizes) and the Request it is."""
    request_id = draw(st.integers(1, 0xFFFF))
    params = draw(params_strategy)
    body = draw(st.binary(max_size=300))
    keep_conn = draw(st.booleans())
    params_chunk = draw(st.integers(1, 300))
    body_chunk = draw(st.integers(1, 300))
    data = request_bytes(params, body, request_id, keep_conn, params_chunk, body_chunk)
    return data, Request(request_id, keep_conn, params, body, False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=4), st.data())
def test_any_split_of_the_input_gives_the_same_events(batch: list, data: st.DataObject) -> None:
    stream_bytes = b"".join(encoded for encoded, _ in batch)
    expected = [request for _, request in batch]
    assert connection().receive(stream_bytes) == expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream_bytes)), max_size=30)))
    conn = connection()
    events = []
    for start, end in zip([0] + cuts, cuts + [len(stream_bytes)]):
        events += conn.receive(stream_bytes[start:end])
    assert events == expected


@settings(max_examples=40, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=3))
def test_byte_by_byte_input_gives_the_same_events(batch: list) -> None:
    conn = connection()
    events = []
    for encoded, _ in batch:
        for index in range(len(encoded)):
            events += conn.receive(encoded[index:index + 1])
    assert events == [request for _, request in batch]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=300)), max_size=10))
def test_pairs_round_trip(pairs: list) -> None:
    assert decode_pairs(encode_pairs(pairs)) == dict(pairs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_fuzz_only_protocol_errors_or_events(noise: bytes, after_a_valid_header: bool) -> None:
    data = (begin() + noise) if after_a_valid_header else noise
    try:
        events = connection().receive(data)
    except ProtocolError:
        return
    assert all(isinstance(event, (Request, Abort, Reply)) for event in events)


@settings(max_examples=300, deadline=None)
@given(requests(), st.data())
def test_fuzz_corrupted_requests(request: tuple, data: st.DataObject) -> None:
    encoded = bytearray(request[0])
    for _ in range(data.draw(st.integers(1, 4))):
        encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
    try:
        events = connection().receive(bytes(encoded))
    except ProtocolError:
        return
    assert all(isinstance(event, (Request, Abort, Reply)) for event in events)


def test_between_requests_is_false_while_a_request_or_record_is_half_read() -> None:
    conn = connection()
    assert conn.between_requests
    conn.receive(begin(1))
    assert not conn.between_requests
    conn.receive(encode_record(protocol.PARAMS, 1) + encode_record(protocol.STDIN, 1)[:5])
    assert not conn.between_requests
    conn.receive(encode_record(protocol.STDIN, 1)[5:])
    assert conn.between_requests


# --- request limits ------------------------------------------------------------------------

def test_pairs_are_not_counted_only_their_bytes() -> None:
    many = {b"HTTP_X_%d" % number: b"v" for number in range(5000)}  # nginx sends ~1000 fine
    (request,) = connection().receive(request_bytes(many, params_chunk=7))
    assert request.params == many and request.params_overflow == 0


@pytest.mark.parametrize("chunk", [65535, 1000, 7])
def test_params_of_exactly_max_params_are_taken_one_byte_more_are_dropped(chunk: int) -> None:
    at_limit = encode_pairs([(b"A", b"x" * (4096 - 6))])  # 1 + 4 length bytes + name
    assert len(at_limit) == 4096
    conn = connection(max_params=4096)
    (request,) = conn.receive(begin() + stream(protocol.PARAMS, 1, at_limit, chunk)
                              + stream(protocol.STDIN, 1, b""))
    assert request.params == {b"A": b"x" * 4090} and request.params_overflow == 0
    over = at_limit + b"\x01\x00B"
    (request,) = conn.receive(begin() + stream(protocol.PARAMS, 1, over, chunk)
                              + stream(protocol.STDIN, 1, b"x" * 10, 3))
    assert (request.params, request.body, request.params_overflow) == ({}, b"", len(over))


@given(st.data())
def test_a_request_over_max_params_split_anywhere_then_the_next_request(data) -> None:
    over = request_bytes({b"A": b"x" * 5000}, body=b"dropped", keep_conn=True, params_chunk=999)
    good = request_bytes({b"B": b"2"}, body=b"kept", request_id=1)
    stream_bytes = over + good
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream_bytes)), max_size=6)))
    conn = connection(max_params=2048)
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(stream_bytes)]):
        events += conn.receive(stream_bytes[start:end])
    assert [event.params_overflow for event in events] == [5006, 0]
    assert (events[0].params, events[0].body) == ({}, b"")
    assert (events[1].params, events[1].body) == ({b"B": b"2"}, b"kept")


@pytest.mark.parametrize("bad_header", [
    bytes([0, protocol.BEGIN_REQUEST, 0, 1, 0, 8, 0, 0]),    # version 0
    bytes([2, protocol.BEGIN_REQUEST, 0, 1, 0, 8, 0, 0]),    # version 2
    bytes([1, protocol.BEGIN_REQUEST, 0, 1, 0, 9, 7, 0]),    # BEGIN_REQUEST body of 9
    bytes([1, protocol.STDIN, 0, 7, 0, 0, 0, 0]),            # STDIN of no active request
    bytes([1, protocol.END_REQUEST, 0, 1, 0, 8, 0, 0]),      # END_REQUEST from the client
])
def test_malformed_records_are_protocol_errors(bad_header: bytes) -> None:
    data = bad_header + b"\0" * (bad_header[5] + bad_header[6])
    with pytest.raises(ProtocolError):
        connection().receive(data)


def test_an_absurd_long_length_in_a_pair_is_a_protocol_error_not_an_allocation() -> None:
    pair = b"\xff\xff\xff\xff\x01" + b"N" + b"v"  # name length 2**31 - 1
    with pytest.raises(ProtocolError, match="truncated name-value pair"):
        decode_pairs(pair)


def test_a_body_over_maxpost_in_many_records_is_drained_in_bounded_memory() -> None:
    conn = connection(maxpost=1000)
    conn.receive(begin(1) + stream(protocol.PARAMS, 1, encode_pairs([(b"A", b"b")])))
    record = encode_record(protocol.STDIN, 1, b"z" * 65535)
    tracemalloc.start()
    try:
        for _ in range(64):  # 4 MiB
            assert conn.receive(record) == []
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 200_000
    (request,) = conn.receive(encode_record(protocol.STDIN, 1))
    assert request.body == b"" and request.body_too_large


@pytest.mark.parametrize("size", [0, 1, 7, 8, 65535, 65536, 200_000])
def test_response_records_are_stdout_records_then_end_request(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert protocol.response_records(5, data) == (protocol.stdout_records(5, data)
                                                  + protocol.end_request(5))


# --- the web server's side: requests out -----------------------------------------------------

def test_begin_request_names_the_role_and_keep_conn() -> None:
    assert begin_request(0x0102) == header(protocol.BEGIN_REQUEST, 0x0102, 8, 0) + bytes(
        [0, 1, 0, 0, 0, 0, 0, 0])
    assert begin_request(3, keep_conn=True, role=protocol.FILTER) == (
        header(protocol.BEGIN_REQUEST, 3, 8, 0) + bytes([0, 3, 1, 0, 0, 0, 0, 0]))


def test_stream_records_end_with_an_empty_record() -> None:
    assert stream_records(protocol.STDIN, 1, b"") == header(protocol.STDIN, 1, 0, 0)
    assert stream_records(protocol.PARAMS, 2, b"abc") == (
        header(protocol.PARAMS, 2, 3, 5) + b"abc" + b"\0" * 5 + header(protocol.PARAMS, 2, 0, 0))


def test_stream_records_split_at_the_record_limit() -> None:
    data = bytes(range(256)) * 256 + b"tail"  # 65540 bytes: 65535 + 5
    assert stream_records(protocol.STDIN, 9, data) == (
        header(protocol.STDIN, 9, 65535, 1) + data[:65535] + b"\0"
        + header(protocol.STDIN, 9, 5, 3) + data[65535:] + b"\0" * 3
        + header(protocol.STDIN, 9, 0, 0))
    assert stream_records(protocol.STDIN, 9, b"abcde", chunk=2) == (
        header(protocol.STDIN, 9, 2, 6) + b"ab" + b"\0" * 6
        + header(protocol.STDIN, 9, 2, 6) + b"cd" + b"\0" * 6
        + header(protocol.STDIN, 9, 1, 7) + b"e" + b"\0" * 7 + header(protocol.STDIN, 9, 0, 0))


def test_request_records_is_begin_params_stdin_as_nginx_sends_them() -> None:
    assert protocol.request_records(1, {b"A": b"bc"}, b"body", keep_conn=True) == (
        header(protocol.BEGIN_REQUEST, 1, 8, 0) + b"\0\x01\x01\0\0\0\0\0"
        + header(protocol.PARAMS, 1, 5, 3) + b"\x01\x02Abc\0\0\0"
        + header(protocol.PARAMS, 1, 0, 0)
        + header(protocol.STDIN, 1, 4, 4) + b"body\0\0\0\0"
        + header(protocol.STDIN, 1, 0, 0))
    # Pairs in order, a repeated name included (a dict cannot hold one).
    assert protocol.request_records(1, [(b"A", b"1"), (b"A", b"2")]) == (
        begin_request(1) + stream_records(protocol.PARAMS, 1, b"\x01\x01A1\x01\x01A2")
        + stream_records(protocol.STDIN, 1, b""))


@settings(max_examples=60, deadline=None)
@given(params_strategy, st.binary(min_size=1, max_size=300), st.booleans(),
       st.integers(1, 0xFFFF), st.booleans())
def test_request_records_are_read_back_as_the_request(params: dict, body: bytes,
                                                      over_a_record: bool, request_id: int,
                                                      keep_conn: bool) -> None:
    if over_a_record:
        body *= 65536 // len(body) + 1
    data = protocol.request_records(request_id, params, body, keep_conn)
    assert connection().receive(data) == [Request(request_id, keep_conn, params, body, False)]


def test_params_over_the_record_limit_are_split() -> None:
    params = {b"BIG": b"v" * 70000}
    data = protocol.request_records(1, params)
    assert data.count(header(protocol.PARAMS, 1, 65535, 1)) == 1
    assert connection().receive(data) == [Request(1, False, params, b"", False)]


# --- the web server's side: answers in ------------------------------------------------------

def test_response_reader_gives_stdout_then_the_end() -> None:
    reader = protocol.ResponseReader()
    events = reader.receive(protocol.response_records(4, b"Status: 200 OK\r\n\r\nhi"))
    assert events == [protocol.Stdout(4, b"Status: 200 OK\r\n\r\nhi"), protocol.EndRequest(4)]
    assert reader.pending == 0


def test_response_reader_reads_stderr_statuses_and_management_records() -> None:
    data = (header(protocol.STDERR, 2, 3, 5) + b"oops\0\0\0\0"[:8]
            + header(protocol.STDERR, 2, 0, 0)
            + header(protocol.END_REQUEST, 2, 8, 0) + b"\x01\x02\x03\x04\x02\0\0\0"
            + header(protocol.GET_VALUES_RESULT, 0, 18, 6) + b"\x0f\x01FCGI_MPXS_CONNS0"
            + b"\0" * 6
            + header(protocol.UNKNOWN_TYPE, 0, 8, 0) + b"\x0c" + b"\0" * 7)
    assert protocol.ResponseReader().receive(data) == [
        protocol.Stderr(2, b"oop"),
        protocol.EndRequest(2, app_status=0x01020304, protocol_status=protocol.OVERLOADED),
        protocol.Values({b"FCGI_MPXS_CONNS": b"0"}),
        protocol.UnknownType(12)]


def test_response_reader_holds_a_record_until_it_is_complete() -> None:
    reader = protocol.ResponseReader()
    data = stdout_records(1, b"hello")
    assert reader.receive(data[:7]) == [] and reader.pending == 7
    assert reader.receive(data[7:12]) == [] and reader.pending == 12
    assert reader.receive(data[12:]) == [protocol.Stdout(1, b"hello")]
    assert reader.pending == 0


def test_response_reader_reads_on_after_end_request_on_a_kept_connection() -> None:
    data = protocol.response_records(1, b"one") + protocol.response_records(1, b"two")
    assert protocol.ResponseReader().receive(data) == [
        protocol.Stdout(1, b"one"), protocol.EndRequest(1),
        protocol.Stdout(1, b"two"), protocol.EndRequest(1)]


@pytest.mark.parametrize("data, match", [
    (b"\x02" + end_request(1)[1:], "unknown FastCGI version 2"),
    (header(protocol.END_REQUEST, 1, 4, 4) + b"\0" * 8, "END_REQUEST body of 4 bytes"),
    (header(protocol.UNKNOWN_TYPE, 0, 1, 7) + b"\0" * 8, "UNKNOWN_TYPE body of 1 bytes"),
    (begin_request(1), "unexpected BEGIN_REQUEST record for request 1 from the application"),
    (encode_record(protocol.GET_VALUES_RESULT, 3), "unexpected GET_VALUES_RESULT record"),
    (encode_record(200, 1, b"x"), "unexpected type 200 record"),
])
def test_response_reader_refuses_what_an_application_must_not_send(data: bytes,
                                                                   match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.ResponseReader().receive(data)


@st.composite
def answers(draw: st.DrawFn) -> tuple:
    """One answer as an application sends it: its bytes and the events they are."""
    request_id = draw(st.integers(1, 0xFFFF))
    data, events = [], []
    for to_stderr, content in draw(st.lists(st.tuples(st.booleans(), st.binary(max_size=40)),
                                            max_size=6)):
        kind = protocol.Stderr if to_stderr else protocol.Stdout
        data.append(encode_record(kind.record_type, request_id, content))
        if content:
            events.append(kind(request_id, content))
    body = draw(st.binary(max_size=300))
    app_status = draw(st.integers(0, 0xFFFFFFFF))
    protocol_status = draw(st.sampled_from([protocol.REQUEST_COMPLETE, protocol.OVERLOADED]))
    data += [stdout_records(request_id, body), end_request(request_id, app_status,
                                                           protocol_status)]
    events += [protocol.Stdout(request_id, body)] if body else []
    events.append(protocol.EndRequest(request_id, app_status, protocol_status))
    return b"".join(data), events


@settings(max_examples=100, deadline=None)
@given(st.lists(answers(), min_size=1, max_size=3), st.data())
def test_any_split_of_the_answers_gives_the_same_events(batch: list, data: st.DataObject) -> None:
    stream_bytes = b"".join(encoded for encoded, _ in batch)
    expected = [event for _, events in batch for event in events]
    assert protocol.ResponseReader().receive(stream_bytes) == expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream_bytes)), max_size=30)))
    reader = protocol.ResponseReader()
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(stream_bytes)]):
        events += reader.receive(stream_bytes[start:end])
    assert events == expected and reader.pending == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(answers(), min_size=1, max_size=3))
def test_byte_by_byte_answers_give_the_same_events(batch: list) -> None:
    stream_bytes = b"".join(encoded for encoded, _ in batch)
    reader = protocol.ResponseReader()
    events = []
    for index in range(len(stream_bytes)):
        events += reader.receive(stream_bytes[index:index + 1])
    assert events == [event for _, events in batch for event in events]
    assert reader.pending == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_response_reader_only_protocol_errors_or_events(noise: bytes) -> None:
    try:
        events = protocol.ResponseReader().receive(noise)
    except ProtocolError:
        return
    assert all(isinstance(event, (protocol.Stdout, protocol.Stderr, protocol.EndRequest,
                                  protocol.Values, protocol.UnknownType)) for event in events)
