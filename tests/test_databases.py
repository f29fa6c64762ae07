"""Real databases through real drivers (Debian's luasql C modules), through nginx: blocking
queries cost one thread, connections persist in their Lua state, the README's module
reconnects after the database restarts, and SQLite takes writes from several processes."""

from __future__ import annotations

import http.client as httpclient
import statistics
import textwrap
import threading
import time
from pathlib import Path
from typing import List

import pytest

from tests.postgres_server import MISSING, PostgresServer, bin_dir
from tests.support import Site, debian_has, http, wait_until

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

README = Path(__file__).resolve().parent.parent / "README.rst"


def readme_db_module() -> str:
    """The ``db.lua`` module exactly as the README shows it."""
    lines = README.read_text().splitlines()
    start = next(number for number, line in enumerate(lines)
                 if line.startswith("    -- db.lua, beside the scripts"))
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


@pytest.fixture(scope="module")
def postgres():
    if bin_dir() is None:
        pytest.skip(MISSING)
    if not debian_has("5.4", "luasql/postgres"):
        pytest.skip("Debian's lua-sql-postgres is not installed (apt install lua-sql-postgres)")
    with PostgresServer() as server:
        yield server


def with_app_name(postgres: PostgresServer, name: str) -> str:
    return f"{postgres.conninfo} application_name={name}"


