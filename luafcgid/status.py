"""The pool's figures, as ``luafcgid status`` prints them and ``status_path`` serves them.

Pool-wide figures come from the master's status file (``<pidfile>.status``, rewritten
each heartbeat by :func:`write_snapshot`, with what
:meth:`luafcgid.arbiter.Arbiter.write_status` gives it), so they are as of the
last heartbeat. A worker answering ``status_path`` knows only itself: :func:`build`
merges its live figures over its row of the file. :func:`build` is the one place the
figures are made; :func:`as_text`, :func:`as_json` and :func:`as_openmetrics` only
render them.

The listen queue (connections the kernel accepted that no worker has taken yet) is read
from ``/proc/net/tcp`` and ``/proc/net/tcp6`` (Linux, TCP): the ``rx_queue`` of the
listening socket on our port. Elsewhere, and for unix sockets, it is unknown (None).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Tuple

import psutil

from luafcgid import __version__
from luafcgid.config import Settings
from luafcgid.log import log
from luafcgid.sock import tcp_address

PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
SOMAXCONN = "/proc/sys/net/core/somaxconn"
TCP_LISTEN = "0A"
# Keys of a worker row, in the order the text table shows them.
WORKER_KEYS = ("number", "pid", "state", "rss", "requests", "busy", "states", "slow",
               "started")


def status_path(pidfile: str) -> str:
    """Where the master keeps its figures, next to its pidfile."""
    return pidfile + ".status"


def write_snapshot(pidfile: str, snapshot: dict) -> None:
    """The master's figures into the status file beside ``pidfile``, replaced atomically
    (a reader never sees half a file); a failure is logged, the master goes on."""
    path = status_path(pidfile)
    temporary = path + ".tmp"
    try:
        with open(temporary, "w") as file:
            json.dump(snapshot, file)
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot write the status file %s: %s", path, error.strerror)


def remove_status_file(pidfile: str) -> None:
    """The status file goes with the pidfile when the master stops (or is killed)."""
    try:
        os.unlink(status_path(pidfile))
    except FileNotFoundError:
        pass


def read_snapshot(settings: Settings) -> Optional[dict]:
    """The master's status file as written at the last heartbeat; None when there is none."""
    return read_snapshot_at(settings.pidfile)


def read_snapshot_at(pidfile: str) -> Optional[dict]:
    """The status file beside ``pidfile``; None when there is none (or it is unreadable)."""
    try:
        with open(status_path(pidfile)) as file:
            snapshot = json.load(file)
    except (OSError, ValueError):
        return None
    return snapshot if isinstance(snapshot, dict) else None


def build(settings: Settings, snapshot: Optional[dict], live: Optional[dict] = None) -> dict:
    """Pool totals and per-worker rows.

    ``snapshot`` is the master's status file (None: unknown); ``live`` the answering
    worker's own figures now (``pid``, ``requests``, ``busy``, ``states``, optionally
    ``slow``), which replace its row of the snapshot.
    """
    snapshot = snapshot or {}
    rows = [worker_row(row) for row in snapshot.get("workers", [])]
    if live is not None:
        merge_live(rows, live)
    now = time.time()
    for row in rows:
        row["uptime"] = round(now - row["started"], 3) if row["started"] else None
    serving = sum(1 for row in rows if row["state"] == "serving")
    active = sum(row["busy"] or 0 for row in rows)
    # The running master's own figures first: the config file may have changed since.
    threads_each = snapshot.get("threads", settings.workers)
    listen = snapshot.get("listen", settings.listen)
    queued = listen_queue(listen)
    started = snapshot.get("started")
    return {
        "version": __version__,
        "pid": snapshot.get("pid"),
        "config": snapshot.get("config", settings.path),
        "listen": listen,
        "started": started,
        "uptime": round(now - started, 3) if started else None,
        "updated": snapshot.get("updated"),
        "sweep": snapshot.get("sweep", settings.sweep),
        "rss": snapshot.get("rss"),
        "processes": len(rows),
        "processes_wanted": snapshot.get("processes", settings.processes),
        "accepted_requests": (snapshot.get("retired_requests") or 0)
        + sum(row["requests"] or 0 for row in rows),
        "active_threads": active,
        "idle_threads": max(0, serving * threads_each - active),
        "threads": serving * threads_each,
        "listen_queue": queued,
        "listen_queue_max": (listen_backlog(snapshot.get("backlog", settings.backlog))
                             if queued is not None else None),
        "slow_requests": sum(row["slow"] or 0 for row in rows),
        "states_loaded": sum(row["states"] or 0 for row in rows),
        "reload": snapshot.get("reload"),
        "workers": rows,
    }


