"""The master process: supervises the workers and never serves a request itself.

One loop owns everything. Signal handlers do nothing: ``set_wakeup_fd`` writes one
byte per delivered signal to a pipe, which is the signal queue (two quick TTOU count
twice, where Python alone would run a handler once). The loop's ``select`` watches that
pipe and one report pipe per worker. Each turn the loop acts on the queued signals, reaps
dead workers, sends the heartbeat when it is due, and brings the workers in line with what
is wanted:

- ``processes`` serving workers of the current config. A dead one is replaced at once;
  workers that die before their first report (boot) are retried with a growing delay, and
  if none ever boots the master gives up and exits 1. A worker that cannot boot reports
  why (one line, e.g. "user nobody cannot read ...") before it exits; the master logs
  each cause once and gives it to ``luafcgid start``.
- A HUP (reload) is done once ``processes`` workers of the new config serve; when they
  keep failing to boot instead, the master returns to the previous config, whose
  workers never stopped. The outcome goes into the status file for ``luafcgid reload``.
- A worker to be replaced (over ``max_memory``, or still on the config before a HUP) keeps
  serving until its replacement has booted; only then is it sent TERM. A worker that
  retires by itself (``max_requests``) is replaced as soon as it says so.
- A stopping worker gets ``graceful_timeout`` to finish, then KILL. A worker that leaves a
  heartbeat unanswered for ``timeout + graceful_timeout`` is hung: KILL, and a replacement.
- A worker whose report shows a request running past ``timeout + max(5, timeout / 2)`` s
  (``overrun_limit``) holds one its Lua watchdog could not stop (a long C call such as
  ``os.execute``): the last resort, logged as an error with the request's script and URI,
  is KILL for the worker and for every process under it (the ``sh -c`` of ``os.execute``
  and its children), then a replacement. That request is cut off (the web server answers
  502), and so are the others that worker was running: a stuck C call cannot be stopped
  any other way. The margin leaves the watchdog, which stops a Lua loop within
  milliseconds of ``timeout``, every chance first.

A worker "boots" when it answers its first heartbeat: until then it is sent USR2 every
``BOOT_PING`` s (ignored until the worker installs its own handlers).
"""

from __future__ import annotations

import collections
import grp
import json
import os
import pwd
import select
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

import psutil
from setproctitle import setproctitle

from luafcgid import __version__, config, privileges, sessions, signals, sock
from luafcgid import log as logging_setup
from luafcgid.app import prepare_worker_process, speedups_line
from luafcgid.config import Settings
from luafcgid.log import log
from luafcgid.lua import slowlog
from luafcgid.pidfile import Pidfile, PidfileError
from luafcgid.status import remove_status_file, write_snapshot
from luafcgid.workers.threaded import ThreadWorker

MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                  signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
# Until a new worker installs its own handlers these must not end it (a heartbeat, a
# TTIN meant for the master reaching the whole process group) ...
CHILD_IGNORED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
# ... while a stop may end it at once: it serves nothing yet.
CHILD_DEFAULT = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)

BOOT_PING = 0.05           # s between heartbeats to a worker that has not answered one yet
MAX_BOOT_FAILURES = 5      # in a row, before any worker ever booted: give up
BACKOFF_FIRST = 0.1        # s before retrying after a boot failure, doubled each time ...
BACKOFF_MAX = 30.0         # ... up to this
FORK_RETRY = 1.0           # s before trying again when fork() itself fails
STOP_MARGIN = 1.0          # s past graceful_timeout before KILL: the worker's own deadline first
FAST_STOP_TIMEOUT = 5.0    # s an INT/QUIT stop waits before KILL
OVERRUN_MARGIN = 5.0       # s past timeout (at least; timeout / 2 when longer) before a
                           # worker with a request still running is replaced
LONGEST_WAIT = 1.0         # s the loop sleeps at most


class StartError(Exception):
    """The server cannot start: the message says why and what to do."""


@dataclass
class WorkerProcess:
    """What the master knows of one forked worker."""

    number: int
    pid: int
    report_fd: int
    generation: int
    listener: socket.socket
    started: float = field(default_factory=time.time)
    booted: bool = False
    replace: str = ""                       # why to stop it once its replacement has booted
    stop_deadline: Optional[float] = None   # set when it was told to stop (or retires)
    killed: bool = False
    unanswered_since: Optional[float] = None
    figures: dict = field(default_factory=dict)
    rss: int = 0
    pending: bytes = b""
    boot_error: str = ""                    # why it could not boot, as it reported it
    boot_traceback: str = ""

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None


