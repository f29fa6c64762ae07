"""Session storage shared by every worker of a host (SQLite) or by every host (Redis).

A session is a random key (the cookie's value), an expiry time, the identity of the
client that last used it (address, user agent, accept-language: luafcgid2's
anti-hijack score) and variables: ``(realm, name) → value``, the value being the
bytes the Lua side encoded (``luafcgid/lua/session.lua``); stores never look inside.

A store is opened lazily in a worker process (after the fork), used by the worker's
threads concurrently, and answers five questions (:class:`Store`). Expiry slides:
every open or write of a session pushes its expiry to now + ``SessionTime``. Expired
sessions are never returned; SQLite removes them on the heartbeat (:meth:`Store.sweep`),
Redis by key expiry.

``session_store`` (config) names the store: ``"sqlite:/path/file.db"`` or
``"redis://host:port/db"`` (config.py turns the default ``"sqlite"`` into a path).
"""

from __future__ import annotations

from typing import Optional, Type

from luafcgid.sessions.base import (
    KEY_ALPHABET,
    Identity,
    Store,
    StoreError,
    Variable,
    Weights,
    new_key,
)

__all__ = ["KEY_ALPHABET", "REDIS_SCHEMES", "Identity", "Store", "StoreError", "Variable",
           "Weights", "new_key", "open_store", "sqlite_path", "sqlite_url", "store_class"]

_SQLITE = "sqlite:"
# The URL schemes redis-py's Redis.from_url takes.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def sqlite_url(path: str) -> str:
    """The store URL of the SQLite file ``path``."""
    return _SQLITE + path


def sqlite_path(url: str) -> Optional[str]:
    """The file a ``sqlite:PATH`` store URL names (``""`` for none); None for another store."""
    return url[len(_SQLITE):] if url.startswith(_SQLITE) else None


def store_class(url: str) -> Type[Store]:
    """The class of the store ``url`` names (``sqlite:PATH`` or ``redis://…``).

    The master calls this before it forks: a worker that dropped privileges may no
    longer be able to read the Python modules a store needs.
    """
    if sqlite_path(url) is not None:
        from luafcgid.sessions.sqlite import SqliteStore
        return SqliteStore
    if url.startswith(REDIS_SCHEMES):
        try:
            from luafcgid.sessions.redis import RedisStore
        except ImportError as error:
            raise StoreError(f"session store {url}: {error}; install the redis package "
                             "(pip install 'luafcgid[redis]')") from None
        return RedisStore
    raise ValueError(f"unknown session store {url!r}")


def open_store(url: str, session_settings: dict) -> Store:
    """The store ``url`` names, not yet connected: connections are made on first use,
    in the process and thread that use them."""
    lifetime = session_settings["SessionTime"]
    weights = Weights.from_settings(session_settings)
    key_length = session_settings["SessionKeyLen"]
    cls = store_class(url)
    path = sqlite_path(url)
    return cls(url if path is None else path, lifetime, weights, key_length)
