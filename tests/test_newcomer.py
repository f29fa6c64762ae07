"""A new user's first hour: the README's quick start, installed as a user installs it.

Not the editable install the other tests use: ``pip install`` of the package, not
editable, into a fresh venv in a directory only root can read (as a checkout in
``/root`` or a pyenv Python is), then the server started as root. Workers that drop
privileges must never need a file of that install: the master reads the package's Lua
files and imports every module a worker uses before it forks. An audit hook in the venv
(``sys.addaudithook``) records every import and every open of a file of the Python
installation or the venv that a process makes once it no longer runs as root, so a lazy
import is caught even where the installation is world-readable (CI's /usr).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import quote

import pytest

from tests import redis_server
from tests.support import accepts, fcgi_call, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the newcomer tests run as root: workers switch to another user only then")]

CHECKOUT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 300  # s: a machine without a wheel cache downloads lupa and friends

# Loaded by a .pth file at every start of the venv's Python; idle unless the variable is set.
AUDIT_MODULE = '''
import os
import sys

_path = os.environ.get("LUAFCGID_TEST_AUDIT")
if _path:
    _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _places = tuple(os.path.realpath(place) + "/" for place in
                    {sys.prefix, sys.base_prefix, sys.exec_prefix})

    def _audit(event, args):
        # Only what a process does once it dropped root: a worker after setuid.
        if event not in ("import", "open") or os.geteuid() == 0:
            return
        what = args[0]
        if event == "open":
            if isinstance(what, int):
                return
            what = os.path.realpath(os.fsdecode(what))
            if not what.startswith(_places):
                return
        os.write(_fd, f"pid {os.getpid()} uid {os.geteuid()}: {event} {what}\\n".encode())

    sys.addaudithook(_audit)
'''


def tracked_files(source: Path) -> list:
    """The checkout's files as a clone of it would have them, new files not yet committed
    included (no venv, no build leftovers)."""
    listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True)
    if listed.returncode != 0:
        pytest.skip("the checkout is not a git work tree: cannot tell its files")
    return [name for name in listed.stdout.decode().split("\0") if name]


def copy_checkout(target: Path) -> Path:
    for name in tracked_files(CHECKOUT):
        if not (CHECKOUT / name).is_file():
            continue  # deleted in the work tree, not yet committed
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(CHECKOUT / name, target / name)
    return target


class Install:
    """A private clone and a venv with luafcgid installed from it, not editable."""

    def __init__(self, base: Path, compiler: bool = True) -> None:
        self.base = base
        self.clone = copy_checkout(base / "luafcgid")
        self.venv = base / "venv"
        self.bin = self.venv / "bin"
        self.seconds = 0.0
        # Without one, the optional speed-ups fail to build and pip goes on (setup.py).
        self.env = {**os.environ, **({} if compiler else {"CC": "/bin/false"})}

    def create(self) -> Install:
        started = time.monotonic()
        made = subprocess.run([sys.executable, "-m", "venv", str(self.venv)],
                              capture_output=True, text=True, timeout=120)
        if made.returncode != 0:
            pytest.skip("python3 -m venv does not work here (Debian: apt install "
                        f"python3-venv): {made.stderr.strip()[-300:]}")
        installed = subprocess.run(
            [str(self.bin / "python"), "-m", "pip", "install", "-q", f"{self.clone}[redis]"],
            capture_output=True, text=True, timeout=PIP_TIMEOUT, env=self.env)
        assert installed.returncode == 0, installed.stderr[-3000:]
        self.seconds = time.monotonic() - started
        where = "import sysconfig; print(sysconfig.get_path('purelib'))"
        site_packages = Path(subprocess.run([str(self.bin / "python"), "-c", where],
                                            capture_output=True, text=True,
                                            check=True).stdout.strip())
        (site_packages / "luafcgid_test_audit.py").write_text(AUDIT_MODULE)
        (site_packages / "luafcgid_test_audit.pth").write_text("import luafcgid_test_audit\n")
        return self


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> Install:
    base = tmp_path_factory.mktemp("private")
    base.chmod(0o700)  # only root may enter, like /root
    return Install(base).create()


class Running:
    """``luafcgid start -F`` from the venv, as root, with its output in a file."""

    def __init__(self, install: Install, config: Path, listen: str, cwd: Path,
                 audit: Optional[Path] = None) -> None:
        self.listen = listen
        self.output_path = config.with_suffix(".out")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        if audit is not None:
            env["LUAFCGID_TEST_AUDIT"] = str(audit)
        with open(self.output_path, "wb") as out:
            self.process = subprocess.Popen(
                [str(install.bin / "luafcgid"), "start", "-F", "-c", str(config)],
                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: accepts(listen) or self.process.poll() is not None, timeout=30,
                   what="luafcgid to accept")
        assert self.process.poll() is None, "luafcgid exited at start:\n" + self.output()

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


@pytest.fixture
def public_examples() -> Iterator[Path]:
    """A world-readable copy of examples/ (the workers' user must read the scripts)."""
    base = Path(tempfile.mkdtemp(prefix="luafcgid-newcomer-"))
    base.chmod(0o755)
    www = base / "www"
    shutil.copytree(CHECKOUT / "examples", www)
    www.chmod(0o755)
    yield www
    shutil.rmtree(base)


def example_config(source: Path, target: Path, **changes: str) -> Path:
    """``source`` (examples/config.lua) with some settings' lines replaced."""
    text = source.read_text()
    for key, value in changes.items():
        text, count = re.subn(rf'(?m)^{key} = .*$', f"{key} = {value}", text)
        if not count:
            text += f"\n{key} = {value}\n"
    target.write_text(text)
    return target


def get(listen: str, script: Path, method: str = "GET", body: bytes = b"",
        query: str = "", cookie: str = "") -> bytes:
    params = {"SCRIPT_FILENAME": str(script), "SCRIPT_NAME": "/" + script.name,
              "REQUEST_METHOD": method, "QUERY_STRING": query,
              "REQUEST_URI": "/" + script.name + ("?" + query if query else ""),
              "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1"}
    if body:
        params["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
    if cookie:
        params["HTTP_COOKIE"] = cookie
    return fcgi_call(listen, params, body)


def sign_in_and_visit(listen: str, www: Path, name: str) -> None:
    """examples/session.lua: the session store works in the workers."""
    login = get(listen, www / "session.lua", "POST", f"name={quote(name)}".encode())
    assert login.startswith(b"Status: 303"), login
    cookie = re.search(rb"Set-Cookie: (XLuaSession=[^;]+)", login).group(1).decode()
    visit = get(listen, www / "session.lua", cookie=cookie)
    assert f"Hello, {name}: visit 1 of this session.".encode() in visit, visit


def start_quick(install: Install, pidfile: str) -> Running:
    """The README's quick start, as written but for the port and pidfile (tests run side
    by side): ``luafcgid start -F -c examples/config.lua`` in the clone."""
    listen = f"127.0.0.1:{free_port()}"
    config = example_config(install.clone / "examples" / "config.lua",
                            install.clone / "examples" / "config.lua",
                            listen=f'"{listen}"', pidfile=f'"{install.base}/{pidfile}"')
    return Running(install, config, listen, cwd=install.clone)


def test_quick_start_as_root_from_a_checkout_only_root_can_read(install):
    """The quick start: start from the clone, then ask for examples/hello.lua."""
    server = start_quick(install, "quick.pid")
    try:
        answer = subprocess.run(
            [str(install.bin / "luafcgid"), "request", "-c", "examples/config.lua",
             "examples/hello.lua"], cwd=install.clone, capture_output=True, timeout=30)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout == b"Hello, world!\n"
    finally:
        assert server.stop() == 0, server.output()
    log = server.output()
    # The demo runs its workers as root: said once, at start.
    assert log.count("workers run as root") == 1, log
    # With gcc here, pip built the compiled speed-ups, and the start line says so.
    assert "compiled speed-ups: " in log and "string.format for Lua 5.4" in log, log


def test_without_a_compiler_pip_installs_the_pure_paths_and_says_so(tmp_path):
    """pip install on a machine without a C compiler: the install succeeds, the start line
    says the speed-ups were not built, and the examples are served all the same."""
    install = Install(tmp_path, compiler=False).create()
    built = list(install.venv.rglob("_speedups*.so"))
    assert built == []
    server = start_quick(install, "pure.pid")
    try:
        page = get(server.listen, install.clone / "examples" / "hello.lua")
        assert page.endswith(b"Hello, world!\n"), page
    finally:
        assert server.stop() == 0, server.output()
    assert "compiled speed-ups: not built (no C compiler" in server.output(), server.output()


# What else a worker does rarely, so that a lazy import on those paths shows too.
TROUBLE = {
    "slow.lua": "function main(env, con) local t = os.clock() "
                "while os.clock() - t < 0.3 do end con:puts('slow') end",
    "loop.lua": "function main(env, con) while true do end end",
    "error.lua": "function main(env, con) error('on purpose') end",
    "module.lua": "local m = require 'no.such.module' function main(env, con) end",
    "json.lua": "function main(env, con) con:json({ok = true}) end",
}


def test_workers_as_nobody_never_read_the_installed_package(install, public_examples):
    """The package and Python live where nobody cannot read; the scripts where it can."""
    www = public_examples
    for name, source in TROUBLE.items():
        (www / name).write_text(source)
    listen = f"127.0.0.1:{free_port()}"
    audit = www.parent / "audit.log"
    config = example_config(www / "config.lua", www.parent / "config.lua", user='"nobody"',
                            listen=f'"{listen}"', pidfile=f'"{www.parent}/luafcgid.pid"',
                            timeout="1", slowlog_timeout="0.1", status_path='"/status"',
                            access_log=f'"{www.parent}/access.log"')
    server = Running(install, config, listen, cwd=www.parent, audit=audit)
    try:
        assert get(listen, www / "hello.lua").endswith(b"Hello, world!\n")
        assert b'{"name":"apple","price":1.25}' in get(listen, www / "api.lua", query="id=1")
        assert b"Hello, Ada!" in get(listen, www / "form.lua", "POST", b"name=Ada")
        assert b"line 5" in get(listen, www / "stream.lua")
        assert b"Method: GET" in get(listen, www / "legacy.lua")
        sign_in_and_visit(listen, www, "Ada")
        assert b"Status: 404" in get(listen, www / "missing.lua")
        assert get(listen, www / "slow.lua").endswith(b"slow")
        assert get(listen, www / "json.lua").endswith(b'{"ok":true}')
        for name in ("loop.lua", "error.lua", "module.lua"):
            assert get(listen, www / name).startswith(b"Status: 500")
        for form in ("", "json", "openmetrics"):
            status = fcgi_call(listen, {"SCRIPT_NAME": "/status", "QUERY_STRING": form})
            assert status.startswith(b"Status: 200"), status
    finally:
        assert server.stop() == 0, server.output()
    log = server.output()
    assert "Traceback" not in log and "Permission denied" not in log, log
    assert "slow request: script" in log and "on purpose" in log
    assert audit.exists() and audit.read_text() == "", audit.read_text()


@pytest.mark.skipif(not redis_server.installed(), reason="redis-server is not installed")
def test_redis_sessions_as_nobody_never_read_the_installed_package(install, public_examples,
                                                                  tmp_path):
    www = public_examples
    listen = f"127.0.0.1:{free_port()}"
    audit = www.parent / "audit.log"
    with redis_server.RedisServer(tmp_path / "redis") as redis:
        config = example_config(www / "config.lua", www.parent / "config.lua",
                                user='"nobody"', listen=f'"{listen}"',
                                pidfile=f'"{www.parent}/luafcgid.pid"',
                                session_store=f'"{redis.url}"')
        server = Running(install, config, listen, cwd=www.parent, audit=audit)
        try:
            sign_in_and_visit(listen, www, "Bea")
        finally:
            assert server.stop() == 0, server.output()
    assert audit.read_text() == "", audit.read_text()
