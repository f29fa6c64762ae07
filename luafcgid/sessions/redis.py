"""Sessions in Redis, shared by every worker of every host that names the same server.

One Redis hash per session, ``luafcgid:session:<key>``, with a key expiry of
``lifetime`` seconds pushed forward on every accepted open and every write, so Redis
drops sessions itself (:meth:`RedisStore.sweep` has nothing to do). The hash holds
the identity in the fields ``@a`` (address), ``@g`` (agent), ``@l`` (language), and
one field per variable: ``v<len(realm)>:<realm><name>``. Identity fields start with
``@`` and variable fields with ``v``, and the realm's length comes first, so any
realm and name bytes map to exactly one field and back.

Round trips per call: open 1 on a miss and 2 on a hit (read the hash; then refresh
identity and expiry), create, set, clear and delete 1 each. Every write that must not
bring a deleted or expired session back to life runs as a small server-side Lua
script that first checks the hash exists, so a write racing an expiry or a delete
stores nothing and says so.

The connection pool is made on first use in the process that uses it (the pid is
noted): a worker never talks over a socket its master or a sibling opened. Short
socket timeouts keep a dead or stuck Redis from holding a Lua thread: a call fails
with :class:`StoreError` within about ``CONNECT_TIMEOUT`` + ``COMMAND_TIMEOUT``.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from luafcgid.sessions import Identity, Store, StoreError, Variable, Weights, new_key

KEY_PREFIX = "luafcgid:session:"
# Seconds to open a TCP connection to Redis, and to wait for one answer.
CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 2.0



def _driver_options() -> dict:
    """redis-py's own version for CLIENT SETINFO, taken once here, at import in the master.

    Left to itself, redis-py reads it from its package metadata on every new connection:
    in a worker that dropped privileges that read (and the lazy ``importlib.metadata``
    imports behind it) fails when the package lives where the workers' user cannot read
    (a venv under /root), and every session call would be a 500.
    """
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py < 7: a plain keyword, when it has CLIENT SETINFO at all
        return {"lib_version": redis.__version__} if redis.VERSION >= (5,) else {}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}


DRIVER_OPTIONS = _driver_options()

ADDRESS, AGENT, LANGUAGE = b"@a", b"@g", b"@l"
VARIABLE = b"v"

# KEYS[1] session; ARGV lifetime, address, agent, language, expected existence (0 or 1).
# Writes the identity and the expiry only when the session exists (open) or does not
# exist yet (create): an open never revives a session deleted since it was read, and
# a create never takes over another session's key.
PUT_IDENTITY = """
if redis.call('EXISTS', KEYS[1]) ~= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], '@a', ARGV[2], '@g', ARGV[3], '@l', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] session; ARGV lifetime, field[, value]: without a value the field is removed.
SET_VARIABLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV == 3 then
    redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
else
    redis.call('HDEL', KEYS[1], ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] session; ARGV prefix: removes every field starting with it.
CLEAR_VARIABLES = """
local prefix = ARGV[1]
local length = #prefix
local removed = 0
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, length) == prefix then
        removed = removed + redis.call('HDEL', KEYS[1], field)
    end
end
return removed
"""


def realm_prefix(realm: bytes) -> bytes:
    """The start of the field of every variable of ``realm``."""
    return b"%s%d:%s" % (VARIABLE, len(realm), realm)


def variable_field(realm: bytes, name: bytes) -> bytes:
    return realm_prefix(realm) + name


def parse_variable(field: bytes, value: bytes) -> Variable:
    """``(realm, name, value)`` of a variable field (one that starts with ``v``)."""
    colon = field.index(b":")
    end = colon + 1 + int(field[1:colon])
    return field[colon + 1:end], field[end:], value


def public_url(url: str) -> str:
    """``url`` without its password (nor a query string, which may carry one)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Connection:
    """One process's client (with its connection pool) and the scripts bound to it."""

    def __init__(self, url: str) -> None:
        self.pid = os.getpid()
        # No retries: they would multiply the time a dead Redis holds a Lua thread (some
        # redis-py versions default to 3 with back-off). A pooled connection that Redis
        # closed is replaced when it is taken from the pool, without a retry.
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0), **DRIVER_OPTIONS)
        self.put_identity = self.client.register_script(PUT_IDENTITY)
        self.set_variable = self.client.register_script(SET_VARIABLE)
        self.clear_variables = self.client.register_script(CLEAR_VARIABLES)


