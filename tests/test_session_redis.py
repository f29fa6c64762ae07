"""RedisStore against a real redis-server on a loopback port: what every host behind one
nginx upstream relies on (luafcgid/sessions/redis.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, Iterator, Tuple

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luafcgid.config import defaults
from luafcgid.sessions import KEY_ALPHABET, Identity, StoreError, Weights, open_store
from luafcgid.sessions.redis import COMMAND_TIMEOUT, CONNECT_TIMEOUT, KEY_PREFIX, RedisStore
from tests import redis_server
from tests.redis_server import RedisServer
from tests.support import wait_until

pytestmark = pytest.mark.slow

WEIGHTS = Weights(target=3, address=3, agent=2, language=1)
ALICE = Identity(b"10.0.0.1", b"Mozilla/5.0 (X11)", b"en-GB")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not redis_server.installed():
        pytest.skip(redis_server.MISSING)
    with RedisServer(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture
def raw(server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client, to look at what the store left in Redis."""
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    opened = RedisStore(server.url, lifetime=60, weights=WEIGHTS, key_length=24)
    yield opened
    opened.close()


def variables(found) -> Dict[Tuple[bytes, bytes], bytes]:
    assert found is not None, "the session was not found"
    return {(realm, name): value for realm, name, value in found}


# -- create, open, set, clear, delete ------------------------------------------------------


def test_create_makes_an_empty_session_with_a_fresh_key(store: RedisStore) -> None:
    key = store.create(ALICE)
    assert len(key) == 24 and set(key) <= set(KEY_ALPHABET)
    assert store.create(ALICE) != key
    assert store.open(key, ALICE) == []


def test_open_of_an_unknown_key_is_none(store: RedisStore, raw: redis.Redis) -> None:
    assert store.open("no-such-session", ALICE) is None
    assert not raw.exists(KEY_PREFIX + "no-such-session")


def test_set_stores_overwrites_and_removes_variables(store: RedisStore) -> None:
    key = store.create(ALICE)
    assert store.set(key, b"auth", b"user", b"salice")
    assert store.set(key, b"auth", b"level", b"i3;")
    assert store.set(key, b"cart", b"items", b"{}")
    assert store.set(key, b"auth", b"level", b"i4;")
    assert variables(store.open(key, ALICE)) == {
        (b"auth", b"user"): b"salice", (b"auth", b"level"): b"i4;", (b"cart", b"items"): b"{}"}
    assert store.set(key, b"auth", b"user", None)
    assert variables(store.open(key, ALICE)) == {
        (b"auth", b"level"): b"i4;", (b"cart", b"items"): b"{}"}


def test_clear_of_a_realm_keeps_the_others_even_when_names_look_alike(
        store: RedisStore) -> None:
    key = store.create(ALICE)
    # Without a length prefix, ("a", "bx") and ("ab", "x") would share a field.
    store.set(key, b"a", b"bx", b"1")
    store.set(key, b"ab", b"x", b"2")
    store.set(key, b"a", b"", b"3")
    store.clear(key, b"a")
    assert variables(store.open(key, ALICE)) == {(b"ab", b"x"): b"2"}


def test_clear_of_every_realm_keeps_the_session(store: RedisStore) -> None:
    key = store.create(ALICE)
    store.set(key, b"auth", b"user", b"1")
    store.set(key, b"cart", b"items", b"2")
    store.clear(key, None)
    assert store.open(key, ALICE) == []
    assert store.set(key, b"auth", b"user", b"again")


def test_delete_removes_the_session(store: RedisStore, raw: redis.Redis) -> None:
    key = store.create(ALICE)
    store.set(key, b"auth", b"user", b"1")
    store.delete(key)
    assert store.open(key, ALICE) is None
    assert not raw.exists(KEY_PREFIX + key)


def test_set_on_a_deleted_session_is_false_and_does_not_revive_it(
        store: RedisStore, raw: redis.Redis) -> None:
    key = store.create(ALICE)
    store.delete(key)
    assert store.set(key, b"auth", b"user", b"1") is False
    assert store.set(key, b"auth", b"user", None) is False
    assert not raw.exists(KEY_PREFIX + key)


