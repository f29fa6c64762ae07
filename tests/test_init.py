"""The init system files in init/: the LSB script run for real, the others checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support import accepts, as_root, wait_until, write_config

INIT = Path(__file__).resolve().parent.parent / "init"
LUAFCGID = str(Path(sys.executable).parent / "luafcgid")


def init_d(action: str, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LUAFCGID": LUAFCGID, "LUAFCGID_CONFIG": str(config)}
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
    assert "ExecStart=/usr/local/bin/luafcgid start -F -c ${LUAFCGID_CONFIG}" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    copy = tmp_path / "luafcgid.service"
    copy.write_text(unit.replace("/usr/local/bin/luafcgid", LUAFCGID))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "luafcgid.service" not in result.stderr
