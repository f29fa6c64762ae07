"""The Python side of the luafcgid2 ``Session`` global: what ``session.lua`` calls.

One bridge per worker process, shared by its states. Lua hands over plain strings
(the values already encoded by ``session.lua``); every call returns a Lua-friendly
answer and never raises into Lua: a store failure comes back as ``(None, message)``
and ``session.lua`` turns it into a Lua error in the script, so the request gets a
500 with a log line naming the script and the store.

The store is opened on the first call (in the worker, after the fork), so a server
whose scripts never use ``Session`` never touches it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from luafcgid.log import log
from luafcgid.sessions import Identity, Store, StoreError, open_store


class SessionBridge:
    """The session store as ``session.lua`` sees it (one per worker process)."""

    def __init__(self, settings: Any) -> None:
        self._url = settings.session_store
        self._session_settings = settings.session
        self._store: Optional[Store] = None

    def _opened(self) -> Store:
        store = self._store
        if store is None:
            store = self._store = open_store(self._url, self._session_settings)
        return store

    def open(self, key: bytes, address: bytes, agent: bytes, language: bytes,
             out: Any) -> Any:
        """True and ``out`` filled with realm, name, value, realm, ... when the session
        is there for this client; False when not."""
        found = self._opened().open(key.decode("latin-1"), Identity(address, agent, language))
        if found is None:
            return False
        index = 0
        for variable in found:
            for part in variable:
                index += 1
                out[index] = bytes(part)
        return True

    def create(self, address: bytes, agent: bytes, language: bytes) -> bytes:
        """The key of a new session, as bytes."""
        return self._opened().create(Identity(address, agent, language)).encode("latin-1")

    def set(self, key: bytes, realm: bytes, name: bytes, value: Optional[bytes]) -> bool:
        return self._opened().set(key.decode("latin-1"), realm, name, value)

    def clear(self, key: bytes, realm: Optional[bytes]) -> bool:
        self._opened().clear(key.decode("latin-1"), realm)
        return True

    def delete(self, key: bytes) -> bool:
        self._opened().delete(key.decode("latin-1"))
        return True

    def lua_functions(self) -> dict:
        """What ``session.lua`` gets: each call with store failures as ``nil, message``."""
        return {name.encode(): _failure_as_answer(getattr(self, name))
                for name in ("open", "create", "set", "clear", "delete")}

    def sweep(self) -> int:
        """Heartbeat work: remove expired sessions (only once this worker used the store)."""
        if self._store is None:
            return 0
        try:
            return self._store.sweep()
        except StoreError as error:
            log.warning("expired sessions not removed: %s", error)
            return 0

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def _failure_as_answer(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` as Lua calls it: a StoreError comes back as ``None, message``
    (a Python exception raised into Lua would abort the handler with a Python object)."""
    @functools.wraps(method)
    def call(*args: Any) -> Any:
        try:
            return method(*args)
        except StoreError as error:
            return None, str(error)
    return call