def test_clear_and_delete_of_an_unknown_session_do_nothing(
        store: RedisStore, raw: redis.Redis) -> None:
    store.clear("unknown-key", None)
    store.clear("unknown-key", b"auth")
    store.delete("unknown-key")
    assert not raw.exists(KEY_PREFIX + "unknown-key")


BYTES = st.binary(max_size=40) | st.sampled_from(
    [b"", b":", b"v", b"@a", b"0:", b"12:", b"\x00", b"\xff\xfe", b"v1:a"])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(BYTES, BYTES, st.binary(max_size=100)), max_size=8))
def test_any_realm_name_and_value_bytes_round_trip(store: RedisStore, writes) -> None:
    key = store.create(ALICE)
    expected = {}
    for realm, name, value in writes:
        assert store.set(key, realm, name, value)
        expected[(realm, name)] = value
    assert variables(store.open(key, ALICE)) == expected
    if writes:
        realm = writes[0][0]
        store.clear(key, realm)
        assert variables(store.open(key, ALICE)) == {
            pair: value for pair, value in expected.items() if pair[0] != realm}


def test_open_store_names_a_redis_store(server: RedisServer) -> None:
    session_settings = defaults().session
    opened = open_store(server.url, session_settings)
    try:
        assert isinstance(opened, RedisStore)
        assert opened.lifetime == session_settings["SessionTime"]
        key = opened.create(ALICE)
        assert opened.set(key, b"r", b"n", b"v")
        assert variables(opened.open(key, ALICE)) == {(b"r", b"n"): b"v"}
        assert opened.sweep() == 0
    finally:
        opened.close()


def test_round_trips_per_call(store: RedisStore, raw: redis.Redis) -> None:
    key = store.create(ALICE)
    store.set(key, b"r", b"n", b"v")
    store.clear(key, b"r")  # each script is loaded on the server at its first use

    def calls(act) -> Dict[str, int]:
        raw.config_resetstat()
        act()
        stats = raw.info("commandstats")
        return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0)
                for name in ("hgetall", "evalsha", "eval", "script|load")}

    none = {"hgetall": 0, "evalsha": 0, "eval": 0, "script|load": 0}
    assert calls(lambda: store.open("missing", ALICE)) == {**none, "hgetall": 1}
    assert calls(lambda: store.open(key, ALICE)) == {**none, "hgetall": 1, "evalsha": 1}
    assert calls(lambda: store.set(key, b"r", b"n", b"v")) == {**none, "evalsha": 1}
    assert calls(lambda: store.create(ALICE)) == {**none, "evalsha": 1}
    assert calls(lambda: store.clear(key, b"r")) == {**none, "evalsha": 1}


# -- expiry --------------------------------------------------------------------------------


def test_a_session_expires_after_its_lifetime(server: RedisServer, raw: redis.Redis) -> None:
    short = RedisStore(server.url, lifetime=1, weights=WEIGHTS, key_length=24)
    try:
        key = short.create(ALICE)
        assert short.set(key, b"auth", b"user", b"1")
        assert short.open(key, ALICE) is not None
        # Watched from outside: every open would push the expiry forward again.
        wait_until(lambda: not raw.exists(KEY_PREFIX + key), timeout=5,
                   what="the session to expire")
        assert short.open(key, ALICE) is None
        assert short.set(key, b"auth", b"user", b"2") is False
    finally:
        short.close()


def test_open_and_set_push_the_expiry_forward(store: RedisStore, raw: redis.Redis) -> None:
    key = store.create(ALICE)
    redis_key = KEY_PREFIX + key
    assert 55 <= raw.ttl(redis_key) <= 60
    raw.expire(redis_key, 5)
    assert store.open(key, ALICE) is not None
    assert raw.ttl(redis_key) > 50
    raw.expire(redis_key, 5)
    assert store.set(key, b"r", b"n", b"v")
    assert raw.ttl(redis_key) > 50