def worker_row(row: dict) -> dict:
    return {key: row.get(key) for key in WORKER_KEYS}


def merge_live(rows: List[dict], live: dict) -> None:
    """Put the answering worker's figures of now over its row (added if the file lacks it)."""
    pid = live["pid"]
    row = next((row for row in rows if row["pid"] == pid), None)
    if row is None:
        row = worker_row({"pid": pid, "number": live.get("number"), "state": "serving"})
        rows.append(row)
    process = psutil.Process(pid)
    row["rss"] = process.memory_info().rss
    row["started"] = row["started"] or process.create_time()
    for key in ("requests", "busy", "states", "slow"):
        if key in live:
            row[key] = live[key]


def listen_queue(listen: str) -> Optional[int]:
    """Connections waiting in the kernel's accept queue of our TCP listener; None: unknown."""
    address = tcp_address(listen)
    if address is None:
        return None
    port = f"{address[1]:04X}"
    for path in PROC_NET_TCP:
        try:
            with open(path) as table:
                next(table)  # the column names
                for line in table:
                    fields = line.split()
                    if fields[3] == TCP_LISTEN and fields[1].endswith(":" + port):
                        return int(fields[4].partition(":")[2], 16)
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None


def listen_backlog(backlog: int) -> int:
    """The accept queue's length limit: ``backlog``, capped by the kernel's somaxconn."""
    try:
        with open(SOMAXCONN) as limit:
            return min(backlog, int(limit.read()))
    except (OSError, ValueError):
        return backlog


# -- renderings ---------------------------------------------------------------------------


def as_json(figures: dict) -> str:
    return json.dumps(figures, indent=1) + "\n"


def as_text(figures: dict) -> str:
    """Four lines of totals, then one row per worker (``luafcgid status`` prints this)."""
    queue = ("unknown" if figures["listen_queue"] is None
             else f"{figures['listen_queue']} of {figures['listen_queue_max']}")
    updated = figures["updated"]
    age = f"{time.time() - updated:.0f} s ago" if updated else "unknown"
    lines = [
        f"luafcgid {figures['version']}: master pid {blank_if_none(figures['pid'])}, up "
        f"{format_duration(figures['uptime'])}, RSS {format_mib(figures['rss'])}, "
        f"config {figures['config']}, listening on {figures['listen']}",
        f"{figures['processes']} worker process(es) ({figures['processes_wanted']} wanted), "
        f"{figures['threads']} threads: {figures['active_threads']} active, "
        f"{figures['idle_threads']} idle; listen queue {queue}",
        f"accepted requests {figures['accepted_requests']}, slow requests "
        f"{figures['slow_requests']}, states loaded {figures['states_loaded']}; figures as of "
        f"{age} (heartbeat every {figures['sweep'] / 1000:g} s)",
        f"{'worker':>6} {'pid':>7} {'RSS':>10} {'requests':>9} {'busy':>5} {'states':>6} "
        f"{'uptime':>10}  state",
    ]
    for row in figures["workers"]:
        lines.append(
            f"{blank_if_none(row['number']):>6} {row['pid']:>7} {format_mib(row['rss']):>10} "
            f"{blank_if_none(row['requests']):>9} {blank_if_none(row['busy']):>5} "
            f"{blank_if_none(row['states']):>6} {format_duration(row['uptime']):>10}  "
            f"{row['state']}")
    reload = describe_reload(figures.get("reload"))
    if reload:
        lines.append(reload)
    return "\n".join(lines) + "\n"


def describe_reload(record: Optional[dict]) -> str:
    """The last reload in a line ("" when there was none)."""
    if not record:
        return ""
    number, state = record.get("number"), record.get("state")
    when = record.get("finished") or record.get("requested")
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "?"
    if state == "failed":
        return (f"last reload (#{number}) FAILED at {at}: {record.get('reason')}; still "
                "serving the previous config")
    if state == "pending":
        return f"reload #{number} under way since {at}: the new workers are booting"
    return f"last reload (#{number}) done at {at}"


