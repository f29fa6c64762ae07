"""Real parts for the integration tests: a private nginx, a luafcgid server, HTTP clients.

Everything listens on 127.0.0.1 (or a unix socket in the test's tmp dir) on a free port,
and every wait is bounded.
"""

from __future__ import annotations

import http.client as httpclient
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import psutil

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FASTCGI_PARAMS = "/etc/nginx/fastcgi_params"



# A Lua function for test scripts: busy(seconds) spins for that much CPU (os.clock: the
# thread running it is the one spinning), at line 3 of the script it starts.
LUA_BUSY = """local function busy(seconds)
  local start = os.clock()
  while os.clock() - start < seconds do end
end
"""

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def accepts(address: str) -> bool:
    """True when something accepts connections at a luafcgid ``listen`` address."""
    try:
        if address.startswith("/") or address.startswith("./"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(1)
                client.connect(address)
        else:
            host, _, port = address.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                pass
        return True
    except OSError:
        return False


# Where Debian installs Lua C modules: /usr/lib/<multiarch triplet>/lua/<version>/.
DEBIAN_LUA_LIB = (f"/usr/lib/{sysconfig.get_config_var('MULTIARCH')}/lua"
                  if sysconfig.get_config_var("MULTIARCH") else "/usr/lib/lua")


def debian_has(version: str, *modules: str) -> bool:
    """True when Debian's Lua ``version`` C modules (``"cjson"``, ``"luasql/postgres"``) exist."""
    return all(os.path.exists(f"{DEBIAN_LUA_LIB}/{version}/{module}.so") for module in modules)


# --- config and scripts -------------------------------------------------------------------


def lua_literal(value: object) -> str:
    """A Python value written as a Lua literal (for config files)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace(
            "\r", "\\r") + '"'
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    if isinstance(value, Mapping):
        fields = (f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(fields) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


def as_root() -> dict:
    """Settings that let the tests run workers as root, which CI machines are."""
    return {"user": "root"} if os.geteuid() == 0 else {}


def write_config(path: Path, **settings: object) -> Path:
    """Write a luafcgid config file with ``settings`` as globals."""
    lines = [f"{key} = {lua_literal(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_scripts(docroot: Path, scripts: Mapping[str, str]) -> Path:
    """Write Lua scripts (name → source) under ``docroot``."""
    docroot.mkdir(parents=True, exist_ok=True)
    for name, source in scripts.items():
        target = docroot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
    return docroot


# --- nginx ---------------------------------------------------------------------------------

NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    fastcgi_temp_path {prefix}/fastcgi;
    proxy_temp_path {prefix}/proxy;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 2m;
    keepalive_requests 100000;
    upstream luafcgid {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
        location ~ \\.lua$ {{
            fastcgi_pass luafcgid;
            fastcgi_keep_conn {keep_conn};
            fastcgi_buffering {buffering};
            fastcgi_read_timeout 60s;
            include {fastcgi_params};
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
        }}
    }}
}}
"""


class Nginx:
    """A private nginx (own prefix, free loopback port) in front of a FastCGI address."""

    def __init__(self, prefix: Path, docroot: Path, fastcgi_address: str,
                 keep_conn: bool = True, buffering: bool = True) -> None:
        self.prefix = prefix
        self.port = free_port()
        upstream = fastcgi_address
        if fastcgi_address.startswith("/"):
            upstream = "unix:" + fastcgi_address
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",
            prefix=prefix, port=self.port, upstream=upstream, docroot=docroot,
            keep_conn="on" if keep_conn else "off", buffering="on" if buffering else "off",
            fastcgi_params=FASTCGI_PARAMS))
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> Nginx:
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: accepts(f"127.0.0.1:{self.port}") or self.process.poll() is not None,
                   what="nginx to listen")
        if self.process.poll() is not None:
            raise RuntimeError("nginx did not start: " + self.process.stderr.read().decode())
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# --- luafcgid -----------------------------------------------------------------------------