class RedisStore(Store):
    """Sessions in the Redis server at ``url`` (``redis://``, ``rediss://`` or ``unix://``)."""

    def __init__(self, url: str, lifetime: int, weights: Weights, key_length: int) -> None:
        super().__init__(lifetime, weights, key_length)
        self.url = url
        self.name = public_url(url)
        self._connection: Optional[_Connection] = None
        self._lock = threading.Lock()

    def _redis(self) -> _Connection:
        """This process's connection, made on first use (and again after a fork)."""
        connection = self._connection
        if connection is not None and connection.pid == os.getpid():
            return connection
        with self._lock:
            connection = self._connection
            if connection is None or connection.pid != os.getpid():
                try:
                    connection = self._connection = _Connection(self.url)
                except ValueError as error:  # a malformed URL
                    raise StoreError(f"session store {self.name}: {error}; "
                                     "fix session_store in the config") from None
        return connection

    def _failed(self, error: redis.RedisError) -> StoreError:
        if isinstance(error, redis.AuthenticationError):
            hint = "check the user and password in session_store"
        elif isinstance(error, redis.TimeoutError):
            hint = (f"Redis did not answer within {COMMAND_TIMEOUT:g} s; "
                    "check its load and the network")
        elif isinstance(error, redis.ConnectionError):
            hint = "check that Redis is running and reachable there, or set session_store"
        else:
            hint = "see the Redis server's log"
        return StoreError(f"session store {self.name}: {error}; {hint}")

    def _run(self, command: Callable[[_Connection], Any]) -> Any:
        """``command(connection)``, its Redis errors told as :class:`StoreError`."""
        connection = self._redis()
        try:
            return command(connection)
        except redis.RedisError as error:
            raise self._failed(error) from None

    def _put_identity(self, redis_key: str, identity: Identity, exists: bool) -> bool:
        """Write ``identity`` and a fresh expiry when the session's existence is ``exists``."""
        keys, args = [redis_key], (self.lifetime, *identity, int(exists))
        return bool(self._run(lambda connection: connection.put_identity(keys, args)))

    # -- the Store interface ----------------------------------------------------------

    def open(self, key: str, identity: Identity) -> Optional[List[Variable]]:
        redis_key = KEY_PREFIX + key
        fields = self._run(lambda connection: connection.client.hgetall(redis_key))
        if not fields:
            return None
        stored = Identity(fields.get(ADDRESS, b""), fields.get(AGENT, b""),
                          fields.get(LANGUAGE, b""))
        if not self.weights.accepts(stored, identity):
            return None
        if not self._put_identity(redis_key, identity, exists=True):
            return None  # deleted or expired since it was read
        return [parse_variable(field, value) for field, value in fields.items()
                if field[:1] == VARIABLE]

    def create(self, identity: Identity) -> str:
        while True:
            key = new_key(self.key_length)
            if self._put_identity(KEY_PREFIX + key, identity, exists=False):
                return key

    def set(self, key: str, realm: bytes, name: bytes, value: Optional[bytes]) -> bool:
        keys = [KEY_PREFIX + key]
        args: Tuple[Any, ...] = (self.lifetime, variable_field(realm, name))
        if value is not None:
            args += (value,)
        return bool(self._run(lambda connection: connection.set_variable(keys, args)))

    def clear(self, key: str, realm: Optional[bytes]) -> None:
        keys = [KEY_PREFIX + key]
        args = (VARIABLE if realm is None else realm_prefix(realm),)
        self._run(lambda connection: connection.clear_variables(keys, args))

    def delete(self, key: str) -> None:
        redis_key = KEY_PREFIX + key
        self._run(lambda connection: connection.client.delete(redis_key))

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None and connection.pid == os.getpid():
            connection.client.close()
