"""One Lua state: a ``lupa`` runtime loaded with one script, serving one request at a time.

The per-request logic is Lua (``prelude.lua``), so a request is one call from Python
into Lua. The state holds no Python object that points back at its runtime: the
objects Lua may call (the outlet for early output, the log, the file recorder, the
ThreadData source) reference only plain data, a weak reference to the cache, or the
request's sink while the request runs. A dropped state is thus freed at once by
reference counting, not left to a reference cycle running through Lua.

The watchdog (``timeout``, ``slowlog_timeout``). lupa cannot interrupt a running Lua
call, and calling into a runtime from another thread waits for the handler to return, so
the only thing that can stop a handler is the handler's own state: a Lua hook that runs
the prelude's ``watchdog`` function. Past ``timeout`` it raises, then raises again on every
instruction of the script (so a ``pcall`` loop dies too); the request gets the timeout
:class:`ScriptError` and the state is dropped (its globals may be half-updated). Past
``slowlog_timeout`` it takes ``debug.traceback()`` once, inside the state, for the slow log.

Two ways to have that hook run:

- the compiled watchdog (PUC Lua in a worker process with the speed-ups built:
  ``speedups.c``): a request's main thread runs with no hook at all; once its first moment
  to look has passed, a timer thread signals the OS thread running it and the signal
  handler sets a count hook of 1 on the state (how lua.c stops a script on Ctrl-C:
  ``lua_sethook`` is made to be called from a signal handler). Lua 5.3/5.4 run every
  instruction through the hook dispatcher while any hook is set, so this is what keeps
  CPU-bound code at full speed (docs/design.rst has the figures);
- the count hook (the pure path, LuaJIT, coroutines, and a script's top level as it
  loads): every ``HOOK_COUNT`` instructions it compares ``os.time()`` (whole seconds, a C
  call: no Python, no GIL) with the second of the next moment to look, and only within
  that last second calls the Python clock. It is set on the state's main thread while
  script code runs and on every coroutine as it starts (coroutines do not inherit hooks).
  LuaJIT never runs hooks in compiled code, so its states run with ``jit.off()``, unless
  ``jit = true`` (LuaJIT only; config.py) keeps the JIT on: the hook then fires only while
  code runs interpreted, so a runaway loop once compiled is the master's to end.

What no hook can stop (a long C call such as ``os.execute``, a script that removes the
hook with ``debug.sethook()``) is left to the master, which replaces a worker whose
oldest request (:meth:`StateCache.longest_running`, from :meth:`State.running_for`)
overran ``timeout`` by a margin (``arbiter.py``).
"""

from __future__ import annotations

import functools
import http
import os
import time
from math import log1p
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

from luafcgid.config import ALIASES, KEYS
from luafcgid.log import log
from luafcgid.lua import runtime as lua_runtime
from luafcgid.lua import slowlog
from luafcgid.lua.session import SessionBridge

HERE = Path(__file__).resolve().parent
PRELUDE_PATH = HERE / "prelude.lua"
LUAFCGID_MODULE_PATH = HERE / "luafcgid.lua"
SESSION_PATH = HERE / "session.lua"
# Read once, at import, in the master: workers that dropped privileges may not be able to
# read the installed package (a venv under /root), so they never open these files.
LUA_SOURCES = {path: path.read_bytes() for path in (PRELUDE_PATH, LUAFCGID_MODULE_PATH,
                                                     SESSION_PATH)}

MEMORY_MESSAGE = b"not enough memory"
# Instructions between two watchdog looks: one look is an os.time() call, ~0.1 us.
HOOK_COUNT = 1000

# A document root: DOCUMENT_ROOT as the web server sent it (bytes), or a path.
DocRoot = Union[bytes, str]

# A file's identity on disk; None when it could not be stat'ed.
Signature = Optional[Tuple[int, int, int]]


class ScriptError(Exception):
    """A script failed: at load (syntax / top-level error / startup script) or in the handler
    (runtime error, no handler function, memory cap).

    ``script`` is the script's path, ``message`` the Lua message, ``traceback`` the Lua
    traceback ("" when there is none), ``flushed`` says output already went to the client
    (no clean 500 is possible), ``memory`` says the state exceeded ``state_memory``,
    ``timeout`` that the watchdog stopped it after ``elapsed`` seconds (``timeout``).
    """

    def __init__(self, script: str, message: str, traceback: str = "", *,
                 flushed: bool = False, memory: bool = False,
                 elapsed: Optional[float] = None) -> None:
        super().__init__(f"{script}: {message}")
        self.script = script
        self.message = message
        self.traceback = traceback
        self.flushed = flushed
        self.memory = memory
        self.timeout = elapsed is not None
        self.elapsed = elapsed


