"""From a complete FastCGI request to the CGI output that answers it.

This is the seam between the process side (workers/) and the Lua side (lua/):
it finds the script a request names, refuses what SPEC §4 refuses, takes a Lua
state from the cache, runs the handler and maps every failure to its answer.

Requests whose SCRIPT_NAME is the config's ``ping_path`` or ``status_path`` are
answered here before any script is looked for (php-fpm's ``ping.path`` and
``pm.status_path``): ``pong``, or the pool's figures (luafcgid.status) as text,
``?json`` or ``?openmetrics``.

SCRIPT_FILENAME is taken as php-fpm (``cgi.fix_pathinfo = 1``) takes it, so the
recipes people copy from their php-fpm setups work: Apache's ``proxy:fcgi://host``
(or ``proxy:balancer://``) prefix is stripped, and a path past the script
(``/www/env.lua/extra``: lighttpd's ``broken-scriptfilename``, Apache's
``ProxyPassMatch``) is split off, walking back over path components, never to the
document root or ``root`` or above them, and only to names with an allowed extension.
The script then sees SCRIPT_FILENAME, SCRIPT_NAME, PATH_INFO and PATH_TRANSLATED as
php-fpm gives them (:func:`rewrite`), with what the web server sent kept under
``ORIG_`` names. A relative SCRIPT_FILENAME is refused (500): it would otherwise be
taken from the worker's working directory, which is nobody's intent.

A HEAD request is answered with the head a GET would get, Content-Length
included, and no body (RFC 3875 §4.3.3): some web servers (h2o) pass on what
they get, and a body there breaks the client's next response.
"""

from __future__ import annotations

import itertools
import os
import stat
from typing import Callable, Dict, List, Optional, Tuple, Union

from luafcgid import privileges, protocol, status
from luafcgid.config import Settings
from luafcgid.log import log
from luafcgid.lua import ScriptError, StateCache, slowlog
from luafcgid.lua import runtime as lua_runtime
from luafcgid.lua.session import SessionBridge
from luafcgid.protocol import Request
from luafcgid.response import answer, error_page

# The prefixes Apache's mod_proxy_fcgi (and mod_proxy_balancer) put before the path in
# SCRIPT_FILENAME with its default ``ProxyFCGIBackendType FPM``.
PROXY_PREFIXES = (b"proxy:fcgi://", b"proxy:balancer://")


class HeadOnly:
    """The sink of a HEAD request: passes on the head of a streamed answer, drops its body.

    The Lua side sends the whole head in its first output (prelude.lua's flush and
    unbuffered puts send ``head .. "\\r\\n" .. data`` in one piece).
    """

    __slots__ = ("sink", "head_sent")

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        self.head_sent = False

    def __call__(self, data: bytes) -> None:
        if self.head_sent:
            return
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            self.head_sent = True
            data = data[:end + 4]
        self.sink(data)


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


def speedups_line(settings: Settings) -> str:
    """The master's start log line: the compiled speed-ups its workers use, or why none."""
    if os.environ.get(lua_runtime.PURE_VARIABLE):
        return f"compiled speed-ups: off ({lua_runtime.PURE_VARIABLE} is set): pure paths"
    used = ["PARAMS decoding"] if protocol.COMPILED else []
    if lua_runtime.lua_speedups_built(settings.lua):
        used.append("PARAMS into Lua")
        if settings.lua in lua_runtime.FAST_FORMAT:
            used.append(f"string.format for Lua {settings.lua}")
    if not used:
        return ("compiled speed-ups: not built (no C compiler when luafcgid was installed): "
                "pure paths; reinstall with gcc present to have them")
    line = "compiled speed-ups: " + ", ".join(used)
    if settings.lua not in lua_runtime.FAST_FORMAT:
        line += f" (lua = {settings.lua!r} keeps its own string.format)"
    return line


