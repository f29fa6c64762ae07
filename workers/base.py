"""A worker process's life: title, signals, heartbeat reports, the way out.

The arbiter forks, builds a worker with the already-bound listening socket and
calls :meth:`Worker.run` in the child. Signals are not acted on inside their
handlers: ``signal.set_wakeup_fd`` writes each signal number to a pipe that the
serving loop watches (:mod:`luafcgid.signals`, as the master's), and the loop
calls :meth:`Worker.handle_signal` between events — so a heartbeat never interrupts a
request half-way.

Signals from the master:
    TERM       graceful stop: stop accepting, finish in-flight requests
               (up to ``graceful_timeout``), exit
    INT, QUIT  fast stop
    USR1       reopen log files
    USR2       heartbeat: sweep changed scripts, report figures to the master (among
               them the age of the oldest running request, see :meth:`Worker.figures`)
"""

from __future__ import annotations

import enum
import json
import os
import random
import signal
import socket
import time
from typing import Optional

from setproctitle import setproctitle

from luafcgid import log as logging_setup
from luafcgid import signals
from luafcgid.app import Application, prepare_worker_process
from luafcgid.config import Settings
from luafcgid.log import log

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# The master's signals: a worker leaves them to the master (Ctrl-C in a terminal reaches the
# whole process group; the master turns it into a stop for everyone).
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


class Phase(enum.Enum):
    """Where a worker is in its life; it only moves down the list."""

    BOOTING = "booting"              # a failure now is a boot failure
    SERVING = "serving"
    STOPPING = "stopping"            # TERM: no new connections, in-flight requests finish
    STOPPING_FAST = "stopping fast"  # INT/QUIT: in-flight requests are not waited for


# For the serving loop's checks: a module global, not an attribute lookup on Phase.
SERVING = Phase.SERVING


class Worker:
    """One worker process: owns an :class:`Application` and serves on ``listener``."""

    def __init__(self, number: int, listener: socket.socket, settings: Settings,
                 report_fd: Optional[int] = None) -> None:
        self.number = number
        self.listener = listener
        self.settings = settings
        self.report_fd = report_fd
        self.pid = self.ppid = 0    # known in run(), in the child
        self.phase = Phase.BOOTING
        self.stop_deadline = 0.0    # stopping: when in-flight requests are waited for no more
        self.app: Optional[Application] = None
        self.max_requests = self._request_limit(settings)
        self.signal_read_fd = -1
        self.signal_write_fd = -1

    @property
    def booted(self) -> bool:
        """It came to serve: a failure from then on is not a boot failure."""
        return self.phase is not Phase.BOOTING

    @staticmethod
    def _request_limit(settings: Settings) -> int:
        if settings.max_requests <= 0:
            return 0
        return settings.max_requests + random.randint(0, max(0, settings.max_requests_jitter))

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until told to stop; the caller then exits the process."""
        self.pid = os.getpid()
        self.ppid = os.getppid()
        setproctitle(f"luafcgid: worker {self.number}")
        prepare_worker_process(self.settings)
        self.app = Application(self.settings, self.number)
        self.init_signals()
        log.debug("worker %d booted (pid %d)", self.number, self.pid)
        if self.phase is Phase.BOOTING:  # (a stop asked for meanwhile stands)
            self.phase = Phase.SERVING
        try:
            self.serve()
        finally:
            self.app.close()
        log.debug("worker %d (pid %d) exits", self.number, self.pid)

    def serve(self) -> None:  # pragma: no cover - each worker class has its own loop
        raise NotImplementedError

    def init_signals(self) -> None:
        self.signal_read_fd, self.signal_write_fd = signals.open_signal_pipe(
            HANDLED_SIGNALS, ignored=IGNORED_SIGNALS)

    def wake(self) -> None:
        """Wake the serving loop from another thread (a zero byte reads as no signal)."""
        if self.signal_write_fd >= 0:
            signals.wake(self.signal_write_fd)

    def read_signals(self) -> None:
        """Act on every signal that arrived since the last call (loop thread only)."""
        for signum in signals.read_signals(self.signal_read_fd, 64):
            self.handle_signal(signum)

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGUSR2:
            self.heartbeat()
        elif signum == signal.SIGTERM:
            self.stop(fast=False)
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            self.stop(fast=True)
        elif signum == signal.SIGUSR1:
            logging_setup.reopen()

    def stop(self, fast: bool) -> None:
        """Ask the serving loop to stop (any thread); a fast stop overrides a graceful one."""
        if self.phase is Phase.SERVING or self.phase is Phase.BOOTING:
            self.stop_deadline = time.monotonic() + self.settings.graceful_timeout
            self.phase = Phase.STOPPING
        if fast:
            self.phase = Phase.STOPPING_FAST
        self.wake()

    # -- heartbeat and figures ------------------------------------------------------------

    def heartbeat(self) -> None:
        assert self.app is not None
        dropped = self.app.sweep()
        if dropped:
            log.info("worker %d: dropped %d Lua state(s) whose script changed on disk",
                     self.number, dropped)
        self.report()

    def figures(self) -> dict:
        """The application's figures (:meth:`Application.figures`: ``oldest`` among them,
        which the master watches) with this process's pid and busy threads."""
        assert self.app is not None
        return {**self.app.figures(), "pid": self.pid, "busy": self.busy_threads()}

    def busy_threads(self) -> int:
        return 0

    def report(self, **extra: object) -> None:
        """Write one JSON line of figures to the master (nothing when run alone)."""
        if self.report_fd is None:
            return
        line = json.dumps({**self.figures(), **extra}).encode() + b"\n"
        try:
            os.write(self.report_fd, line)
        except (BlockingIOError, BrokenPipeError):
            pass  # the master is gone or behind; the next heartbeat reports again

    def request_done(self) -> None:
        """Called after each request: retire after ``max_requests``."""
        assert self.app is not None
        if (self.max_requests and self.phase is SERVING
                and self.app.requests >= self.max_requests):
            log.info("worker %d: served %d requests (max_requests), retiring",
                     self.number, self.app.requests)
            self.report(retiring=True)
            self.stop(fast=False)
