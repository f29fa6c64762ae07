"""status_path and ping_path through a real nginx; the listen queue; `luafcgid status`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import psutil
import pytest

from luafcgid import __version__, client, config, status
from luafcgid.status import listen_queue
from tests.support import FASTCGI_PARAMS, Server, Site, as_root, free_port, wait_until, write_config

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

HELLO = 'function main(env, con) con:puts("hello") end'
OPENMETRICS_SAMPLE = re.compile(r'^[a-z_]+(\{worker="\d+"\}|\{version="[^"]+"\})? [0-9.e+]+$')


def route_own_paths(site: Site, *paths: str) -> None:
    """nginx must send the status and ping paths to luafcgid (they are no .lua file)."""
    locations = "".join(f"location = {path} {{ fastcgi_pass luafcgid; "
                        f"include {FASTCGI_PARAMS}; }}\n        " for path in paths)
    conf = site.nginx.conf.read_text()
    site.nginx.conf.write_text(conf.replace("location ~ \\.lua$ {", locations
                                            + "location ~ \\.lua$ {"))


def master_children(site: Site) -> set:
    return {child.pid for child in psutil.Process(site.server.pid).children()}


@pytest.fixture(scope="module")
def running_site(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("status"), {"hello.lua": HELLO}, processes=2,
                sweep=100, status_path="/status", ping_path="/ping", headers="X-Site: one")
    route_own_paths(site, "/status", "/ping")
    with site:
        yield site


def test_ping_answers_pong_with_the_config_headers(running_site):
    answer = running_site.get("/ping")
    assert (answer.status, answer.body) == (200, b"pong")
    assert answer.header("Content-Type") == "text/plain"
    assert answer.header("X-Site") == "one"


def test_status_json_merges_the_master_file_with_the_answering_worker(running_site):
    for _ in range(6):
        assert running_site.get("/hello.lua").body == b"hello"

    def figures():
        answer = running_site.get("/status?json")
        assert answer.status == 200 and answer.header("Content-Type") == "application/json"
        data = json.loads(answer.body)
        pids = {row["pid"] for row in data["workers"] if row["state"] == "serving"}
        return data if pids == master_children(running_site) and data["accepted_requests"] >= 7 \
            else None

    data = wait_until(figures, what="both workers and the requests in the status figures")
    assert data["pid"] == running_site.server.pid
    assert data["processes"] == 2 and data["threads"] == 2 * 4
    # The status request itself runs: its worker's live row says so.
    assert data["active_threads"] >= 1
    assert data["active_threads"] + data["idle_threads"] == data["threads"]
    assert isinstance(data["listen_queue"], int) and data["listen_queue_max"] >= 1
    assert data["slow_requests"] == 0
    assert data["states_loaded"] >= 1
    assert data["started"] <= data["updated"]
    for row in data["workers"]:
        assert row["rss"] > 1 << 20 and row["uptime"] >= 0 and row["number"] in (1, 2)


def test_status_text_and_the_cli_share_one_layout(running_site):
    text = running_site.get("/status").body.decode()
    assert text.startswith("luafcgid ") and f"master pid {running_site.server.pid}" in text
    lines = text.splitlines()
    assert "accepted requests" in lines[2] and "listen queue" in lines[1]
    assert {int(line.split()[1]) for line in lines[4:]} == master_children(running_site)
    cli = subprocess.run([sys.executable, "-m", "luafcgid", "status", "-c",
                          str(running_site.config)], capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    cli_lines = cli.stdout.splitlines()
    assert cli_lines[0].split(", up")[0] == lines[0].split(", up")[0]
    assert cli_lines[3] == lines[3]
    assert {int(line.split()[1]) for line in cli_lines[4:]} == master_children(running_site)


def test_status_openmetrics(running_site):
    answer = running_site.get("/status?openmetrics")
    assert answer.status == 200
    assert answer.header("Content-Type").startswith("application/openmetrics-text")
    text = answer.body.decode()
    assert text.endswith("# EOF\n")
    lines = text.splitlines()[:-1]
    typed = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE")}
    helped = {line.split()[2] for line in lines if line.startswith("# HELP")}
    assert set(typed) == helped
    samples = [line for line in lines if not line.startswith("#")]
    for sample in samples:
        assert OPENMETRICS_SAMPLE.match(sample), sample
        name = sample.split("{")[0].split()[0]
        family = next((name[:-len(suffix)] for suffix, kind in (("_total", "counter"),
                                                                 ("_info", "info"))
                       if name.endswith(suffix) and typed.get(name[:-len(suffix)]) == kind),
                      name)
        assert family in typed, sample
    assert typed["luafcgid_accepted_requests"] == "counter"
    assert any(line.startswith("luafcgid_accepted_requests_total ") for line in samples)
    # Worker series by number (a recycled worker keeps its series), the pid as a value.
    assert {re.search(r'worker="(\d+)"', line).group(1) for line in samples
            if line.startswith("luafcgid_worker_rss_bytes")} == {"1", "2"}
    pids = {int(float(line.split()[1])) for line in samples
            if line.startswith("luafcgid_worker_pid{")}
    assert pids <= master_children(running_site) and len(pids) == 2
    assert typed["luafcgid"] == "info"
    assert f'luafcgid_info{{version="{__version__}"}} 1' in samples
    master_rss = next(line for line in samples if line.startswith("luafcgid_master_rss_bytes "))
    assert int(master_rss.split()[1]) > 1_000_000
    assert "luafcgid_last_reload_successful 1" in samples


def test_openmetrics_has_one_series_per_worker_number_while_one_is_replaced():
    """A replacement boots beside the worker it replaces: same number, two processes."""
    rows = [{"number": 1, "pid": 101, "state": "stopping", "rss": 1, "requests": 9, "busy": 0,
             "states": 1, "slow": 0, "started": 100.0, "uptime": 5.0},
            {"number": 1, "pid": 102, "state": "serving", "rss": 2, "requests": 1, "busy": 0,
             "states": 1, "slow": 0, "started": 104.0, "uptime": 1.0}]
    figures = status.build(config.defaults(), {"workers": rows, "pid": 1, "rss": 5,
                                               "reload": {"number": 3, "state": "failed"}})
    text = status.as_openmetrics(figures)
    pids = re.findall(r"^luafcgid_worker_pid\{.*$", text, re.M)
    assert pids == ['luafcgid_worker_pid{worker="1"} 102']
    assert "luafcgid_last_reload_successful 0" in text


def test_status_refuses_an_unknown_form(running_site):
    assert running_site.get("/status?yaml").status == 400


def test_paths_are_off_by_default(tmp_path):
    """Without status_path/ping_path, /ping is an ordinary name: no script, no pong."""
    listen = f"127.0.0.1:{free_port()}"
    server = Server(write_config(tmp_path / "c.lua", listen=listen, processes=1,
                                 pidfile=str(tmp_path / "p.pid"), root=str(tmp_path),
                                 **as_root()), listen).start()
    try:
        answer = client.request(listen, client.cgi_params("/ping", str(tmp_path / "ping"),
                                                          str(tmp_path)))
        assert answer.status == 403 and b"pong" not in answer.body
    finally:
        server.stop()


def test_path_settings_are_checked():
    assert config.from_mapping({"status_path": "/fpm-status"}).status_path == "/fpm-status"
    assert config.from_mapping({}).ping_path is None
    with pytest.raises(config.ConfigError, match="ping_path: expected a URL path"):
        config.from_mapping({"ping_path": "ping"})


def test_listen_queue_counts_connections_not_yet_accepted():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        assert listen_queue(address) == 0
        clients = [socket.create_connection(listener.getsockname(), timeout=5)
                   for _ in range(3)]
        try:
            wait_until(lambda: listen_queue(address) == 3, what="3 queued connections")
            listener.accept()[0].close()
            assert listen_queue(address) == 2
        finally:
            for connection in clients:
                connection.close()
    assert listen_queue("/run/some.sock") is None


def test_status_counts_slow_requests_and_requests_of_retired_workers(tmp_path):
    slow = """
        function main(env, con)
            local t = os.clock() + 0.5
            while os.clock() < t do end
            con:puts("slow")
        end"""
    site = Site(tmp_path, {"hello.lua": HELLO, "slow.lua": slow}, processes=1, sweep=100,
                max_requests=5, slowlog_timeout=0.2, slowlog=str(tmp_path / "slow.log"),
                status_path="/status")
    route_own_paths(site, "/status")
    with site:
        for _ in range(12):  # the worker retires after 5 (+ the status requests)
            assert site.get("/hello.lua").body == b"hello"
        assert site.get("/slow.lua").body == b"slow"

        def figures():
            data = json.loads(site.get("/status?json").body)
            return data if data["slow_requests"] >= 1 and data["accepted_requests"] >= 13 \
                else None

        data = wait_until(figures, what="the slow request and every request counted")
        assert all((row["requests"] or 0) <= 6 for row in data["workers"])
    assert "slow.lua" in (tmp_path / "slow.log").read_text()
