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

import json
import os
import random
import signal
import socket
from typing import Optional

from setproctitle import setproctitle

from luafcgid import log as logging_setup
from luafcgid import signals
from luafcgid.app import Application, prepare_worker_process
from luafcgid.config import Settings
from luafcgid.log import log
from luafcgid.lua import slowlog
from luafcgid.protocol import Request

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# The master's signals: a worker leaves them to the master (Ctrl-C in a terminal reaches the
# whole process group; the master turns it into a stop for everyone).
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


class Worker:
    """One worker process: owns an :class:`Application` and serves on ``listener``."""

    def __init__(self, number: int, listener: socket.socket, settings: Settings,
                 report_fd: Optional[int] = None) -> None:
        self.number = number
        self.listener = listener
        self.settings = settings
        self.report_fd = report_fd
        self.pid = self.ppid = 0    # known in run(), in the child
        self.alive = True           # False once a stop was asked for
        self.booted = False         # True once it serves: a failure before is a boot failure
        self.fast_exit = False      # INT/QUIT: do not wait for in-flight requests
        self.app: Optional[Application] = None
        self.max_requests = self._request_limit(settings)
        self.signal_read_fd = -1
        self.signal_write_fd = -1

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
        self.booted = True
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
        self.alive = False
        self.fast_exit = self.fast_exit or fast
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
        """``oldest``: seconds the longest-running request has run (0 when none): the
        master kills a worker whose request overran ``timeout`` (arbiter.py) and names
        that request's ``oldest_script`` and ``oldest_uri`` in its log."""
        assert self.app is not None
        figures = {"pid": self.pid, "requests": self.app.requests, "busy": self.busy_threads(),
                   "states": self.app.states_loaded(),
                   "oldest": round(self.app.oldest_running(), 3), "slow": slowlog.recorded()}
        oldest = self.oldest_request()
        if figures["oldest"] and oldest is not None:
            params = oldest.params
            figures["oldest_script"] = params.get(b"SCRIPT_FILENAME", b"").decode(
                "utf-8", "replace")
            figures["oldest_uri"] = params.get(b"REQUEST_URI", b"").decode("utf-8", "replace")
        return figures

    def busy_threads(self) -> int:
        return 0

    def oldest_request(self) -> Optional[Request]:
        """The request running longest now (None when none runs, or when not known)."""
        return None

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
        if self.max_requests and self.alive and self.app.requests >= self.max_requests:
            log.info("worker %d: served %d requests (max_requests), retiring",
                     self.number, self.app.requests)
            self.report(retiring=True)
            self.stop(fast=False)
