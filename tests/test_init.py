"""The init system files in init/: the LSB script run for real, the others checked."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.support import NGINX, Nginx, Server, accepts, as_root, http, wait_until, write_config

pytestmark = pytest.mark.slow

INIT = Path(__file__).resolve().parent.parent / "init"
LUAFCGID = str(Path(sys.executable).parent / "luafcgid")


def init_d(action: str, config: Path) -> subprocess.CompletedProcess:
    # The directories it makes before a start: here, beside the config, not in /run.
    env = {**os.environ, "LUAFCGID": LUAFCGID, "LUAFCGID_CONFIG": str(config),
           "RUNDIR": str(config.parent / "run"), "LOGDIR": str(config.parent / "logs")}
    return subprocess.run(["sh", str(INIT / "luafcgid.init.d"), action], env=env,
                          capture_output=True, text=True, timeout=60)


def test_lsb_init_script_start_status_reload_stop(tmp_path):
    listen = str(tmp_path / "fcgi.sock")
    pidfile = tmp_path / "luafcgid.pid"
    config = write_config(tmp_path / "config.lua", listen=listen, processes=1, sweep=100,
                          pidfile=str(pidfile), logfile=str(tmp_path / "log"), **as_root())
    try:
        assert init_d("status", config).returncode == 3
        started = init_d("start", config)
        assert started.returncode == 0, started.stdout + started.stderr
        assert accepts(listen)
        for made in ("run", "logs"):
            assert (tmp_path / made).stat().st_mode & 0o777 == 0o755
        master = int(pidfile.read_text())
        assert init_d("start", config).returncode == 0  # already running: still success
        assert int(pidfile.read_text()) == master

        status = init_d("status", config)
        assert status.returncode == 0 and f"master pid {master}" in status.stdout

        worker = wait_until(lambda: psutil.Process(master).children())[0].pid
        assert init_d("reload", config).returncode == 0

        def replaced() -> bool:
            workers = json.loads(Path(f"{pidfile}.status").read_text())["workers"]
            return [w["state"] for w in workers] == ["serving"] and workers[0]["pid"] != worker
        wait_until(replaced, what="the worker to be replaced")

        restarted = init_d("restart", config)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert int(pidfile.read_text()) != master
        assert accepts(listen)

        assert init_d("stop", config).returncode == 0
        assert not pidfile.exists() and not os.path.exists(listen)
        assert init_d("status", config).returncode == 3
        assert init_d("stop", config).returncode == 0
        assert init_d("reload", config).returncode == 7
    finally:
        if pidfile.exists():
            subprocess.run([LUAFCGID, "stop", "-c", str(config)], timeout=60)


def test_freebsd_rc_script_is_valid_sh():
    script = INIT / "luafcgid.rc.d"
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    for needed in ('rcvar="luafcgid_enable"', "luafcgid_config", 'extra_commands="reload"',
                   "load_rc_config", 'run_rc_command "$1"'):
        assert needed in text


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    # The unit names the installed path; verify checks that it exists, so point it here.
    unit = (INIT / "luafcgid.service").read_text()
    assert "ExecStart=/opt/luafcgid/bin/luafcgid start -F -c ${LUAFCGID_CONFIG}" in unit
    # reload waits for the outcome: a failed reload fails `systemctl reload`.
    assert "ExecReload=/opt/luafcgid/bin/luafcgid reload -c ${LUAFCGID_CONFIG}" in unit
    assert "RuntimeDirectory=luafcgid" in unit and "LogsDirectory=luafcgid" in unit
    copy = tmp_path / "luafcgid.service"
    copy.write_text(unit.replace("/opt/luafcgid/bin/luafcgid", LUAFCGID))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "luafcgid.service" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: workers as www-data")
def test_the_production_template_serves_nginx_running_as_www_data():
    """init/config.lua as written, but for its directories: nginx runs as www-data (as on
    Debian) and reaches the workers through the socket the template gives it."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    try:
        pwd.getpwnam("www-data")
    except KeyError:
        pytest.skip("no www-data account")
    base = Path(tempfile.mkdtemp(prefix="luafcgid-production-"))
    try:
        base.chmod(0o755)  # www-data enters it, as it enters /run/luafcgid and /var/www
        for name in ("run", "log", "www"):
            (base / name).mkdir(mode=0o755)
        (base / "www" / "hello.lua").write_text('function main(env, con) con:puts("hello") end')
        (base / "www" / "hello.lua").chmod(0o644)
        text = (INIT / "config.lua").read_text()
        text = (text.replace("/run/luafcgid/", f"{base}/run/")
                .replace("/var/log/luafcgid/", f"{base}/log/")
                .replace('root = "/var/www"', f'root = "{base}/www"'))
        config = base / "config.lua"
        config.write_text(text + "processes = 1\n")
        socket_path = f"{base}/run/luafcgid.sock"
        server = Server(config, socket_path).start()
        log_path = base / "log" / "error.log"
        wait_until(lambda: "ready: serving on" in log_path.read_text(), what="a serving worker")
        nginx = Nginx(base / "nginx", base / "www", socket_path)
        nginx.conf.write_text(nginx.conf.read_text().replace("user root;", "user www-data;"))
        try:
            nginx.start()
            response = http(nginx.port, "/hello.lua")
            assert (response.status, response.body) == (200, b"hello"), response
            workers = psutil.Process(server.pid).children()
            assert workers and {worker.username() for worker in workers} == {"www-data"}
        finally:
            nginx.stop()
            server.stop()
        info = os.stat(socket_path) if os.path.exists(socket_path) else None
        assert info is None  # removed at stop
        log = log_path.read_text()
        assert "workers run as root" not in log and "ERROR" not in log, log
    finally:
        shutil.rmtree(base)