def connections(postgres: PostgresServer, name: str) -> int:
    return int(postgres.query(
        f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'"))


SLEEP = """
local db = require "db"
function main(env, con)
    db.rows("SELECT pg_sleep(0.5)")
    con:puts("slept")
end
"""
BACKEND = """
local db = require "db"
function main(env, con)
    con:puts(db.rows("SELECT pg_backend_pid() AS pid")[1].pid)
end
"""
HELLO = 'function main(env, con) con:puts("hello") end'


def timed_get(port: int, path: str, results: List[float], start: threading.Barrier) -> None:
    start.wait(10)
    began = time.monotonic()
    response = http(port, path)
    assert response.status == 200 and response.body == b"slept", response
    results.append(time.monotonic() - began)


def test_blocking_queries_cost_one_thread_each(tmp_path, postgres):
    scripts = {"db.lua": readme_db_module(), "sleep.lua": SLEEP, "hello.lua": HELLO}
    with Site(tmp_path, scripts, processes=1, workers=5,
              Config={"database": with_app_name(postgres, "blocking")}) as site:
        assert site.get("/hello.lua").body == b"hello"
        latencies: List[float] = []
        stop = threading.Event()

        def hello_client() -> None:
            connection = httpclient.HTTPConnection("127.0.0.1", site.port, timeout=10)
            while not stop.is_set():
                began = time.monotonic()
                response = http(site.port, "/hello.lua", connection=connection)
                latencies.append(time.monotonic() - began)
                assert response.body == b"hello"
            connection.close()

        hello = threading.Thread(target=hello_client, daemon=True)
        hello.start()
        rounds = []
        for _ in range(3):  # 4 queries of 0.5 s at once, three times over
            durations: List[float] = []
            start = threading.Barrier(4)
            clients = [threading.Thread(target=timed_get,
                                        args=(site.port, "/sleep.lua", durations, start))
                       for _ in range(4)]
            began = time.monotonic()
            for client in clients:
                client.start()
            for client in clients:
                client.join(10)
            rounds.append((time.monotonic() - began, durations))
        stop.set()
        hello.join(10)
    for wall, durations in rounds:
        assert len(durations) == 4
        assert all(0.5 <= duration < 0.9 for duration in durations), rounds
        assert wall < 0.9, rounds  # together, not one after the other (2 s)
    assert len(latencies) >= 100
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\n4 x pg_sleep(0.5) with workers = 5: rounds of "
          f"{', '.join(f'{wall:.3f}' for wall, _ in rounds)} s; meanwhile {len(latencies)} "
          f"hello requests, p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.020


def test_workers_bounds_the_blocking_calls_of_a_process(tmp_path, postgres):
    name = "bound"
    scripts = {"db.lua": readme_db_module(), "sleep.lua": SLEEP.replace("0.5", "1.5"),
               "hello.lua": HELLO}
    with Site(tmp_path, scripts, processes=1, workers=4,
              Config={"database": with_app_name(postgres, name)}) as site:
        durations: List[float] = []
        start = threading.Barrier(4)
        sleepers = [threading.Thread(target=timed_get,
                                     args=(site.port, "/sleep.lua", durations, start))
                    for _ in range(4)]
        for sleeper in sleepers:
            sleeper.start()
        wait_until(lambda: postgres.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bound' "
            "AND query LIKE '%pg_sleep%' AND state = 'active'") == "4",
            what="4 queries running")
        began = time.monotonic()
        assert site.get("/hello.lua").body == b"hello"
        waited = time.monotonic() - began
        for sleeper in sleepers:
            sleeper.join(10)
    print(f"\nhello while 4 of 4 threads wait on the database: {waited:.3f} s")
    assert len(durations) == 4
    assert waited > 0.3  # it waited for a thread: 4 blocking calls took all 4


def test_a_connection_opened_by_a_state_serves_its_later_requests(tmp_path, postgres):
    name = "persistent"
    scripts = {"db.lua": readme_db_module(), "backend.lua": BACKEND}
    with Site(tmp_path, scripts, processes=1, workers=1,
              Config={"database": with_app_name(postgres, name)}) as site:
        pids = {site.get("/backend.lua").body for _ in range(20)}
        assert len(pids) == 1  # one state, one connection, every request
        assert connections(postgres, name) == 1
    # The state closed with its worker: so did its connection.
    wait_until(lambda: connections(postgres, name) == 0, what="the connection to close")


def test_the_readme_module_reconnects_after_the_database_restarts(tmp_path, postgres):
    name = "reconnect"
    scripts = {"db.lua": readme_db_module(), "backend.lua": BACKEND}
    with Site(tmp_path, scripts, processes=1, workers=1,
              Config={"database": with_app_name(postgres, name)}) as site:
        before = site.get("/backend.lua")
        assert before.status == 200
        postgres.restart()
        after = site.get("/backend.lua")
        assert after.status == 200, (after, site.server.output())
        assert after.body != before.body  # a new server process, a new connection
        assert site.get("/backend.lua").body == after.body
        assert connections(postgres, name) == 1


def test_a_statement_error_is_the_scripts_not_a_reconnect(tmp_path, postgres):
    name = "badsql"
    scripts = {"db.lua": readme_db_module(), "backend.lua": BACKEND,
               "bad.lua": 'local db = require "db" '
                          'function main() db.rows("SELECT * FROM no_such_table") end'}
    with Site(tmp_path, scripts, processes=1, workers=1,
              Config={"database": with_app_name(postgres, name)}) as site:
        first = site.get("/backend.lua").body
        assert site.get("/bad.lua").status == 500
        assert site.get("/backend.lua").body == first  # the connection was kept
        log = site.server.output()
    assert 'relation "no_such_table" does not exist' in log


# --- SQLite, embedded ------------------------------------------------------------------------

COUNTER = """
local luasql = require "luasql.sqlite3"
local connection  -- one per state, opened at first use
opened = (opened or 0)

local function db()
    if not connection then
        connection = assert(luasql.sqlite3():connect(Config.file))
        connection:execute("PRAGMA busy_timeout = 5000")
        connection:execute("PRAGMA journal_mode = WAL")
        assert(connection:execute("CREATE TABLE IF NOT EXISTS hits (n INTEGER)"))
        opened = opened + 1
    end
    return connection
end

function main(env, con)
    assert(db():execute("INSERT INTO hits VALUES (1)"))
    local cursor = assert(db():execute("SELECT count(*) FROM hits"))
    local count = cursor:fetch()
    cursor:close()
    con:puts(count .. " " .. opened)
end
"""


def test_sqlite_connections_persist_and_take_writes_from_every_process(tmp_path):
    if not debian_has("5.4", "luasql/sqlite3"):
        pytest.skip("Debian's lua-sql-sqlite3 is not installed (apt install lua-sql-sqlite3)")
    database = tmp_path / "hits.db"
    with Site(tmp_path, {"count.lua": COUNTER}, processes=2, workers=2,
              Config={"file": str(database)}) as site:
        bodies: List[bytes] = []
        lock = threading.Lock()

        def client() -> None:
            connection = httpclient.HTTPConnection("127.0.0.1", site.port, timeout=10)
            for _ in range(50):
                response = http(site.port, "/count.lua", connection=connection)
                assert response.status == 200, response
                with lock:
                    bodies.append(response.body)
            connection.close()

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
        assert len(bodies) == 200
        counts = sorted(int(body.split()[0]) for body in bodies)
        assert counts == list(range(1, 201))  # every write landed, none lost to a lock
        assert all(int(body.split()[1]) == 1 for body in bodies)  # each state opened once