class Server:
    """``luafcgid start -F -c CONFIG`` as a child process."""

    def __init__(self, config: Path, listen: str, log_path: Optional[Path] = None) -> None:
        self.config = config
        self.listen = listen
        self.log_path = log_path or config.with_suffix(".stderr")
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> Server:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "luafcgid", "start", "-F", "-c", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: accepts(self.listen) or self.process.poll() is not None,
                   timeout=timeout, what="luafcgid to accept")
        if self.process.poll() is not None:
            raise RuntimeError("luafcgid exited at start:\n" + self.output())
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._log.close()
        return self.process.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --- HTTP clients -------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: list, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def http(port: int, path: str, method: str = "GET", body: Optional[bytes] = None,
         headers: Optional[Mapping[str, str]] = None, timeout: float = 30.0,
         connection: Optional[httpclient.HTTPConnection] = None) -> Response:
    """One HTTP request to nginx on ``port``; reuses ``connection`` when given."""
    conn = connection or httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        reply = conn.getresponse()
        return Response(reply.status, reply.getheaders(), reply.read())
    finally:
        if connection is None:
            conn.close()


class RequestLoop:
    """Threads that send requests through nginx until stopped, counting what came back.

    ``check(response)`` says whether a response is good; everything else, connection errors
    included, counts as failed.
    """

    def __init__(self, port: int, paths: Iterable[str], check: Callable[[Response], bool],
                 clients: int = 4, max_seconds: float = 120.0) -> None:
        self.port = port
        self.paths = list(paths)
        self.check = check
        self.counts: Counter = Counter()
        self.failures: list = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> RequestLoop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    @property
    def failed(self) -> int:
        with self.lock:
            return self.counts["failed"]

    def wait_for(self, requests: int, timeout: float = 30.0) -> None:
        start = self.total
        wait_until(lambda: self.total >= start + requests, timeout, f"{requests} more requests")

    def _client(self) -> None:
        conn = httpclient.HTTPConnection("127.0.0.1", self.port, timeout=30)
        index = 0
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            path = self.paths[index % len(self.paths)]
            index += 1
            try:
                response = http(self.port, path, connection=conn)
                outcome = "ok" if self.check(response) else "failed"
                if outcome == "failed":
                    self._note(f"{path}: {response!r}")
            except (OSError, httpclient.HTTPException) as error:
                conn.close()
                conn = httpclient.HTTPConnection("127.0.0.1", self.port, timeout=30)
                outcome = "failed"
                self._note(f"{path}: {error!r}")
            with self.lock:
                self.counts[outcome] += 1
        conn.close()

    def _note(self, failure: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(failure)


# --- a site: luafcgid + nginx on a docroot of scripts ---------------------------------------


class Site:
    """Scripts in a docroot, a luafcgid serving them and a private nginx in front."""

    def __init__(self, base: Path, scripts: Mapping[str, str], keep_conn: bool = True,
                 nginx_buffering: bool = True, **settings: object) -> None:
        self.base = base
        self.docroot = write_scripts(base / "www", scripts)
        self.listen = str(settings.pop("listen", f"127.0.0.1:{free_port()}"))
        self.settings = {"listen": self.listen, "processes": 1,
                         "pidfile": str(base / "luafcgid.pid"), **as_root(), **settings}
        self.config = write_config(base / "config.lua", **self.settings)
        self.server = Server(self.config, self.listen)
        self.nginx = Nginx(base / "nginx", self.docroot, self.listen, keep_conn=keep_conn,
                           buffering=nginx_buffering)

    def __enter__(self) -> Site:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Site:
        self.server.start()
        try:
            self.nginx.start()
        except Exception:
            self.server.stop()
            raise
        return self

    def stop(self) -> None:
        self.nginx.stop()
        self.server.stop()

    @property
    def port(self) -> int:
        return self.nginx.port

    def get(self, path: str, **kwargs: object) -> Response:
        return http(self.port, path, **kwargs)

    def script_path(self, name: str) -> str:
        return str(self.docroot / name)


def workers_of(master_pid: int) -> set:
    """Pids of the master's live (not yet reaped counts as dead) children."""
    pids = set()
    for child in psutil.Process(master_pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def serving(site: Site) -> set:
    """Pids of the workers the master counts as serving (from its status file)."""
    try:
        status = json.loads(Path(site.settings["pidfile"] + ".status").read_text())
    except (OSError, ValueError):
        return set()
    return {w["pid"] for w in status["workers"] if w["state"] == "serving"}


# --- a FastCGI client, for what nginx would not send ------------------------------------------


def fcgi_connect(address: str, timeout: float = 10.0) -> socket.socket:
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def fcgi_request_bytes(params: Mapping[str, str], body: bytes = b"", request_id: int = 1,
                       keep_conn: bool = False, role: int = 1) -> bytes:
    """The records nginx would send for one request."""
    from luafcgid import protocol

    pairs = [(name.encode(), value.encode()) for name, value in params.items()]
    return protocol.request_records(request_id, pairs, body, keep_conn, role)


def read_records(sock: socket.socket, until_end_request: bool = True) -> list:
    """Read the answer as (record type, request id, data) until END_REQUEST or end of stream.

    The records that end a stream are left out, and END_REQUEST's data is b"".
    """
    from luafcgid import protocol

    reader = protocol.ResponseReader()
    records = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return records
        for event in reader.receive(chunk):
            records.append((event.record_type, event.request_id, getattr(event, "data", b"")))
            if until_end_request and event.record_type == protocol.END_REQUEST:
                return records


def fcgi_call(address: str, params: Mapping[str, str], body: bytes = b"",
              sock: Optional[socket.socket] = None, keep_conn: bool = False) -> bytes:
    """One request over FastCGI; returns the STDOUT stream (CGI head and body)."""
    own = sock is None
    sock = sock or fcgi_connect(address)
    try:
        sock.sendall(fcgi_request_bytes(params, body, keep_conn=keep_conn))
        records = read_records(sock)
        return b"".join(content for kind, _, content in records if kind == 6)
    finally:
        if own:
            sock.close()


# --- other web servers: Apache, lighttpd, Caddy, h2o -----------------------------------------

# Who the web servers run as when the tests run as root (CI): Debian's web server account.
# Their workers then reach luafcgid's unix socket through socket_owner, and the docroot
# must be readable by it (the tests' own tmp dirs, 0700 under /tmp/pytest-of-root, are not).
WEB_USER = "www-data"


def web_user() -> Optional[str]:
    """The account the web servers switch to: WEB_USER as root, else None (they stay us)."""
    return WEB_USER if os.geteuid() == 0 else None


def fastcgi_target(address: str) -> tuple:
    """A luafcgid ``listen`` address as ("unix", path) or ("tcp", host, port)."""
    if address.startswith("/"):
        return ("unix", address)
    host, _, port = address.rpartition(":")
    return ("tcp", host.strip("[]"), int(port))


class WebServer:
    """A web server from Debian's packages on a free loopback port, with its own config, pid
    file and logs under ``prefix``; run in the foreground as a child and stopped by its pid.

    Subclasses give the program, the Debian package, the config and the command line.
    """

    program = ""
    package = ""
    config_name = "server.conf"

    def __init__(self, prefix: Path, docroot: Path, fastcgi_address: str) -> None:
        self.prefix = prefix
        self.docroot = docroot
        self.fastcgi = fastcgi_target(fastcgi_address)
        self.port = free_port()
        self.user = web_user()
        prefix.mkdir(parents=True, exist_ok=True)
        if self.user:  # logs and pid files are written after the switch to the web user
            shutil.chown(prefix, self.user)
        self.conf = prefix / self.config_name
        self.conf.write_text(self.config())
        self.process: Optional[subprocess.Popen] = None

    @classmethod
    def missing(cls) -> Optional[str]:
        """Why this server cannot run here, or None."""
        if shutil.which(cls.program) or Path("/usr/sbin", cls.program).exists():
            return None
        return f"{cls.program} is not installed (Debian package {cls.package})"

    def config(self) -> str:
        raise NotImplementedError

    def command(self) -> list:
        raise NotImplementedError

    def environment(self) -> Optional[dict]:
        return None

    def start(self, timeout: float = 20.0) -> WebServer:
        self._output = open(self.prefix / "output.log", "ab")
        self.process = subprocess.Popen(self.command(), stdout=self._output,
                                        stderr=subprocess.STDOUT, env=self.environment(),
                                        start_new_session=True)
        wait_until(lambda: accepts(f"127.0.0.1:{self.port}") or self.process.poll() is not None,
                   timeout=timeout, what=f"{self.program} to listen")
        if self.process.poll() is not None:
            self._output.close()
            raise RuntimeError(f"{self.program} did not start:\n{self.logs()}")
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._output.close()

    def logs(self) -> str:
        """Everything the server wrote: its output and its error log."""
        parts = []
        for path in sorted(self.prefix.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Apache(WebServer):
    """Apache 2.4 with mod_proxy_fcgi, in one of the two php-fpm recipes: ``SetHandler``
    to a unix socket (the default ``ProxyFCGIBackendType FPM`` sends SCRIPT_FILENAME as
    ``proxy:fcgi://localhost/...``), or ``ProxyPassMatch`` (the path info stays in
    SCRIPT_FILENAME). Both with connection reuse and flushpackets."""

    program = "apache2"
    package = "apache2"
    config_name = "httpd.conf"
    MODULES = "/usr/lib/apache2/modules"

    def __init__(self, prefix: Path, docroot: Path, fastcgi_address: str,
                 recipe: str = "sethandler") -> None:
        self.recipe = recipe
        super().__init__(prefix, docroot, fastcgi_address)

    def handler(self) -> str:
        if self.recipe == "sethandler":
            assert self.fastcgi[0] == "unix", "the SetHandler recipe is for a unix socket"
            return APACHE_SETHANDLER.format(socket=self.fastcgi[1])
        if self.fastcgi[0] == "unix":
            backend = f"unix:{self.fastcgi[1]}|fcgi://localhost"
        else:
            backend = f"fcgi://{self.fastcgi[1]}:{self.fastcgi[2]}"
        return APACHE_PROXYPASSMATCH.format(backend=backend, docroot=self.docroot)

    def config(self) -> str:
        user = f"User {self.user}\nGroup {self.user}\n" if self.user else ""
        return APACHE_CONF.format(prefix=self.prefix, port=self.port, user=user,
                                  modules=self.MODULES, docroot=self.docroot,
                                  handler=self.handler())

    def command(self) -> list:
        return [shutil.which(self.program) or "/usr/sbin/apache2", "-f", str(self.conf),
                "-DFOREGROUND"]


APACHE_CONF = """\
ServerRoot {prefix}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {prefix}/httpd.pid
ErrorLog {prefix}/error.log
LogLevel warn
DefaultRuntimeDir {prefix}
Mutex file:{prefix} default
{user}LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule proxy_module {modules}/mod_proxy.so
LoadModule proxy_fcgi_module {modules}/mod_proxy_fcgi.so
DocumentRoot {docroot}
<Directory {docroot}>
    Require all granted
</Directory>
{handler}
"""

# The README's Apache recipes, with the paths and ports filled in.
APACHE_SETHANDLER = """\
<Proxy "fcgi://localhost" enablereuse=on flushpackets=on>
</Proxy>
<FilesMatch "\\.lua$">
    SetHandler "proxy:unix:{socket}|fcgi://localhost"
</FilesMatch>
"""

APACHE_PROXYPASSMATCH = """\
ProxyPassMatch "^/(.*\\.lua(/.*)?)$" "{backend}{docroot}/$1" enablereuse=on flushpackets=on
"""


class Lighttpd(WebServer):
    """lighttpd 1.4 with mod_fastcgi, streaming responses, with or without Debian's PHP
    recipe's ``broken-scriptfilename`` (the path info stays in SCRIPT_FILENAME)."""

    program = "lighttpd"
    package = "lighttpd"
    config_name = "lighttpd.conf"

    def __init__(self, prefix: Path, docroot: Path, fastcgi_address: str,
                 broken_scriptfilename: bool = False) -> None:
        self.broken_scriptfilename = broken_scriptfilename
        super().__init__(prefix, docroot, fastcgi_address)

    def config(self) -> str:
        user = (f'server.username = "{self.user}"\nserver.groupname = "{self.user}"\n'
                if self.user else "")
        if self.fastcgi[0] == "unix":
            backend = f'"socket" => "{self.fastcgi[1]}",'
        else:
            backend = f'"host" => "{self.fastcgi[1]}", "port" => {self.fastcgi[2]},'
        broken = '\n    "broken-scriptfilename" => "enable",' if self.broken_scriptfilename else ""
        return LIGHTTPD_CONF.format(prefix=self.prefix, port=self.port, user=user,
                                    docroot=self.docroot, backend=backend, broken=broken)

    def command(self) -> list:
        return [shutil.which(self.program) or "/usr/sbin/lighttpd", "-D", "-f", str(self.conf)]


LIGHTTPD_CONF = """\
server.document-root = "{docroot}"
server.bind = "127.0.0.1"
server.port = {port}
server.pid-file = "{prefix}/lighttpd.pid"
server.errorlog = "{prefix}/error.log"
{user}server.modules += ("mod_fastcgi")
server.stream-response-body = 2
fastcgi.server = (".lua" => ((
    {backend}{broken}
)))
"""


class Caddy(WebServer):
    """Caddy 2 with its FastCGI transport (``reverse_proxy`` + ``transport fastcgi``),
    admin endpoint off, its data and config dirs in ``prefix``."""

    program = "caddy"
    package = "caddy"
    config_name = "Caddyfile"

    def config(self) -> str:
        if self.fastcgi[0] == "unix":
            backend = f"unix/{self.fastcgi[1]}"
        else:
            backend = f"{self.fastcgi[1]}:{self.fastcgi[2]}"
        return CADDYFILE.format(prefix=self.prefix, port=self.port, docroot=self.docroot,
                                backend=backend)

    def command(self) -> list:
        return [shutil.which(self.program) or "/usr/bin/caddy", "run", "--config",
                str(self.conf), "--adapter", "caddyfile"]

    def environment(self) -> dict:
        return {**os.environ, "HOME": str(self.prefix), "XDG_DATA_HOME": str(self.prefix / "data"),
                "XDG_CONFIG_HOME": str(self.prefix / "config")}


CADDYFILE = """\
{{
    admin off
    auto_https off
    storage file_system {prefix}/data
}}
http://127.0.0.1:{port} {{
    root * {docroot}
    @lua path *.lua *.lua/*
    reverse_proxy @lua {backend} {{
        transport fastcgi {{
            split .lua
        }}
        flush_interval -1
        header_down -Status
    }}
    file_server
}}
"""


class H2O(WebServer):
    """h2o 2.2 serving the docroot, ``.lua`` files through ``file.custom-handler`` to
    FastCGI, with kept-alive FastCGI connections."""

    program = "h2o"
    package = "h2o"
    config_name = "h2o.conf"

    def config(self) -> str:
        if self.fastcgi[0] == "unix":
            backend = f"port: {self.fastcgi[1]}\n            type: unix"
        else:
            backend = f"host: {self.fastcgi[1]}\n            port: {self.fastcgi[2]}\n" \
                      "            type: tcp"
        user = f"user: {self.user}\n" if self.user else ""
        return H2O_CONF.format(prefix=self.prefix, port=self.port, user=user,
                               docroot=self.docroot, backend=backend)

    def command(self) -> list:
        return [shutil.which(self.program) or "/usr/bin/h2o", "-c", str(self.conf)]


H2O_CONF = """\
listen:
  host: 127.0.0.1
  port: {port}
pid-file: {prefix}/h2o.pid
error-log: {prefix}/error.log
{user}hosts:
  default:
    paths:
      /:
        file.dir: {docroot}
        file.custom-handler:
          extension: .lua
          fastcgi.connect:
            {backend}
          fastcgi.document_root: {docroot}
          fastcgi.timeout.keepalive: 10000
"""


def fastcgi_connections(master_pid: int, address: str) -> int:
    """FastCGI connections the workers of a luafcgid master hold open now (its listening
    socket, which every worker inherits, not counted)."""
    import psutil

    target = fastcgi_target(address)
    kind = "unix" if target[0] == "unix" else "inet"
    master = psutil.Process(master_pid)
    listening = {connection.fd for connection in master.net_connections(kind=kind)}
    count = 0
    for worker in master.children():
        for connection in worker.net_connections(kind=kind):
            if connection.fd in listening:
                continue
            if target[0] == "unix":
                count += connection.laddr == target[1]
            else:
                count += bool(connection.laddr) and connection.laddr.port == target[2]
    return count