class Application:
    """Runs requests on one worker process's Lua states."""

    def __init__(self, settings: Settings, worker_number: int = 1) -> None:
        self.settings = settings
        # What the Lua side shares with the process: the session store the ``Session``
        # global reaches (swept at each heartbeat), and the slow log its watchdog writes.
        self.sessions = SessionBridge(settings)
        if settings.slowlog_timeout:
            slowlog.open_log(settings.slowlog)
        self.cache = StateCache(settings, worker_number, sessions=self.sessions)
        self.extensions = tuple(settings.extensions)
        self.byte_extensions = tuple(os.fsencode(extension) for extension in self.extensions)
        self.root = os.fsencode(settings.root) if settings.root else b""
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
        params = request.params
        # The one check a GET pays for HEAD; head() comes back here with its own sink.
        if params.get(b"REQUEST_METHOD") == b"HEAD" and sink.__class__ is not HeadOnly:
            return self.head(request, sink, thread_number)
        self.requests = next(self._numbers)
        if request.params_overflow:
            return self.params_too_large(request)
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
        script = self.real_paths.get(filename)
        if script is None:
            try:
                script = self.locate(filename, params)
            except Refusal as refusal:
                report = log.error if refusal.code >= 500 else log.info
                report("%s: %s (%d)", os.fsdecode(filename), refusal.reason, refusal.code)
                return self.error(refusal.code, "")
            request.raw_params = b""  # locate may have rewritten params: the dict says it
        if request.body_too_large:
            log.warning("%s: request body over maxpost (%d bytes), answered 413; raise maxpost "
                        "in the config if such bodies are expected", script, self.settings.maxpost)
            return self.error(413, "")
        return self.run(script, request, sink, thread_number)

    def params_too_large(self, request: Request) -> bytes:
        log.warning("a request's params (CGI variables and HTTP headers) were %d bytes, over "
                    "max_params (%d bytes): answered 431; raise max_params in the config if "
                    "such requests are expected", request.params_overflow,
                    self.settings.max_params)
        return self.error(431, "")

    def head(self, request: Request, sink: Callable[[bytes], None], thread_number: int) -> bytes:
        """A HEAD request: what a GET would get, less its body (RFC 3875 §4.3.3).

        The script runs as for a GET (it sees REQUEST_METHOD = HEAD); a buffered answer
        keeps the Content-Length of its body, as php-fpm's does.
        """
        head_only = HeadOnly(sink)
        output = self.handle(request, head_only, thread_number)
        if head_only.head_sent:
            return b""  # the head went out early: what is left is body
        end = output.find(b"\r\n\r\n")
        return output if end < 0 else output[:end + 4]

    def run(self, script: str, request: Request, sink: Callable[[bytes], None],
            thread_number: int) -> bytes:
        try:
            # bytes as sent: decoded only when a state is loaded, not per request
            state = self.cache.acquire(script, request.params.get(b"DOCUMENT_ROOT", b""),
                                       request.params)
        except ScriptError as failure:
            if not os.path.isfile(script):  # deleted since it was last looked at
                self.real_paths.clear()
                log.info("%s: script not found (404)", script)
                return self.error(404, "")
            return self.script_failed(failure, "loading")
        try:
            return state.run(request.params, request.body, sink, thread_number,
                             request.raw_params)
        except ScriptError as failure:
            return self.script_failed(failure, "running")
        finally:
            self.cache.release(state)

    def locate(self, filename: bytes, params: Dict[bytes, bytes]) -> str:
        """The real path of the script a SCRIPT_FILENAME not known this second names.

        Strips Apache's ``proxy:`` prefix and splits off a path past the script, and
        then tells the script so through ``params`` (see :func:`rewrite`). Raises
        :class:`Refusal`.
        """
        name = filename
        from_apache = False
        if name[:6].lower() == b"proxy:":
            name = strip_proxy(name)
            if name != filename:
                from_apache = True
                real = self.real_paths.get(name)
                if real is not None:  # Apache's SetHandler recipe: every request comes here
                    params[b"SCRIPT_FILENAME"] = name
                    return real
        if b"\0" in name:
            raise Refusal(404, "script name contains a NUL byte")
        if not name.startswith(b"/"):
            raise Refusal(500, "SCRIPT_FILENAME is not an absolute path: have the web server "
                               "send the script's full path ($document_root$fastcgi_script_name "
                               "in nginx)")
        script, real = self.find_script(name, params)
        if script != filename:
            rewrite(params, name, script, from_apache)
        return real

    def find_script(self, name: bytes, params: Dict[bytes, bytes]) -> Tuple[bytes, str]:
        """The script file ``name`` is, or begins with (then the rest is PATH_INFO), and
        its real path. Only names that are such files enter ``real_paths``, so a made-up
        PATH_INFO never grows it."""
        real = self.real_paths.get(name)
        if real is not None:
            return name, real
        prefixes = self.script_prefixes(name, params)
        for prefix in prefixes:
            real = self.real_paths.get(prefix)
            if real is not None:
                # At most one prefix of a path can be a file: no need to look at the rest.
                return prefix, real
        if name.endswith(self.byte_extensions):
            real = self.check(name)
            mode = self.mode_of(real)  # None: no such file, perhaps a script with a path after it
            if mode is not None:
                if not stat.S_ISREG(mode):
                    raise Refusal(404, "not a regular file")
                return name, self.readable(name, real)
        elif not prefixes:
            raise Refusal(403, f"extension not in extensions {list(self.extensions)}")
        for prefix in prefixes:
            mode = self.mode_of(prefix)
            if mode is None or not stat.S_ISREG(mode):
                continue
            real = self.check(prefix)  # the script found: its checks decide
            return prefix, self.readable(prefix, real)
        raise Refusal(404, "script not found")

    def mode_of(self, path: Union[bytes, str]) -> Optional[int]:
        """A file's mode; None when there is none. A directory on the way the workers' user
        cannot enter is a 403 that names the user (not a 404 that hides why)."""
        try:
            return os.stat(path).st_mode
        except PermissionError:
            raise Refusal(403, f"permission denied for user {self.user}: a directory on the "
                          "way cannot be entered") from None
        except OSError:
            return None

    def readable(self, name: bytes, real: str) -> str:
        """``real`` once the workers' user may read it; it then enters the path cache."""
        if not os.access(real, os.R_OK):
            raise Refusal(403, f"permission denied for user {self.user}: cannot read it")
        self.real_paths[name] = real
        return real

    def script_prefixes(self, name: bytes, params: Dict[bytes, bytes]) -> List[bytes]:
        """The names ``name`` may be a script plus a path after it, longest first: each ends
        at a ``/`` of ``name`` and with an allowed extension, and is longer than the
        document root or ``root`` that ``name`` lies under (the walk never reaches them)."""
        floor = 0
        for top in (params.get(b"DOCUMENT_ROOT"), self.root):
            if top:
                top = top.rstrip(b"/")
                if name.startswith(top + b"/") and len(top) > floor:
                    floor = len(top)
        prefixes = []
        end = name.rfind(b"/")
        while end > floor:
            prefix = name[:end]
            if prefix.endswith(self.byte_extensions):
                prefixes.append(prefix)
            end = name.rfind(b"/", 0, end)
        return prefixes

    def forget_paths(self) -> None:
        """Look at every script's path and file again at its next request (every second)."""
        self.real_paths.clear()

    def check(self, filename: bytes) -> str:
        """Refuse names outside ``extensions`` or ``root``; return the real path."""
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
        return answer(200, content_type.encode(), self.settings.headers, body,
                      b"Cache-Control: no-store\r\n")

    def figures(self) -> dict:
        """What this process knows of itself: requests taken, states loaded, slow requests
        logged, and ``oldest``: seconds the longest-running request has run (0 when none),
        with its ``oldest_script`` and ``oldest_uri`` — the master kills a worker whose
        request overran ``timeout`` (arbiter.py) and names that request in its log."""
        seconds, params = self.cache.longest_running()
        figures = {"pid": os.getpid(), "requests": self.requests, "states": len(self.cache),
                   "oldest": round(seconds, 3), "slow": slowlog.recorded()}
        if figures["oldest"] and params:
            figures["oldest_script"] = params.get(b"SCRIPT_FILENAME", b"").decode(
                "utf-8", "replace")
            figures["oldest_uri"] = params.get(b"REQUEST_URI", b"").decode("utf-8", "replace")
        return figures

    def sweep(self) -> int:
        """Heartbeat work: remove expired sessions, drop states whose files changed."""
        self.sessions.sweep()
        return self.cache.sweep()

    def oldest_running(self) -> float:
        """Seconds the longest-running request has run (0 when none)."""
        return self.cache.oldest_running()

    def close(self) -> None:
        self.cache.close()
        self.sessions.close()



