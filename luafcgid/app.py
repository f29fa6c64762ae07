"""From a complete FastCGI request to the CGI output that answers it.

This is the seam between the process side (workers/) and the Lua side (lua/):
it finds the script a request names, refuses what SPEC §4 refuses, takes a Lua
state from the cache, runs the handler and maps every failure to its answer.

Requests whose SCRIPT_NAME is the config's ``ping_path`` or ``status_path`` are
answered here before any script is looked for (php-fpm's ``ping.path`` and
``pm.status_path``): ``pong``, or the pool's figures (luafcgid.status) as text,
``?json`` or ``?openmetrics``.
"""

from __future__ import annotations

import itertools
import os
import stat
from typing import Callable, Dict, Optional

from luafcgid import privileges, status
from luafcgid.config import Settings
from luafcgid.log import log
from luafcgid.lua import ScriptError, StateCache
from luafcgid.lua import runtime as lua_runtime
from luafcgid.protocol import Request
from luafcgid.response import error_page


class Refusal(Exception):
    """The request names a script we will not run: ``code`` is the HTTP answer."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def prepare_worker_process(settings: Settings) -> None:
    """Once per worker process, before its :class:`Application`: Lua C modules then link
    against the configured Lua (lua/runtime.py says why only worker processes do this)."""
    lua_runtime.link_globally(settings.lua)


class Application:
    """Runs requests on one worker process's Lua states."""

    def __init__(self, settings: Settings, worker_number: int = 1) -> None:
        self.settings = settings
        self.cache = StateCache(settings, worker_number)
        self.extensions = tuple(settings.extensions)
        # SCRIPT_FILENAME → real path, for scripts that passed the checks and were regular
        # files when last looked at. The worker empties it every second (forget_paths), so
        # a deleted script, a moved symlink or a changed root is seen within a second
        # without a stat per request (the stat was a third of a request's system calls).
        self.real_paths: dict[bytes, str] = {}
        # Requests taken so far; next() on a count is atomic, so threads lose no increment.
        self.requests = 0
        self._numbers = itertools.count(1)
        # SCRIPT_NAME → the server's own answer; None (one attribute check per request)
        # when neither ping_path nor status_path is set.
        answers: Dict[bytes, Callable[[Request], bytes]] = {}
        if settings.ping_path:
            answers[settings.ping_path.encode()] = self.pong
        if settings.status_path:
            answers[settings.status_path.encode()] = self.status_page
        self.own_answers: Optional[Dict[bytes, Callable[[Request], bytes]]] = answers or None
        # This worker's figures now, for the status page; the worker process sets its own
        # (which knows its busy threads) when it starts serving.
        self.live_figures: Callable[[], dict] = self.figures
        # The running config file is never a script: in a document root, nginx would
        # hand it over like any .lua file (examples/config.lua sits beside the examples).
        self.config_file = os.path.realpath(settings.path) if settings.path else None
        self.user = privileges.user_name()  # for "permission denied for user ..." lines

    def handle(self, request: Request, sink: Callable[[bytes], None], thread_number: int) -> bytes:
        """CGI output (head and body) still to send for ``request``.

        ``sink`` receives output the script flushes before it returns.
        """
        self.requests = next(self._numbers)
        params = request.params
        if self.own_answers is not None:
            answer = self.own_answers.get(params.get(b"SCRIPT_NAME"))
            if answer is not None:
                return answer(request)
        filename = params.get(b"SCRIPT_FILENAME")
        if not filename:
            log.error("request without SCRIPT_FILENAME: add "
                      "'fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;' "
                      "to the web server's config")
            return self.error(500, "no script")
        try:
            script = self.resolve(filename)
        except Refusal as refusal:
            log.info("%s: %s (%d)", os.fsdecode(filename), refusal.reason, refusal.code)
            return self.error(refusal.code, "")
        if request.body_too_large:
            log.warning("%s: request body over maxpost (%d bytes), answered 413; raise maxpost "
                        "in the config if such bodies are expected", script, self.settings.maxpost)
            return self.error(413, "")
        return self.run(script, request, sink, thread_number)

    def run(self, script: str, request: Request, sink: Callable[[bytes], None],
            thread_number: int) -> bytes:
        try:
            # bytes as sent: decoded only when a state is loaded, not per request
            state = self.cache.acquire(script, request.params.get(b"DOCUMENT_ROOT", b""))
        except ScriptError as failure:
            if not os.path.isfile(script):  # deleted since it was last looked at
                self.real_paths.clear()
                log.info("%s: script not found (404)", script)
                return self.error(404, "")
            return self.script_failed(failure, "loading")
        try:
            return state.run(request.params, request.body, sink, thread_number)
        except ScriptError as failure:
            return self.script_failed(failure, "running")
        finally:
            self.cache.release(state)

    def resolve(self, filename: bytes) -> str:
        """The real path of the script ``filename`` names, or :class:`Refusal`."""
        real = self.real_paths.get(filename)
        if real is not None:
            return real
        real = self.check(filename)
        try:
            mode = os.stat(real).st_mode
        except PermissionError:
            raise Refusal(403, f"permission denied for user {self.user}: a directory on the "
                          "way cannot be entered") from None
        except OSError:
            raise Refusal(404, "script not found") from None
        if not stat.S_ISREG(mode):
            raise Refusal(404, "not a regular file")
        if not os.access(real, os.R_OK):
            raise Refusal(403, f"permission denied for user {self.user}: cannot read it")
        # Only scripts that exist: made-up names must not fill the cache.
        self.real_paths[filename] = real
        return real

    def forget_paths(self) -> None:
        """Look at every script's path and file again at its next request (every second)."""
        self.real_paths.clear()

    def check(self, filename: bytes) -> str:
        """Refuse names outside ``extensions`` or ``root``; return the real path."""
        if b"\0" in filename:
            raise Refusal(404, "script name contains a NUL byte")
        name = os.fsdecode(filename)
        if not name.endswith(self.extensions):
            raise Refusal(403, f"extension not in extensions {list(self.extensions)}")
        real = os.path.realpath(name)
        if not real.endswith(self.extensions):
            raise Refusal(403, f"resolves to {real}, whose extension is not allowed")
        root = self.settings.root
        if root and not (real == root or real.startswith(root.rstrip("/") + "/")):
            raise Refusal(403, f"resolves to {real}, outside root {root}")
        if real == self.config_file:
            raise Refusal(403, "is the server's config file, never run as a script")
        return real

    def script_failed(self, failure: ScriptError, stage: str) -> bytes:
        advice = lua_runtime.advice(failure.message, self.settings.lua)
        # One entry: the message, then advice and traceback when there are any (a syntax
        # error has no traceback: no blank line after it).
        details = "".join(f"\n{part.rstrip()}" for part in (advice, failure.traceback) if part)
        log.error("%s: error %s the script: %s%s", failure.script, stage, failure.message,
                  details)
        if failure.flushed:
            return b""  # the client already has part of the answer: the stream just ends
        detail = failure.message if self.settings.showerrors else ""
        return self.error(500, detail)

    def error(self, code: int, detail: str) -> bytes:
        return error_page(code, self.settings.headers, detail)

    def pong(self, request: Request) -> bytes:
        return self.own_page("text/plain", b"pong")

    def status_page(self, request: Request) -> bytes:
        form = request.params.get(b"QUERY_STRING", b"").decode("latin-1")
        if form not in status.FORMS:
            return self.error(400, f"ask for {self.settings.status_path}, ?json or ?openmetrics")
        content_type, render = status.FORMS[form]
        snapshot = status.read_snapshot(self.settings)
        if snapshot and snapshot.get("pid") != os.getppid():
            snapshot = None  # left by a master that was killed: not ours
        figures = status.build(self.settings, snapshot, self.live_figures())
        return self.own_page(content_type, render(figures).encode())

    def own_page(self, content_type: str, body: bytes) -> bytes:
        """A 200 answer of the server's own (never cached: the figures change)."""
        return (b"Status: 200 OK\r\nContent-Type: " + content_type.encode() + b"\r\n"
                + self.settings.headers + b"Cache-Control: no-store\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    def figures(self) -> dict:
        """What this process alone knows of itself (no worker around it)."""
        return {"pid": os.getpid(), "requests": self.requests, "states": self.states_loaded()}

    def sweep(self) -> int:
        """Heartbeat work: remove expired sessions, drop states whose files changed."""
        self.cache.sessions.sweep()
        return self.cache.sweep()

    def oldest_running(self) -> float:
        """Seconds the longest-running request has run (0 when none)."""
        return self.cache.oldest_running()

    def states_loaded(self) -> int:
        return len(self.cache)

    def close(self) -> None:
        self.cache.close()
        self.cache.sessions.close()