@dataclass
class Running:
    """What a HUP replaces, kept until the new workers serve: a failed reload returns to it."""

    settings: Settings
    owner: Optional[privileges.Owner]
    listener: socket.socket
    processes: int
    generation: int


class Arbiter:
    """The master: ``prepare()`` (bind, checks) then ``run()`` (supervise until stopped)."""

    def __init__(self, config_path: str, settings: Settings,
                 worker_class: type = ThreadWorker) -> None:
        self.config_path = config_path
        self.settings = settings
        self.worker_class = worker_class
        self.processes = settings.processes
        self.listener: Optional[socket.socket] = None
        self.owner: Optional[Tuple[int, int, str]] = None   # (uid, gid, user) for workers
        self.pidfile = Pidfile(settings.pidfile)
        self.workers: Dict[int, WorkerProcess] = {}
        self.generation = 0
        self.old_listeners: List[socket.socket] = []
        self.signal_queue: Deque[int] = collections.deque()
        self.signal_read_fd = -1
        self.signal_write_fd = -1
        self.ready_fd: Optional[int] = None
        self.notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
        self.ready = False
        self.ever_booted = False
        self.boot_failures = 0
        self.spawn_after = 0.0
        self.next_heartbeat = 0.0
        self.stopping: Optional[str] = None     # "graceful" or "fast" once asked to stop
        self.exit_code = 0
        self.started = 0.0
        self.master_rss = 0
        self.retired_requests = 0     # requests served by workers that have exited
        self.status_dirty = True
        self.generations = 0          # generations made so far: each reload makes one
        self.reloads = 0              # HUPs handled
        self.reload_status: Optional[dict] = None  # the last reload and how it went
        self.before_reload: Optional[Running] = None  # set while a reload is pending
        self.last_boot_error = ""

    # -- start ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Checks, then bind: raises StartError with the reason."""
        self.owner = worker_owner(self.config_path, self.settings)
        check_settings(self.config_path, self.settings, self.owner)
        warn_if_root_workers(self.owner)
        running = self.pidfile.running()
        if running is not None:
            raise StartError(f"luafcgid is already running (pid {running}, "
                             f"pidfile {self.pidfile.path})")
        self.listener = bind(self.settings)
        self.give_files_to_workers()
        self.open_slow_log()

    def run(self, ready_fd: Optional[int] = None) -> int:
        """Supervise workers until stopped; the exit status (0 or 1)."""
        assert self.listener is not None, "prepare() first"
        self.ready_fd = ready_fd
        self.started = time.time()
        self.init_signals()
        try:
            self.pidfile.create(os.getpid())
        except PidfileError as error:
            log.error("%s", error)
            self.start_failed(str(error))
            sock.close(self.listener)
            return 1
        setproctitle(f"luafcgid: master [{self.config_path}]")
        log.info("luafcgid %s master started (pid %d), config %s, listening on %s",
                 __version__, os.getpid(), self.config_path, self.settings.listen)
        log.info("%s", speedups_line(self.settings))
        try:
            self.loop()
        finally:
            self.clean_up()
        return self.exit_code

    def init_signals(self) -> None:
        # SIGUSR2 is not a master signal: it must not end the master the way its default would.
        self.signal_read_fd, self.signal_write_fd = signals.open_signal_pipe(
            MASTER_SIGNALS, ignored=(signal.SIGUSR2,))

    # -- the loop -------------------------------------------------------------------------

    def loop(self) -> None:
        while True:
            self.handle_signals()
            self.reap()
            now = time.monotonic()
            if self.stopping:
                if not self.workers:
                    return
                self.kill_overdue(now)
            else:
                self.supervise(now)
            if self.status_dirty:
                self.write_status()
            self.wait(now)

    def supervise(self, now: float) -> None:
        if now >= self.next_heartbeat:
            self.heartbeat(now)
        self.ping_booting()
        self.kill_unresponsive(now)
        self.kill_overdue(now)
        self.spawn_missing(now)
        self.stop_replaced()
        self.check_reload()
        self.close_old_listeners()

    def wait(self, now: float) -> None:
        """Sleep until a signal, a report or the next thing due."""
        fds = [self.signal_read_fd] + [w.report_fd for w in self.workers.values()
                                       if w.report_fd >= 0]
        try:
            readable, _, _ = select.select(fds, [], [], self.next_wakeup(now))
        except InterruptedError:
            return
        by_fd = {w.report_fd: w for w in self.workers.values()}
        for fd in readable:
            if fd == self.signal_read_fd:
                self.read_signals()
            else:
                self.read_reports(by_fd[fd])

    def next_wakeup(self, now: float) -> float:
        due = [now + LONGEST_WAIT]
        if not self.stopping:
            due.append(self.next_heartbeat)
            if self.spawn_after > now:
                due.append(self.spawn_after)
        for worker in self.workers.values():
            if not worker.booted:
                due.append(now + BOOT_PING)
            if worker.stop_deadline is not None and not worker.killed:
                due.append(worker.stop_deadline)
        return max(0.0, min(due) - now)

    def read_signals(self) -> None:
        self.signal_queue.extend(signals.read_signals(self.signal_read_fd))

    # -- signals --------------------------------------------------------------------------

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.popleft()
            if signum == signal.SIGTERM:
                self.stop("graceful")
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self.stop("fast")
            elif signum == signal.SIGHUP and not self.stopping:
                self.reload()
            elif signum == signal.SIGUSR1:
                self.reopen_logs()
            elif signum == signal.SIGTTIN and not self.stopping:
                self.processes += 1
                log.info("TTIN: %d worker processes wanted", self.processes)
            elif signum == signal.SIGTTOU and not self.stopping:
                self.processes = max(1, self.processes - 1)
                log.info("TTOU: %d worker processes wanted", self.processes)

    def stop(self, how: str) -> None:
        """TERM ("graceful") or INT/QUIT ("fast"): stop every worker, then exit."""
        if self.stopping == how or self.stopping == "fast":
            return
        self.stopping = how
        log.info("%s stop: stopping %d worker(s)", how, len(self.workers))
        notify_systemd(self.notify_socket, "STOPPING=1")
        # New clients are refused from now on instead of waiting in a backlog nobody reads.
        for listener in [self.listener] + self.old_listeners:
            sock.close(listener)
        self.old_listeners = []
        for worker in list(self.workers.values()):
            if how == "graceful":
                self.stop_worker(worker, signal.SIGTERM,
                                 self.settings.graceful_timeout + STOP_MARGIN)
            else:
                self.stop_worker(worker, signal.SIGQUIT, FAST_STOP_TIMEOUT)

    def reload(self) -> None:
        """HUP: new settings, new workers; the old ones stop once the new ones serve.

        The outcome goes into the status file (``luafcgid reload`` waits for it): "done"
        once ``processes`` new workers serve, "failed" when the config is refused or the
        new workers keep failing to boot; then the previous config is restored and its
        workers, which never stopped, go on serving.
        """
        self.reloads += 1
        self.reload_status = {"number": self.reloads, "state": "pending", "reason": "",
                              "requested": time.time(), "finished": None}
        self.status_dirty = True
        try:
            settings = config.load(self.config_path)
            owner = worker_owner(self.config_path, settings)
            check_settings(self.config_path, settings, owner)
            listener = self.listener_for(settings)
        except (config.ConfigError, OSError, StartError, sock.SocketError) as error:
            log.error("reload refused, still running the previous config: %s", error)
            self.reload_finished("failed", f"config refused: {error}")
            return
        if self.before_reload is None:  # a second HUP while one is pending keeps the first
            self.before_reload = Running(self.settings, self.owner, self.listener,
                                         self.processes, self.generation)
        if owner != self.owner:  # said once at start; again only when it changes
            warn_if_root_workers(owner)
        if listener is not self.listener:
            self.old_listeners.append(self.listener)
            self.listener = listener
        self.switch_log(settings)
        self.move_pidfile(settings.pidfile)
        self.settings = settings
        self.owner = owner
        self.give_files_to_workers()
        self.open_slow_log()
        self.processes = settings.processes
        self.generations += 1
        self.generation = self.generations
        self.boot_failures = 0
        self.spawn_after = 0.0
        log.info("config %s reloaded: starting %d new worker(s), the old ones stop once "
                 "they serve", self.config_path, self.processes)

    def check_reload(self) -> None:
        """A pending reload is done once ``processes`` workers of the new config serve."""
        if self.before_reload is None:
            return
        booted = sum(1 for w in self.workers.values() if self.counts(w) and w.booted)
        if booted >= self.processes:
            self.before_reload = None
            log.info("reload done: %d worker(s) serve the new config", booted)
            self.reload_finished("done", "")

    def reload_failed(self, cause: str) -> None:
        """The new workers cannot boot: back to the config (and workers) before the HUP."""
        previous = self.before_reload
        assert previous is not None
        self.before_reload = None
        log.error("reload failed: the new workers could not boot (%s); still serving with "
                  "the previous config", cause)
        if self.listener is not previous.listener:
            if previous.listener in self.old_listeners:
                self.old_listeners.remove(previous.listener)
            self.old_listeners.append(self.listener)  # closed once no worker serves on it
            self.listener = previous.listener
        self.switch_log(previous.settings)
        self.move_pidfile(previous.settings.pidfile)
        self.settings, self.owner = previous.settings, previous.owner
        self.processes, self.generation = previous.processes, previous.generation
        self.boot_failures = 0
        self.spawn_after = 0.0
        self.give_files_to_workers()
        self.open_slow_log()
        self.reload_finished("failed", f"the new workers could not boot: {cause}")

    def reload_finished(self, state: str, reason: str) -> None:
        """Record the outcome of the last HUP (a refused HUP that came while an earlier
        one was pending keeps its own "failed" record)."""
        record = self.reload_status
        if record is None or record["state"] != "pending":
            return
        record.update(state=state, reason=reason, finished=time.time())
        self.status_dirty = True

    def open_slow_log(self) -> None:
        """The master writes the slow log's entry for a request it had to kill."""
        if self.settings.slowlog_timeout:
            slowlog.open_log(self.settings.slowlog)

    def switch_log(self, settings: Settings) -> None:
        old = (self.settings.logfile, self.settings.loglevel)
        if (settings.logfile, settings.loglevel) == old:
            return
        try:
            logging_setup.setup(settings.logfile, settings.loglevel)
        except OSError as error:
            logging_setup.setup(*old)
            log.error("cannot open the log file %s (%s): still logging to %s",
                      settings.logfile, error.strerror, old[0] or "stderr")

    def move_pidfile(self, path: str) -> None:
        if path == self.pidfile.path:
            return
        try:
            Pidfile(path).create(os.getpid())
        except PidfileError as error:
            log.error("%s: keeping the pidfile %s", error, self.pidfile.path)
            return
        self.remove_state_files()
        self.pidfile = Pidfile(path)

    def listener_for(self, settings: Settings) -> socket.socket:
        """The current listener when ``listen`` is unchanged, else a new one."""
        assert self.listener is not None
        if settings.listen != self.settings.listen:
            return bind(settings)
        self.listener.listen(settings.backlog)
        if sock.tcp_address(settings.listen) is None:
            sock.set_permissions(settings.listen, settings.socket_mode, settings.socket_owner)
        return self.listener

    def reopen_logs(self) -> None:
        logging_setup.reopen()
        self.give_files_to_workers()
        log.info("USR1: log reopened")
        for worker in self.workers.values():
            send(worker.pid, signal.SIGUSR1)

    def give_files_to_workers(self) -> None:
        """Workers write and reopen their logs, and write the SQLite session file,
        themselves: once privileges are dropped they must own them (created here, as
        root, when missing)."""
        self.prepare_sessions()
        if self.owner is None:
            return
        uid, gid, user = self.owner
        settings = self.settings
        for path in (settings.logfile, settings.access_log, settings.slowlog):
            if not path:
                continue
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
                os.chown(path, uid, gid)
            except OSError as error:
                log.warning("cannot give the log file %s to %s (%s): workers may fail to "
                            "write or reopen it", path, user, error.strerror)

    def prepare_sessions(self) -> None:
        """Make the SQLite file's directory, owned by the workers' user: SQLite creates its
        -wal and -shm files beside the database. (check_settings imported the store's
        modules already.)"""
        path = sessions.sqlite_path(self.settings.session_store)
        if path is None:
            return
        directory = os.path.dirname(path)
        try:
            if not os.path.isdir(directory):
                os.mkdir(directory, 0o700)  # not its parents: a missing parent is a typo
                if self.owner is not None:
                    os.chown(directory, self.owner[0], self.owner[1])
        except OSError as error:
            log.warning("cannot make the session directory %s (%s): scripts using Session "
                        "will fail; create it for the workers' user or set session_store",
                        directory, error.strerror)

    # -- workers: birth -------------------------------------------------------------------

    def spawn_missing(self, now: float) -> None:
        serving = [w for w in self.workers.values() if self.counts(w)]
        missing = self.processes - len(serving)
        if missing < 0:
            for worker in sorted(serving, key=lambda w: w.number, reverse=True)[:-missing]:
                log.info("worker %d (pid %d) is one too many: stopping it", worker.number,
                         worker.pid)
                self.stop_worker(worker, signal.SIGTERM,
                                 self.settings.graceful_timeout + STOP_MARGIN)
            return
        if now < self.spawn_after:
            return
        if self.boot_failures:
            missing = min(missing, 1)  # after a boot failure, one at a time
        busy_numbers = {w.number for w in serving}
        for _ in range(missing):
            number = next(n for n in range(1, len(busy_numbers) + 2) if n not in busy_numbers)
            busy_numbers.add(number)
            self.spawn(number)

    def counts(self, worker: WorkerProcess) -> bool:
        """True for a worker that counts towards ``processes`` (none replaces it)."""
        return not worker.stopping and not worker.replace and worker.generation == self.generation

    def spawn(self, number: int) -> None:
        assert self.listener is not None
        try:
            pid, fd = privileges.fork_with_pipe(MASTER_SIGNALS)
        except OSError as error:
            self.spawn_after = time.monotonic() + FORK_RETRY
            log.error("cannot fork a worker (%s): retrying in %g s", error.strerror, FORK_RETRY)
            return
        if pid == 0:
            self.become_worker(number, fd)  # the child: fd is the pipe's write end
        os.set_blocking(fd, False)
        self.workers[pid] = WorkerProcess(number, pid, fd, self.generation, self.listener,
                                          unanswered_since=time.monotonic())
        self.status_dirty = True
        log.debug("worker %d started (pid %d)", number, pid)

    def become_worker(self, number: int, report_fd: int) -> None:
        """In the forked child: shed the master's state, become a worker, never return."""
        code = 0
        worker = None
        try:
            signal.set_wakeup_fd(-1)
            for signum in CHILD_IGNORED:
                signal.signal(signum, signal.SIG_IGN)
            for signum in CHILD_DEFAULT:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            # The ready pipe especially: the CLI waits for its end, not for some worker's.
            inherited = [self.signal_read_fd, self.signal_write_fd, self.ready_fd]
            inherited += [w.report_fd for w in self.workers.values()]
            for fd in inherited:
                if fd is not None and fd >= 0:
                    os.close(fd)
            for listener in self.old_listeners:
                listener.close()
            os.set_blocking(report_fd, False)
            # Before dropping privileges: it opens the package's compiled speed-ups, which
            # the workers' user may not be able to read.
            prepare_worker_process(self.settings)
            privileges.drop(self.owner)
            worker = self.worker_class(number, self.listener, self.settings, report_fd)
            worker.run()
        except BaseException as error:
            code = 1
            if worker is not None and worker.booted:
                log.exception("worker %d (pid %d) failed", number, os.getpid())
            else:  # the master logs it, once per cause: not one traceback per attempt
                report_boot_failure(report_fd, error)
        finally:
            os._exit(code)

    # -- workers: life --------------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        """USR2 to every serving worker, and a look at everyone's memory."""
        self.next_heartbeat = now + self.settings.sweep / 1000.0
        limit = self.settings.max_memory * 1024 * 1024
        for worker in self.workers.values():
            if worker.stopping or not worker.booted:
                continue
            send(worker.pid, signal.SIGUSR2)
            if worker.unanswered_since is None:
                worker.unanswered_since = now
            worker.rss = rss_of(worker.pid)
            if limit and worker.rss > limit and not worker.replace:
                log.info("worker %d (pid %d) uses %.1f MiB, over max_memory (%d MiB): "
                         "replacing it", worker.number, worker.pid, worker.rss / 1048576,
                         self.settings.max_memory)
                worker.replace = "over max_memory"
        self.master_rss = rss_of(os.getpid())
        self.status_dirty = True

    def ping_booting(self) -> None:
        for worker in self.workers.values():
            if not worker.booted and not worker.stopping:
                send(worker.pid, signal.SIGUSR2)

    def read_reports(self, worker: WorkerProcess) -> None:
        try:
            data = os.read(worker.report_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.close_reports(worker)
            return
        *lines, worker.pending = (worker.pending + data).split(b"\n")
        for line in lines:
            try:
                figures = json.loads(line)
            except ValueError:
                log.warning("worker %d (pid %d) sent a report that is not JSON: %r",
                            worker.number, worker.pid, line[:200])
                continue
            self.note_report(worker, figures)

    def note_report(self, worker: WorkerProcess, figures: dict) -> None:
        if "boot_error" in figures:  # its last words: it exits next
            worker.boot_error = str(figures["boot_error"])
            worker.boot_traceback = str(figures.get("traceback") or "")
            return
        worker.figures = figures
        worker.unanswered_since = None
        self.status_dirty = True
        if not worker.booted:
            worker.booted = True
            worker.rss = rss_of(worker.pid)
            self.ever_booted = True
            self.boot_failures = 0
            self.last_boot_error = ""
            log.debug("worker %d (pid %d) is serving", worker.number, worker.pid)
            if not self.ready:
                self.announce_ready()
        self.check_overrun(worker, figures)
        if figures.get("retiring") and not worker.stopping:
            log.info("worker %d (pid %d) retires after %s requests (max_requests): "
                     "starting its replacement", worker.number, worker.pid,
                     figures.get("requests"))
            worker.stop_deadline = time.monotonic() + self.settings.graceful_timeout + STOP_MARGIN

    def check_overrun(self, worker: WorkerProcess, figures: dict) -> None:
        """Kill a worker holding a request its watchdog could not stop (rare), and the
        processes that request started: the request must not outlive the promise."""
        oldest = figures.get("oldest") or 0
        limit = overrun_limit(self.settings.timeout)
        if oldest <= limit or worker.stopping:
            return
        script = figures.get("oldest_script") or "(unknown script)"
        uri = figures.get("oldest_uri") or "-"
        # With jit = true a loop LuaJIT compiled runs no hook either (docs/design.rst).
        cause = ("a long C call such as os.execute, or a loop LuaJIT compiled (jit = true)"
                 if self.settings.jit else "a long C call such as os.execute")
        log.error("worker %d (pid %d): a request to %s (uri %s) has run for %.1f s, past "
                  "timeout (%g s) + margin: the Lua watchdog could not stop it (%s?); "
                  "killing the worker and the processes it started, and starting a "
                  "replacement", worker.number, worker.pid, script, uri, oldest,
                  self.settings.timeout, cause)
        if self.settings.slowlog_timeout:
            slowlog.record_killed(worker.number, worker.pid, script, uri, oldest)
        worker.stop_deadline = time.monotonic()
        self.kill(worker)

    def close_reports(self, worker: WorkerProcess) -> None:
        if worker.report_fd >= 0:
            os.close(worker.report_fd)
            worker.report_fd = -1

    def stop_replaced(self) -> None:
        """TERM one worker waiting for a replacement per replacement that has booted."""
        waiting = [w for w in self.workers.values()
                   if not w.stopping and not self.counts(w)]
        booted = sum(1 for w in self.workers.values() if self.counts(w) and w.booted)
        surplus = max(0, booted + len(waiting) - self.processes)
        for worker in sorted(waiting, key=lambda w: (w.generation, w.started))[:surplus]:
            why = worker.replace or "on the previous config"
            log.info("worker %d (pid %d), %s, is replaced: stopping it gracefully",
                     worker.number, worker.pid, why)
            self.stop_worker(worker, signal.SIGTERM,
                             self.settings.graceful_timeout + STOP_MARGIN)

    def stop_worker(self, worker: WorkerProcess, signum: int, timeout: float) -> None:
        send(worker.pid, signum)
        deadline = time.monotonic() + timeout
        if worker.stop_deadline is None or deadline < worker.stop_deadline:
            worker.stop_deadline = deadline
        self.status_dirty = True

    def kill_overdue(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.stop_deadline is not None and now >= worker.stop_deadline \
                    and not worker.killed:
                log.warning("worker %d (pid %d) did not stop in time: killing it",
                            worker.number, worker.pid)
                self.kill(worker)

    def kill_unresponsive(self, now: float) -> None:
        limit = self.settings.timeout + self.settings.graceful_timeout
        for worker in self.workers.values():
            since = worker.unanswered_since
            if worker.stopping or since is None or now - since <= limit:
                continue
            log.error("worker %d (pid %d) has not answered the heartbeat for %.0f s "
                      "(timeout + graceful_timeout): killing it and starting a replacement",
                      worker.number, worker.pid, now - since)
            worker.stop_deadline = now
            self.kill(worker)

    def kill(self, worker: WorkerProcess) -> None:
        kill_with_descendants(worker.pid)
        worker.killed = True

    # -- workers: death -------------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.read_last_reports(worker)
                self.worker_exited(worker, status)

    def read_last_reports(self, worker: WorkerProcess) -> None:
        """A worker's last lines (its "retiring" one) may still sit in its pipe."""
        while worker.report_fd >= 0:
            fd = worker.report_fd
            self.read_reports(worker)
            if worker.report_fd == fd and not select.select([fd], [], [], 0)[0]:
                self.close_reports(worker)

    def worker_exited(self, worker: WorkerProcess, status: int) -> None:
        self.status_dirty = True
        self.retired_requests += worker.figures.get("requests") or 0
        how = describe_exit(status)
        if worker.stopping:
            log.info("worker %d (pid %d) stopped (%s)", worker.number, worker.pid, how)
        elif worker.booted:
            log.warning("worker %d (pid %d) died (%s)%s: starting a replacement",
                        worker.number, worker.pid, how, crash_cause(status))
        else:
            self.boot_failed(worker, how)

    def boot_failed(self, worker: WorkerProcess, how: str) -> None:
        """A worker died before serving: retry with a growing delay; after
        MAX_BOOT_FAILURES in a row give up the start, or the reload under way."""
        self.boot_failures += 1
        cause = worker.boot_error or how
        given_up = self.boot_failures >= MAX_BOOT_FAILURES and (
            self.before_reload is not None or not self.ever_booted)
        delay = min(BACKOFF_FIRST * 2 ** (self.boot_failures - 1), BACKOFF_MAX)
        then = "" if given_up else f": retrying in {delay:.1f} s"
        # The cause (and traceback) once; the same one again is one short line.
        if cause != self.last_boot_error:
            details = f"\n{worker.boot_traceback.rstrip()}" if worker.boot_traceback else ""
            log.error("worker %d (pid %d) could not boot (%s): %s%s%s", worker.number,
                      worker.pid, how, cause, then, details)
        else:
            log.error("worker %d (pid %d) could not boot (%s), same cause%s", worker.number,
                      worker.pid, how, then)
        self.last_boot_error = cause
        if not given_up:
            self.spawn_after = time.monotonic() + delay
        elif self.before_reload is not None:
            self.reload_failed(cause)
        else:
            message = (f"workers failed to boot {self.boot_failures} times in a row: "
                       f"{cause}. Giving up")
            log.error("%s", message)
            self.start_failed(message)
            self.exit_code = 1
            self.stop("fast")

    def close_old_listeners(self) -> None:
        """A listener left by a HUP is closed once no worker serves on it."""
        for listener in list(self.old_listeners):
            if all(w.listener is not listener for w in self.workers.values()):
                sock.close(listener)
                self.old_listeners.remove(listener)

    # -- telling others -------------------------------------------------------------------

    def announce_ready(self) -> None:
        self.ready = True
        log.info("ready: serving on %s", self.settings.listen)
        notify_systemd(self.notify_socket, "READY=1")
        self.tell_starter(b"ready\n")

    def start_failed(self, message: str) -> None:
        self.tell_starter(b"error: " + message.encode() + b"\n")

    def tell_starter(self, message: bytes) -> None:
        """One line to the ``luafcgid start`` that waits for this daemon (if any)."""
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, message)
        except OSError:
            pass  # the starter gave up waiting
        os.close(self.ready_fd)
        self.ready_fd = None

    def write_status(self) -> None:
        """The figures ``luafcgid status`` shows, replaced atomically."""
        self.status_dirty = False
        workers = [{"number": w.number, "pid": w.pid, "started": w.started, "rss": w.rss,
                    "requests": w.figures.get("requests"), "busy": w.figures.get("busy"),
                    "states": w.figures.get("states"), "slow": w.figures.get("slow"),
                    "state": "stopping" if w.stopping else "serving" if w.booted else "booting"}
                   for w in sorted(self.workers.values(), key=lambda w: (w.number, w.started))]
        settings = self.settings
        status = {"pid": os.getpid(), "config": self.config_path, "listen": settings.listen,
                  "started": self.started, "updated": time.time(), "rss": self.master_rss,
                  "sweep": settings.sweep, "processes": self.processes,
                  "retired_requests": self.retired_requests, "workers": workers,
                  # What the CLI needs when the config file on disk no longer loads.
                  "threads": settings.workers, "backlog": settings.backlog,
                  "graceful_timeout": settings.graceful_timeout,
                  "reload": self.reload_status}
        write_snapshot(self.pidfile.path, status)

    def clean_up(self) -> None:
        """Whatever ended the loop: no worker, socket file, pidfile or status file left."""
        if self.stopping is None:  # the loop died of an exception: take the workers along
            for worker in self.workers.values():
                send(worker.pid, signal.SIGKILL)
        for listener in [self.listener] + self.old_listeners:
            sock.close(listener)
        self.remove_state_files()
        self.tell_starter(b"error: the master stopped before it served; see the log\n")
        log.info("luafcgid master (pid %d) exits (%d)", os.getpid(), self.exit_code)

    def remove_state_files(self) -> None:
        self.pidfile.remove(os.getpid())
        remove_status_file(self.pidfile.path)


# -- helpers ------------------------------------------------------------------------------


def overrun_limit(timeout: float) -> float:
    """Seconds a request may run before its worker is replaced (see the module docstring)."""
    return timeout + max(OVERRUN_MARGIN, timeout / 2)


def check_settings(config_path: str, settings: Settings,
                   owner: Optional[privileges.Owner]) -> None:
    """What the config file alone cannot tell: StartError when the workers could not work.

    The session store's modules are imported here, in the master (a worker that dropped
    privileges may not be able to), so a store whose package is missing is refused now
    rather than failing every sign-in. Then, when the workers switch to another account,
    it must reach the document root and the startup script.
    """
    try:
        sessions.store_class(settings.session_store)
    except sessions.StoreError as error:
        raise StartError(f"{config_path}: session_store: {error}") from None
    if owner is None or owner[0] == 0:
        return
    for key, path, kind in (("root", settings.root, "directory"),
                            ("startup", settings.startup, "file")):
        problem = privileges.unreachable(owner, [(path, kind)]) if path else None
        if problem:
            raise StartError(f"{config_path}: {key}: {problem}. Make it readable by "
                             f"{owner[2]} (and the directories above it enterable), move "
                             "it, or set user to an account that can read it")


def warn_if_root_workers(owner: Optional[privileges.Owner]) -> None:
    if os.geteuid() == 0 and (owner is None or owner[0] == 0):
        log.warning("workers run as root (user = \"root\"): a script can do anything root "
                    "can. Fine for a demo on 127.0.0.1; a real server gives its workers an "
                    "account of their own (user = \"www-data\")")


def report_boot_failure(report_fd: int, error: BaseException) -> None:
    """In a worker that could not boot: why, in one line (and the traceback when it is not
    a plain OSError), to the master, which logs it."""
    cause = describe_boot_error(error)
    trace = "" if isinstance(error, OSError) else traceback.format_exc()
    try:
        os.write(report_fd, json.dumps({"boot_error": cause, "traceback": trace}).encode()
                 + b"\n")
    except OSError:
        log.error("worker (pid %d) could not boot: %s\n%s", os.getpid(), cause, trace)


def describe_boot_error(error: BaseException) -> str:
    """``user nobody cannot read /x/y (Permission denied)`` rather than a traceback."""
    if isinstance(error, PermissionError) and error.filename:
        return (f"user {privileges.user_name()} cannot read {error.filename} "
                f"({error.strerror})")
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return f"{type(error).__name__}: {error}"


def kill_with_descendants(pid: int) -> None:
    """KILL a worker and every process under it (a script's ``os.execute`` child and its
    own children), found before the kill: once their parent is gone they are re-parented
    and could no longer be told from anyone else's."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    send(pid, signal.SIGKILL)
    for process in descendants:
        try:
            process.kill()
        except psutil.Error:
            pass


def bind(settings: Settings) -> socket.socket:
    try:
        return sock.bind(settings.listen, settings.backlog, settings.socket_mode,
                         settings.socket_owner)
    except sock.SocketError as error:
        raise StartError(str(error)) from None


def worker_owner(config_path: str, settings: Settings) -> Optional[Tuple[int, int, str]]:
    """(uid, gid, user) the workers switch to, None to stay as they are.

    Only root switches; root refuses to keep workers as root unless told ``user = "root"``.
    """
    if os.geteuid() != 0:
        if settings.user or settings.group:
            log.info("user/group ignored: luafcgid was not started as root")
        return None
    if not settings.user:
        raise StartError(f"{config_path}: user: refusing to run workers as root; set user "
                         "to an unprivileged account (or user = \"root\" to allow it)")
    try:
        account = pwd.getpwnam(settings.user)
        gid = grp.getgrnam(settings.group).gr_gid if settings.group else account.pw_gid
    except KeyError:
        raise StartError(f"{config_path}: user/group: no such account "
                         f"({settings.user!r}, {settings.group!r})") from None
    if account.pw_uid == 0 and not settings.group:
        return None
    return account.pw_uid, gid, account.pw_name


def send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it died meanwhile; reap() will see it


def rss_of(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)


def crash_cause(status: int) -> str:
    """What usually kills a worker with a crash signal, for its log line ("" otherwise)."""
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in CRASH_SIGNALS:
        return (": a C module or the Lua runtime crashed; the requests it was running got "
                "no answer (the web server logs their URLs)")
    return ""


def notify_systemd(address: Optional[str], message: str) -> None:
    """sd_notify(3) for ``Type=notify`` units: a datagram to $NOTIFY_SOCKET."""
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(message.encode(), address)
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", address, error.strerror)
