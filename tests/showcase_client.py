"""A plain-HTTP client of the showcase (examples/notes.lua), for the tests that drive it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import urlencode

from luafcgid.lua import runtime
from tests.support import Response, http

FORM = "application/x-www-form-urlencoded"


def sqlite_driver_missing(lua: str) -> Optional[str]:
    """Why LuaSQL's SQLite driver cannot load on ``lua``, or None when it can."""
    try:
        runtime.module(lua)
    except runtime.UnknownRuntime as error:
        return f"Lua {lua}: {error}"
    _, cpath = runtime.default_paths(lua)
    if any(Path(entry.replace("?", "luasql/sqlite3")).is_file() for entry in cpath.split(";")):
        return None
    return (f"lua-sql-sqlite3 is not installed (apt-get install lua-sql-sqlite3): no "
            f"luasql/sqlite3.so on the {lua} runtime's cpath {cpath}")


class Visitor:
    """A plain-HTTP client of the board: keeps its session cookie and the page's CSRF token."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie: Optional[str] = None
        self.token: Optional[str] = None

    def _headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        headers = dict(extra or {})
        if self.cookie:
            headers["Cookie"] = self.cookie
        return headers

    def _remember(self, reply: Response) -> Response:
        for value in reply.headers_named("Set-Cookie"):
            pair = value.split(";")[0]
            if pair.startswith("XLuaSession="):
                self.cookie = pair if pair != "XLuaSession=" else None
        found = re.search(rb'name="csrf" value="([0-9a-f]+)"', reply.body)
        if found:
            self.token = found.group(1).decode()
        return reply

    def get(self, path: str = "/notes.lua") -> Response:
        return self._remember(http(self.port, path, headers=self._headers()))

    def post(self, fields: Dict[str, str], token: Optional[str] = "session") -> Response:
        """POST the fields, with the page's token (``token="session"``), another, or none."""
        fields = dict(fields)
        if token == "session":
            token = self.token
        if token is not None:
            fields["csrf"] = token
        reply = http(self.port, "/notes.lua", method="POST", body=urlencode(fields).encode(),
                     headers=self._headers({"Content-Type": FORM}))
        return self._remember(reply)

    def sign_in(self, name: str) -> None:
        self.get()
        reply = self.post({"action": "signin", "name": name})
        assert (reply.status, reply.header("Location")) == (303, "/notes.lua"), reply
        assert b"Signed in as <strong>" in self.get().body

    def notes(self) -> list:
        reply = http(self.port, "/notes.lua?format=json")
        assert reply.header("Content-Type") == "application/json", reply
        return json.loads(reply.body)["notes"]