def test_a_refused_open_neither_refreshes_nor_changes_the_session(
        store: RedisStore, raw: redis.Redis) -> None:
    key = store.create(ALICE)
    redis_key = KEY_PREFIX + key
    raw.expire(redis_key, 30)
    assert store.open(key, Identity(b"10.9.9.9", b"curl/8", b"fr")) is None
    assert raw.ttl(redis_key) <= 30
    assert store.open(key, ALICE) == []


# -- identity (luafcgid2's anti-hijack score) ------------------------------------------------


def test_same_address_is_accepted_whatever_the_browser(store: RedisStore) -> None:
    key = store.create(ALICE)
    assert store.open(key, Identity(ALICE.address, b"curl/8", b"fr")) == []


def test_new_address_with_the_same_browser_is_accepted(store: RedisStore) -> None:
    key = store.create(ALICE)
    assert store.open(key, Identity(b"10.0.0.2", ALICE.agent, ALICE.language)) == []


def test_new_address_and_new_agent_is_refused(store: RedisStore) -> None:
    key = store.create(ALICE)
    store.set(key, b"auth", b"user", b"salice")
    assert store.open(key, Identity(b"10.0.0.2", b"curl/8", ALICE.language)) is None
    assert variables(store.open(key, ALICE)) == {(b"auth", b"user"): b"salice"}


def test_a_target_of_zero_accepts_anyone(server: RedisServer) -> None:
    lenient = RedisStore(server.url, lifetime=60, weights=Weights(0, 3, 2, 1), key_length=24)
    try:
        key = lenient.create(ALICE)
        assert lenient.open(key, Identity(b"192.0.2.1", b"other", b"")) == []
    finally:
        lenient.close()


def test_an_accepted_open_records_the_new_identity(store: RedisStore) -> None:
    key = store.create(ALICE)
    moved = Identity(b"10.0.0.2", ALICE.agent, ALICE.language)
    assert store.open(key, moved) == []
    # Scored against the old identity this client would get 0; against the new one, 3.
    assert store.open(key, Identity(b"10.0.0.2", b"curl/8", b"fr")) == []


# -- sharing: other stores, processes, threads ------------------------------------------------


def test_a_second_store_sees_the_first_ones_writes(server: RedisServer, store: RedisStore) -> None:
    other_host = RedisStore(server.url, lifetime=60, weights=WEIGHTS, key_length=24)
    try:
        key = store.create(ALICE)
        store.set(key, b"auth", b"user", b"salice")
        assert variables(other_host.open(key, ALICE)) == {(b"auth", b"user"): b"salice"}
        other_host.set(key, b"auth", b"user", b"sbob")
        assert variables(store.open(key, ALICE)) == {(b"auth", b"user"): b"sbob"}
        other_host.delete(key)
        assert store.open(key, ALICE) is None
    finally:
        other_host.close()


def hammer(store: RedisStore, key: str, realm: bytes, rounds: int) -> None:
    """Write and read back ``rounds`` values; AssertionError on any wrong answer."""
    for number in range(rounds):
        value = b"%s-%d" % (realm, number)
        assert store.set(key, realm, b"n", value)
        assert variables(store.open(key, ALICE))[(realm, b"n")] == value


def test_a_forked_child_uses_its_own_connections(store: RedisStore) -> None:
    key = store.create(ALICE)
    hammer(store, key, b"parent", 1)  # the parent's pool now holds a connection
    child = os.fork()
    if child == 0:
        code = 1
        try:
            hammer(store, key, b"child", 300)
            code = 0
        finally:
            os._exit(code)
    # Both talk at once: a shared socket would hand one the other's replies.
    hammer(store, key, b"parent", 300)
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert variables(store.open(key, ALICE)) == {
        (b"parent", b"n"): b"parent-299", (b"child", b"n"): b"child-299"}