def signature(path: str) -> Signature:
    """What changes when a file is edited, replaced or removed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def _lua_data(value: Any) -> Any:
    """Plain Python data with its strings as bytes: Lua strings once converted."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        return {_lua_data(key): _lua_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lua_data(item) for item in value]
    return value


def _visible_config(settings: Any) -> dict:
    """Every name ``con:config(name)`` answers, with ``settings.lookup``'s answer."""
    names = {*settings.script_config, *settings.session, *KEYS, *ALIASES}
    values = {name: settings.lookup(name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


def _no_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    """lupa's attribute filter: Lua never reaches into a Python object."""
    raise AttributeError("Python objects are opaque to luafcgid scripts")


def _note_file(files: List[Tuple[str, Signature]], path: bytes) -> None:
    """Record a Lua file a state is about to load (stat first: a later edit is then seen)."""
    name = os.fsdecode(path)
    files.append((name, signature(name)))


def _script_log(script: str, line: bytes) -> None:
    text = line.decode("utf-8", "replace").replace("\r", "\\r").replace("\n", "\\n")
    log.info("%s: %s", script, text)


def _script_warning(script: str, line: bytes) -> None:
    log.warning("%s: %s", script, line.decode("utf-8", "replace"))


class Blueprint:
    """What every state of one worker has in common, converted for Lua once.

    ``sessions`` is the worker's session store as the ``Session`` global reaches it: the
    application's (which sweeps and closes it), or one of its own when none is given (a
    cache used alone, as in tests). The slow log is the application's to open.
    """

    def __init__(self, settings: Any, worker_number: int,
                 sessions: Optional[SessionBridge] = None) -> None:
        self.lua = lua_runtime.module(settings.lua)
        self.c_modules = lua_runtime.global_runtime() == settings.lua
        self.runtime_name = settings.lua
        self.base_paths = lua_runtime.base_paths(settings.lua, settings.lua_path,
                                                 settings.lua_cpath)
        self.sessions = sessions if sessions is not None else SessionBridge(settings)
        self.max_memory = settings.state_memory or None
        self.root = settings.root or ""
        responses = {status.value: f"{status.value} {status.phrase}" for status in http.HTTPStatus}
        self.options = _lua_data({
            "handler": settings.handler,
            "status": settings.httpstatus,
            "content_type": settings.contenttype,
            "buffering": settings.buffering,
            "responses": responses,
            "script_config": settings.script_config,
            "config": _visible_config(settings),
            "worker_number": worker_number,
            "timeout": settings.timeout,
            "hook_count": HOOK_COUNT,
            "jit": settings.jit,
            "elapsed_header": settings.elapsed_time_header,
        })
        if settings.slowlog_timeout:
            self.options[b"slowlog_timeout"] = settings.slowlog_timeout
        self.options[b"headers"] = settings.headers
        # The compiled speed-ups, opened by this worker process (runtime.py): with them
        # requests pass their PARAMS as received, decoded into the env table in C.
        speedups = lua_runtime.speedups().get("lua") if self.c_modules else None
        self.raw_params = speedups is not None
        if speedups:
            self.options[b"speedups"] = os.fsencode(speedups)
            self.options[b"fast_format"] = settings.lua in lua_runtime.FAST_FORMAT
            # PUC Lua: LuaJIT never runs hooks in compiled code and keeps the count hook
            self.options[b"fast_watchdog"] = settings.lua in lua_runtime.FAST_FORMAT
        if not self.c_modules:
            self.options[b"no_c_modules"] = (
                f"no C modules in this process: only a worker process links them "
                f"(lua = {settings.lua!r}, this process exports "
                f"{lua_runtime.global_runtime() or 'no'} Lua C API)").encode()
        # Every state loads it (the luafcgid2 global `lf`): bytecode, compiled once here.
        self.options[b"luafcgid_chunk"] = self._compiled(LUAFCGID_MODULE_PATH)
        if settings.startup:
            self.options[b"startup"] = os.fsencode(settings.startup)
        self.options[b"session"] = self._session_options(settings.session)
        self.options[b"session_chunk"] = self._compiled(SESSION_PATH)
        self.prelude = self._compiled(PRELUDE_PATH)

    def _session_options(self, session: dict) -> dict:
        return {
            **self.sessions.lua_functions(),
            b"name": session["SessionName"].encode(), b"lifetime": session["SessionTime"],
            b"secure": session["SessionCookieSecure"],
            b"httponly": session["SessionCookieHttpOnly"],
            b"samesite": session["SessionCookieSameSite"].encode(),
        }

    def _compiled(self, path: Path) -> bytes:
        """A Lua file as bytecode for this Lua: loading it is 5-30x faster than compiling."""
        scratch = self.lua.LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
        dump = scratch.eval("function(source, name) "
                            "return string.dump(assert((loadstring or load)(source, name))) end")
        return dump(LUA_SOURCES[path], b"@" + os.fsencode(path))


class _Outlet:
    """Where Lua sends output early: the request's sink, held only while the request runs.

    A failing sink is not raised into Lua (it would abort the handler with a Python
    exception stored in the runtime): it is kept in ``error``, Lua gets False and stops
    the handler, and :meth:`State.run` raises the original exception.
    """

    __slots__ = ("sink", "sent", "error")

    def __init__(self) -> None:
        self.sink: Optional[Callable[[bytes], None]] = None
        self.sent = False
        self.error: Optional[BaseException] = None

    def __call__(self, data: bytes) -> bool:
        if self.error is not None:
            return False
        self.sent = True
        try:
            self.sink(data)
        except Exception as error:
            self.error = error
            return False
        return True


class State:
    """One Lua runtime loaded with one script (SPEC §2); one request at a time.

    ``hits``, ``last_used``, ``transient`` and ``stale`` belong to the cache.
    """

    __slots__ = ("script", "number", "hits", "last_used", "transient", "stale", "files",
                 "started", "params", "_runtime", "_run", "_table_from", "_raw", "_outlet",
                 "_lua_error", "_memory_error")

    def __init__(self, blueprint: Blueprint, script: str, docroot: DocRoot, number: int,
                 thread_data: Callable[[], tuple]) -> None:
        """Load ``script``; ``docroot`` (else ``root``) and its ``lua_modules`` tree join the
        module search paths (runtime.package_paths)."""
        docroot = os.fsdecode(docroot or blueprint.root)
        docroot = docroot.rstrip("/") or docroot
        script_dir = os.path.dirname(script)
        package_path, package_cpath = lua_runtime.package_paths(
            blueprint.runtime_name, script_dir, docroot, blueprint.base_paths)
        self.script = script
        self.number = number
        self.hits = 0
        self.last_used = 0.0
        self.transient = False
        self.stale = False
        self.started = 0.0  # wall clock at the start of the running request; 0.0: idle
        self.params: Optional[dict] = None  # the running request's (heartbeat: its URI)
        # Every Lua file loaded (script, startup script, required modules) as on disk then.
        self.files: List[Tuple[str, Signature]] = []
        self._outlet = _Outlet()
        lua = blueprint.lua
        self._lua_error = lua.LuaError
        self._memory_error = lua.LuaMemoryError
        self._runtime = runtime = lua.LuaRuntime(
            encoding=None, register_eval=False, register_builtins=False,
            unpack_returned_tuples=True, max_memory=blueprint.max_memory,
            attribute_filter=_no_attributes)
        self._table_from = runtime.table_from
        self._raw = blueprint.raw_params  # the prelude decodes PARAMS as received
        options = dict(blueprint.options)
        options.update({
            b"script": os.fsencode(script),
            b"dir": os.fsencode(script_dir),
            b"package_path": os.fsencode(package_path),
            b"package_cpath": os.fsencode(package_cpath),
            b"state_number": number,
            b"outlet": self._outlet,
            b"log": functools.partial(_script_log, script),
            b"warn": functools.partial(_script_warning, script),
            b"note": functools.partial(_note_file, self.files),
            b"thread_data": thread_data,
            b"clock": time.time,
            b"slow": functools.partial(slowlog.record, script),
        })
        try:
            result = runtime.execute(blueprint.prelude,
                                     runtime.table_from(options, recursive=True))
        except self._lua_error as error:  # out of memory outside the prelude's xpcall
            self.close()
            raise self._error_of(error, flushed=False) from None
        if not result[0]:
            self.close()
            raise self._outcome_error(result, flushed=False)
        self._run = result[1]

    def run(self, params: dict, body: bytes, sink: Callable[[bytes], None],
            thread_number: int, raw_params: bytes = b"") -> bytes:
        """Call the handler once. Returns the CGI output still to send: head + body when
        nothing was flushed (buffered mode: with Content-Length), or what remains after
        the last flush. ``sink(data)`` receives CGI output sent early: on con:flush(), and
        on every con:puts when buffering is off. Raises :class:`ScriptError`, or what the
        sink raised (the handler is stopped at its next output). ``raw_params``: the same
        params as the web server sent them (protocol.Request.raw_params), for the compiled
        decoder."""
        outlet = self._outlet
        outlet.sink = sink
        self.started = started = time.time()
        self.params = params
        try:
            # PARAMS as received, when the compiled decoder can make the env table of them
            # (raw_params is b"" when the server changed params): no dict conversion.
            env = raw_params if raw_params and self._raw else self._table_from(params)
            result = self._run(env, body, thread_number, started)
        except self._lua_error as error:  # raised outside the handler's xpcall (out of
            result = error                # memory, a timeout in the prelude): do not reuse
            self.stale = True             # a state left half-way through a request
        finally:
            outlet.sink = None
            self.started = 0.0
            self.params = None
        if outlet.sent:
            return self._streamed(result)
        if result.__class__ is bytes:
            return result
        raise self._outcome_error(result, flushed=False)

    def _streamed(self, result: Any) -> bytes:
        outlet = self._outlet
        failed = outlet.error
        outlet.sent = False
        outlet.error = None
        if failed is not None:
            raise failed
        if result.__class__ is bytes:
            return result
        raise self._outcome_error(result, flushed=True)

    def _outcome_error(self, result: Any, flushed: bool) -> ScriptError:
        if isinstance(result, BaseException):
            return self._error_of(result, flushed)
        elapsed = result[3] if len(result) > 3 else None
        if elapsed is not None:  # the watchdog stopped it: drop the state, cut anywhere
            self.stale = True
        return self._failure(result[1], result[2], flushed, elapsed)

    def _error_of(self, error: BaseException, flushed: bool) -> ScriptError:
        if isinstance(error, self._memory_error):
            return self._failure(MEMORY_MESSAGE, None, flushed)
        return self._failure(str(error).encode("utf-8", "replace"), b"", flushed)

    def _failure(self, message: bytes, traceback: Optional[bytes], flushed: bool,
                 elapsed: Optional[float] = None) -> ScriptError:
        # Lua skips the message handler on memory errors: no traceback means out of memory.
        memory = traceback is None and message == MEMORY_MESSAGE
        if memory:
            self.stale = True  # over state_memory: the cache drops it at release
            if self._runtime is not None:
                # LuaJIT keeps failing allocations (or worse) until a full collection.
                self._runtime.gccollect()
        return ScriptError(self.script, message.decode("utf-8", "replace"),
                           (traceback or b"").decode("utf-8", "replace"),
                           flushed=flushed, memory=memory, elapsed=elapsed)

    def running_for(self, now: float) -> float:
        """Seconds the running request has run at wall clock ``now``; 0.0 when idle."""
        started = self.started
        return now - started if started else 0.0

    def value(self, now: float) -> float:
        """How much keeping this state is worth: ``log(1 + hits) / (1 + idle seconds)``.

        Popularity counts logarithmically and age divides it, so a script hot an hour
        ago is worth less than one used a second ago.
        """
        return log1p(self.hits) / (1.0 + max(0.0, now - self.last_used))

    def changed(self, seen: dict) -> bool:
        """True when a Lua file this state loaded changed on disk (or vanished).

        ``seen`` caches signatures by path within one sweep.
        """
        for path, loaded in self.files:
            current = seen.get(path, seen)
            if current is seen:
                current = seen[path] = signature(path)
            if current is None or current != loaded:
                return True
        return False

    def close(self) -> None:
        """Free the runtime: a full Lua collection, then our references go."""
        runtime = self._runtime
        if runtime is None:
            return
        self._runtime = self._run = self._table_from = None
        runtime.gccollect()