# name → (type, help, key of the figures); counters get "_total" on their sample.
POOL_METRICS: Tuple[Tuple[str, str, str, str], ...] = (
    ("luafcgid_start_time_seconds", "gauge", "When the master started (Unix time).",
     "started"),
    ("luafcgid_accepted_requests", "counter", "Requests served since the master started.",
     "accepted_requests"),
    ("luafcgid_active_threads", "gauge", "Threads running a request.", "active_threads"),
    ("luafcgid_idle_threads", "gauge", "Threads waiting for a request.", "idle_threads"),
    ("luafcgid_worker_processes", "gauge", "Worker processes.", "processes"),
    ("luafcgid_listen_queue", "gauge",
     "Connections waiting to be accepted (absent when the OS does not tell).", "listen_queue"),
    ("luafcgid_listen_queue_max", "gauge", "Length limit of the listen queue.",
     "listen_queue_max"),
    ("luafcgid_slow_requests", "counter", "Requests that passed slowlog_timeout.",
     "slow_requests"),
    ("luafcgid_states_loaded", "gauge", "Lua states loaded in all workers.", "states_loaded"),
    ("luafcgid_master_rss_bytes", "gauge", "Resident memory of the master process.", "rss"),
    ("luafcgid_last_reload_successful", "gauge",
     "1 when the last reload succeeded (or none was made), 0 when it failed.",
     "last_reload_successful"),
)
WORKER_METRICS: Tuple[Tuple[str, str, str, str], ...] = (
    ("luafcgid_worker_rss_bytes", "gauge", "Resident memory of a worker process.", "rss"),
    ("luafcgid_worker_requests", "counter", "Requests a worker process served.", "requests"),
    ("luafcgid_worker_busy_threads", "gauge", "Threads of a worker running a request.", "busy"),
    ("luafcgid_worker_states_loaded", "gauge", "Lua states a worker process holds.", "states"),
    ("luafcgid_worker_start_time_seconds", "gauge", "When a worker process started.",
     "started"),
    ("luafcgid_worker_pid", "gauge", "Process id of the worker process with this number.",
     "pid"),
)
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def as_openmetrics(figures: dict) -> str:
    """The OpenMetrics text format (Prometheus scrapes it), ending with ``# EOF``.

    Worker series are labelled by worker number alone: a recycled worker (new pid) goes
    on with the same series instead of starting a new one each time. While a worker is
    being replaced two processes share a number: the serving one is shown.
    """
    lines = ["# TYPE luafcgid info", "# HELP luafcgid luafcgid's version.",
             f'luafcgid_info{{version="{figures["version"]}"}} 1']
    pool = dict(figures, last_reload_successful=0 if (figures.get("reload") or {}).get(
        "state") == "failed" else 1)
    for name, kind, help_text, key in POOL_METRICS:
        samples = [("", pool[key])] if pool.get(key) is not None else []
        add_metric(lines, name, kind, help_text, samples)
    workers = one_row_per_number(figures["workers"])
    for name, kind, help_text, key in WORKER_METRICS:
        samples = [(f'{{worker="{row["number"]}"}}', row[key])
                   for row in workers if row[key] is not None]
        add_metric(lines, name, kind, help_text, samples)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


STATE_RANK = {"serving": 0, "booting": 1, "stopping": 2}


def one_row_per_number(rows: List[dict]) -> List[dict]:
    """For each worker number, the row that stands for it: serving first, then newest."""
    chosen: Dict[object, dict] = {}
    for row in rows:
        if row["number"] is None:
            continue
        rank = (STATE_RANK.get(row["state"], 3), -(row["started"] or 0))
        best = chosen.get(row["number"])
        if best is None or rank < (STATE_RANK.get(best["state"], 3), -(best["started"] or 0)):
            chosen[row["number"]] = row
    return [chosen[number] for number in sorted(chosen, key=str)]


def add_metric(lines: List[str], name: str, kind: str, help_text: str,
               samples: List[Tuple[str, object]]) -> None:
    lines += (f"# TYPE {name} {kind}", f"# HELP {name} {help_text}")
    suffix = "_total" if kind == "counter" else ""
    lines += (f"{name}{suffix}{labels} {value}" for labels, value in samples)


# -- formatting helpers -------------------------------------------------------------------


def format_mib(size: Optional[int]) -> str:
    return f"{size / 1048576:.1f} MiB" if size else "-"


def blank_if_none(value: object) -> str:
    return "-" if value is None else str(value)


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


# The forms a status request may ask for with its query string: content type, renderer.
FORMS: Dict[str, tuple] = {
    "": ("text/plain; charset=utf-8", as_text),
    "json": ("application/json", as_json),
    "openmetrics": (OPENMETRICS_TYPE, as_openmetrics),
}