def strip_proxy(name: bytes) -> bytes:
    """``proxy:fcgi://host:port/www/x.lua?q`` → ``/www/x.lua`` (Apache's mod_proxy_fcgi with
    ``ProxyFCGIBackendType FPM``, its default); anything else as it is."""
    lower = name.lower()
    for prefix in PROXY_PREFIXES:
        if lower.startswith(prefix):
            path = name.find(b"/", len(prefix))
            if path < 0:
                return name
            return name[path:].split(b"?", 1)[0]
    return name


def rewrite(params: Dict[bytes, bytes], name: bytes, script: bytes, from_apache: bool) -> None:
    """Tell the script where it is, as php-fpm (``cgi.fix_pathinfo = 1``) does.

    SCRIPT_FILENAME becomes the script. When a path (``tail``) was split off ``name`` (the
    name sent, less Apache's prefix), it is kept as ORIG_SCRIPT_FILENAME, and: from Apache
    (mod_proxy_fcgi cannot set PATH_INFO) the tail is PATH_INFO and leaves SCRIPT_NAME;
    from others the web server's own PATH_INFO stands (lighttpd's broken-scriptfilename
    puts a "/" after every name, path info or not), unless it also holds the script's
    name (mod_fastcgi's ``Action`` way), which then moves to SCRIPT_NAME. PATH_TRANSLATED
    is the document root plus PATH_INFO. A value changed is kept under its ``ORIG_`` name.
    """
    params[b"SCRIPT_FILENAME"] = script
    tail = name[len(script):]
    if not tail:
        return  # only Apache's prefix went
    params[b"ORIG_SCRIPT_FILENAME"] = name
    path_info = params.get(b"PATH_INFO")
    script_name = params.get(b"SCRIPT_NAME")
    if from_apache:
        replace(params, b"PATH_INFO", tail)
        if script_name and len(script_name) > len(tail) and script_name.endswith(tail):
            script_name = script_name[:-len(tail)]
            replace(params, b"SCRIPT_NAME", script_name)
    elif path_info is not None and len(path_info) > len(tail):
        script_name = path_info[:-len(tail)]
        replace(params, b"PATH_INFO", path_info[-len(tail):])
        replace(params, b"SCRIPT_NAME", script_name)
    path_info = params.get(b"PATH_INFO") or b""
    docroot = params.get(b"DOCUMENT_ROOT")
    if docroot:
        if docroot.endswith(b"/"):
            docroot = docroot[:-1]
        replace(params, b"PATH_TRANSLATED", docroot + path_info)
    elif script_name and script.endswith(script_name):
        replace(params, b"PATH_TRANSLATED", script[:-len(script_name)] + path_info)


def replace(params: Dict[bytes, bytes], name: bytes, value: bytes) -> None:
    """Set ``params[name]``, keeping a different value it had under ``ORIG_<name>``."""
    original = params.get(name)
    if original == value:
        return
    if original is not None:
        params[b"ORIG_" + name] = original
    params[name] = value
