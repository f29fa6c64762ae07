"""Lua states in-process: scripts in a directory and a state cache to run them, for the
tests of the script API, its batteries, sessions and the originals' scripts."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from luafcgid.config import from_mapping
from luafcgid.lua import StateCache

RUNTIMES = ["5.4", "5.1", "luajit"]


class LuaSite:
    """Scripts in a directory and a state cache to run them in this process: no server,
    no socket (tests/support.py's Site is the running one)."""

    def __init__(self, root: Path, **settings: object) -> None:
        self.root = root
        self.cache = StateCache(from_mapping(settings), worker_number=3)

    def script(self, source: str, name: str = "page.lua") -> str:
        path = self.root / name
        path.write_text(textwrap.dedent(source))
        return str(path)

    def serve(self, script: str, params: Optional[dict] = None, body: bytes = b"",
              sink: Optional[List[bytes]] = None, thread: int = 1) -> bytes:
        """One request on a state of ``script``; early output goes to ``sink``."""
        env = {b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"GET"}
        env.update(params or {})
        state = self.cache.acquire(script, str(self.root))
        try:
            return state.run(env, body, (sink if sink is not None else []).append, thread)
        finally:
            self.cache.release(state)

    def close(self) -> None:
        self.cache.close()
        self.cache.sessions.close()


def lua_sites(tmp_path: Path, **defaults: object) -> Iterator[Callable[..., LuaSite]]:
    """For a fixture: ``make(lua="5.4", **settings)`` makes a LuaSite on tmp_path (settings
    over ``defaults``); every LuaSite made is closed afterwards."""
    made: List[LuaSite] = []

    def make(lua: str = "5.4", **settings: object) -> LuaSite:
        made.append(LuaSite(tmp_path, lua=lua, **{**defaults, **settings}))
        return made[-1]

    yield make
    for each in made:
        each.close()


def response(body: bytes, status: bytes = b"200 OK", content_type: bytes = b"text/html",
             headers: bytes = b"") -> bytes:
    return head(status, content_type, headers + b"Content-Length: %d\r\n" % len(body)) + body


def head(status: bytes = b"200 OK", content_type: bytes = b"text/html",
         headers: bytes = b"") -> bytes:
    return b"Status: " + status + b"\r\nContent-Type: " + content_type + b"\r\n" + headers + b"\r\n"