def test_eight_threads_writing_one_session_all_land(store: RedisStore) -> None:
    key = store.create(ALICE)
    errors = []

    def writer(thread: int) -> None:
        try:
            for number in range(50):
                assert store.set(key, b"t", b"%d.%d" % (thread, number), b"%d" % number)
        except Exception as error:  # reported below: a thread cannot fail the test itself
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert variables(store.open(key, ALICE)) == {
        (b"t", b"%d.%d" % (thread, number)): b"%d" % number
        for thread in range(8) for number in range(50)}


# -- failures ------------------------------------------------------------------------------


def test_the_store_name_hides_the_password() -> None:
    secret = RedisStore("redis://app:s3cret@127.0.0.1:6390/2?password=other", 60, WEIGHTS, 24)
    assert secret.name == "redis://app@127.0.0.1:6390/2"


def test_a_stopped_server_gives_a_store_error_quickly(tmp_path) -> None:
    if not redis_server.installed():
        pytest.skip(redis_server.MISSING)
    server = RedisServer(tmp_path / "redis").start()
    server.process.kill()
    server.process.wait(5)
    # The password in the URL is never sent (nothing answers) and never shown.
    dead = RedisStore(f"redis://:Hunter2@127.0.0.1:{server.port}/0", 60, WEIGHTS, 24)
    started = time.monotonic()
    with pytest.raises(StoreError) as failure:
        dead.open("some-key", ALICE)
    assert time.monotonic() - started < CONNECT_TIMEOUT
    message = str(failure.value)
    assert f"session store redis://127.0.0.1:{server.port}/0:" in message
    assert "Hunter2" not in message
    assert "check that Redis is running" in message
    with pytest.raises(StoreError):
        dead.create(ALICE)
    dead.close()


def test_a_store_in_use_fails_quickly_when_the_server_stops(tmp_path) -> None:
    if not redis_server.installed():
        pytest.skip(redis_server.MISSING)
    server = RedisServer(tmp_path / "redis").start()
    used = RedisStore(server.url, 60, WEIGHTS, 24)
    key = used.create(ALICE)  # a pooled connection, broken by the stop
    server.stop()
    started = time.monotonic()
    with pytest.raises(StoreError, match="check that Redis is running"):
        used.set(key, b"r", b"n", b"v")
    assert time.monotonic() - started < CONNECT_TIMEOUT
    used.close()


def test_a_server_that_stops_answering_gives_a_store_error_within_the_timeout(
        tmp_path) -> None:
    if not redis_server.installed():
        pytest.skip(redis_server.MISSING)
    with RedisServer(tmp_path / "redis") as server:
        stuck = RedisStore(server.url, 60, WEIGHTS, 24)
        key = stuck.create(ALICE)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="did not answer within"):
                stuck.set(key, b"r", b"n", b"v")
            elapsed = time.monotonic() - started
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert COMMAND_TIMEOUT - 0.5 < elapsed < COMMAND_TIMEOUT + 1
        stuck.close()


def test_the_store_reconnects_after_redis_restarts(tmp_path) -> None:
    if not redis_server.installed():
        pytest.skip(redis_server.MISSING)
    first = RedisServer(tmp_path / "first").start()
    survivor = RedisStore(first.url, 60, WEIGHTS, 24)
    try:
        key = survivor.create(ALICE)  # a pooled connection to the first server
        first.stop()
        with RedisServer(tmp_path / "second", port=first.port):
            # Nothing was saved; the stale pooled connection is replaced without an error.
            assert survivor.open(key, ALICE) is None
            assert survivor.open(survivor.create(ALICE), ALICE) == []
    finally:
        survivor.close()
        first.stop()


def test_close_releases_the_connections(server: RedisServer, raw: redis.Redis) -> None:
    def clients() -> int:
        return len(raw.client_list())

    before = clients()
    closing = RedisStore(server.url, 60, WEIGHTS, 24)
    closing.create(ALICE)
    assert clients() == before + 1
    closing.close()
    wait_until(lambda: clients() == before, timeout=5, what="the connection to close")
