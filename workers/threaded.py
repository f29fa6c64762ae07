"""The worker that serves: an event loop for connections, threads for Lua.

Connections belong to the event loop, never to a thread: the loop accepts,
reads and parses records (luafcgid.protocol), so an idle kept-alive
connection, or a client sending one byte a second, costs no thread.

The loop is a baton passed between the ``workers`` threads, not a thread of
its own (workers/baton.py). The thread holding it runs complete requests inline,
which costs no thread switch — handing every request to a pool thread cost more
CPU than all the rest of the work (docs/design.rst). If a Lua call keeps the
holder longer than ``baton.HANDOFF_AFTER``, the standby thread takes the baton and
goes on serving the other connections; the old holder finishes its request
and waits to be needed again. So a slow script delays the others by 5 to
10 ms at most, and at most ``workers`` requests run at once.

An answer that does not fit the socket at once waits in the connection's
outbox for the loop to write, so a client that does not read holds no thread.
Accepted sockets are left in blocking mode (setting it is a syscall per
connection): every recv and send on them passes ``DONTWAIT``.

A new connection is read at once: the web server writes its request right
after connecting, so it is usually there. A connection whose only request
(no KEEP_CONN) came whole with that first read is never registered with the
selector: answered, then closed, it costs no epoll_ctl calls and no extra
loop round.

Selector changes are the holder's job, so the selector's table never goes
stale: the holder closes a non-kept connection it answered itself; another
thread hands it to the loop (``handed_over``) to close. A connection the loop
gives up on while a thread still writes to it is closed by that thread when
it finishes.
"""

from __future__ import annotations

import collections
import os
import select
import selectors
import socket
import sys
import threading
import time
from typing import Optional, Union

import psutil

from luafcgid import protocol
from luafcgid.config import Settings
from luafcgid.log import AccessLog, log, open_access_log
from luafcgid.response import body_bytes, error_page, status_of
from luafcgid.workers.base import SERVING, Phase, Worker
from luafcgid.workers.baton import Baton

# At its connection cap (max_connections) a worker closes an idle kept-alive connection to
# take a new one; with none idle it leaves the listener alone (new connections wait in the
# kernel's backlog, where another worker process may take them), and once it has been full
# for SHED_AFTER seconds with connections still waiting, it answers those 503.
SHED_AFTER = 1.0
# Bytes asked of one recv(): a whole FastCGI record fits. Python allocates the full size
# before the call; from 128 KiB glibc serves that with mmap/munmap, a cost per recv.
READ_SIZE = 64 * 1024
ACCEPT_BATCH = 64
# Every recv and send on an accepted socket: never wait, whatever the socket's mode.
DONTWAIT = socket.MSG_DONTWAIT
# How often the loop looks at its parent, its stop deadline and stalled clients.
TICK = 1.0
# Closing a connection whose answer may not all be on its way yet: seconds we read (and
# drop) what the client still sends, waiting for it to close (Apache's lingering close;
# see ThreadWorker.linger), and the answer size from which that is done. A local peer
# takes smaller answers whole at once (Linux's initial receive window is 64 KiB).
LINGER = 2.0
LINGER_ABOVE = 64 * 1024

Job = Union[protocol.Request, bytes]


class Connection:
    """One client connection: its socket, its FastCGI side (``fastcgi``: the records read
    so far, sans I/O), and who holds it."""

    __slots__ = ("sock", "fd", "fastcgi", "lock", "working", "pending", "closed",
                 "last_request_in",
                 "request_id", "send_timeout", "head", "streamed", "outbox", "stalled_since",
                 "events", "shed", "big", "lingering")

    def __init__(self, sock: socket.SocketType, fastcgi: protocol.Connection,
                 lock: threading.Lock, send_timeout: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()    # its key in the worker's table, kept while it is open
        self.fastcgi = fastcgi
        self.lock = lock           # the worker's lock: guards working, pending, closed, outbox
        self.working = False       # a job of it is queued or running (later ones: pending)
        self.pending: collections.deque = collections.deque()  # jobs waiting for that one
        self.closed = False        # the loop dropped it while working: the thread closes it
        self.last_request_in = False  # its last request (no KEEP_CONN) is in: close once answered
        self.request_id = 0
        self.send_timeout = send_timeout
        self.head = b""            # with an access log: the first output flushed early ...
        self.streamed = 0          # ... and how many bytes were flushed early in all
        # Answers the client has not taken yet, written by the event loop: a finished
        # request never keeps its thread waiting for a client that reads slowly, or not at all.
        self.outbox: collections.deque = collections.deque()
        self.stalled_since = 0.0   # when the outbox last moved
        self.events = 0            # what the selector watches it for (0: not registered)
        self.shed = False          # taken over the cap: its request is answered 503
        self.big = False           # an answer was large or streamed: close by lingering
        self.lingering = 0.0       # answered and shut for writing at this time: read, then close

    def send(self, data: bytes) -> None:
        """Send now, waiting for room (a running script's flush: backpressure is right).

        Behind an earlier answer still in the outbox (only a client that sends a request
        before reading the last answer gets there) it is queued, to keep the order."""
        if self.outbox:  # only this connection's own thread fills it: re-check under the lock
            with self.lock:
                if self.outbox:
                    self.outbox.append(memoryview(data))
                    return
        send_all(self.sock, data, self.send_timeout)

    def send_final(self, data: bytes) -> bool:
        """Send what ends a request; False when the rest was left in the outbox for the loop."""
        if not self.outbox:
            try:
                sent = self.sock.send(data, DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return True
            data = memoryview(data)[sent:]
        with self.lock:
            if not self.outbox:
                self.stalled_since = time.monotonic()
            self.outbox.append(memoryview(data))
        return False

    def sink(self, data: bytes) -> None:
        """Where a script's flushed output goes: STDOUT records, sent now."""
        if data:
            self.big = True
            self.send(protocol.stdout_records(self.request_id, data))

    def logged_sink(self, data: bytes) -> None:
        """:meth:`sink` that also notes what the access log needs (used only with one)."""
        if data:
            if not self.streamed:
                self.head = data
            self.streamed += len(data)
            self.sink(data)


def send_all(sock: socket.SocketType, data: bytes, timeout: float) -> None:
    """Send all of ``data``, waiting up to ``timeout`` s for room (the buffer may be full
    already: a script flushing faster than its client reads)."""
    view = memoryview(data)
    poller = None
    while True:
        try:
            view = view[sock.send(view, DONTWAIT):]
        except BlockingIOError:
            pass
        if not view:
            return
        if poller is None:  # built only when the socket is full
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            deadline = time.monotonic() + timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"client did not read the response for {timeout:g} s")
        poller.poll(remaining * 1000)


class ThreadWorker(Worker):
    """Serves FastCGI with ``workers`` threads passing the event loop between them."""

    def __init__(self, number: int, listener: socket.socket, settings: Settings,
                 report_fd: Optional[int] = None) -> None:
        super().__init__(number, listener, settings, report_fd)
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, Connection] = {}
        self.ready: collections.deque = collections.deque()  # (connection, job) to run, in order
        self.lock = threading.Lock()  # guards ready, working_connections, handed_over, baton
        self.baton = Baton(self.lock)
        self.working_connections = 0  # connections with a job queued or running
        self.accepting = False
        # Connections a thread that lost the loop handed over: an outbox to write, or done.
        self.handed_over: collections.deque = collections.deque()
        self.next_tick = 0.0
        self.full_since = 0.0      # when the connection cap was last reached (0: not full)
        # The answer to a connection taken over the cap (shed_overflow).
        self.overloaded = error_page(503, settings.headers,
                                     "every connection of this worker is busy; try again",
                                     b"Retry-After: 1\r\n")
        # maxpost = 0 means no limit, as nginx's client_max_body_size 0 and PHP's
        # post_max_size = 0 do.
        self.maxpost = settings.maxpost or sys.maxsize
        self.access_log: Optional[AccessLog] = None  # opened as serving starts

    def serve(self) -> None:
        if self.settings.access_log:
            self.access_log = open_access_log(self.settings.access_log,
                                              self.settings.access_log_format, self.number)
        assert self.app is not None
        self.app.live_figures = self.figures  # the status page's figures of this worker
        self.listener.setblocking(False)
        self.selector.register(self.signal_read_fd, selectors.EVENT_READ, "signals")
        self.start_accepting()
        others = [threading.Thread(target=self.thread_main, args=(number,), daemon=True,
                                   name=f"lua-{number}")
                  for number in range(2, self.settings.workers + 1)]
        for thread in others:
            thread.start()
        try:
            self.thread_main(1)
        finally:
            for thread in others:
                thread.join(0.5 if self.phase is Phase.STOPPING_FAST else 5)
            self.selector.close()
            if self.app.oldest_running():
                self.end_abandoned_children()

    def end_abandoned_children(self) -> None:
        """Leaving requests still running (past graceful_timeout, or a fast stop): the
        processes they started (an ``os.execute`` child) must not outlive them."""
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        if children:
            log.warning("worker %d: stopping with request(s) still running: killing the "
                        "%d process(es) they started", self.number, len(children))
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass

    def thread_main(self, me: int) -> None:
        """A thread's life: hold the event loop whenever the baton comes to it."""
        while self.baton.take(me):
            try:
                self.hold_loop(me)
            except BaseException:
                self.baton.end()
                raise

    # -- the event loop -------------------------------------------------------------------

    def hold_loop(self, me: int) -> None:
        """Serve until the baton is taken away or the worker stops."""
        while True:
            serving = self.phase is SERVING
            if not serving and self.wind_down():
                self.baton.end()
                return
            while self.handed_over:
                self.settle(self.handed_over.popleft())
            for key, mask in self.selector.select(0 if self.ready else
                                                  TICK if serving else 0.05):
                if key.data is None:
                    self.accept()
                elif key.data == "signals":
                    self.read_signals()
                else:
                    connection = key.data
                    if mask & selectors.EVENT_WRITE:
                        self.write(connection)
                    if (mask & selectors.EVENT_READ
                            and self.connections.get(connection.fd) is connection):
                        self.read(connection)
            if time.monotonic() > self.next_tick:
                self.tick()
            if not self.run_ready(me):
                return

    def tick(self) -> None:
        """Once a second: drop stalled clients, look at scripts' paths again; stop when the
        master is gone."""
        now = time.monotonic()
        self.next_tick = now + TICK
        self.drop_stalled(now)
        if not self.accepting:
            self.shed_overflow(now)
        assert self.app is not None
        self.app.forget_paths()
        if self.ppid_changed():
            log.warning("worker %d: master is gone, stopping", self.number)
            self.stop(fast=False)

    def run_ready(self, me: int) -> bool:
        """Run the requests read so far; False when the baton was taken meanwhile (the
        holder's side of workers/baton.py)."""
        baton, lock, ready = self.baton, self.lock, self.ready
        while True:
            with lock:
                if baton.holder != me:
                    return False
                if not ready:
                    baton.running_since = 0.0
                    return True
                connection, job = ready.popleft()
                baton.running_since = time.monotonic()
                if baton.parked:
                    baton.unpark()
            self.run_job(connection, job, me)

    def wind_down(self) -> bool:
        """While stopping (every round): close the listener and the idle connections;
        True once in-flight requests are done, or may be waited for no longer."""
        self.stop_accepting()
        self.listener.close()  # again and again: closing a closed socket does nothing
        self.close_idle()
        return (self.phase is Phase.STOPPING_FAST
                or (self.working_connections == 0 and not self.connections)
                or time.monotonic() > self.stop_deadline)

    def ppid_changed(self) -> bool:
        return self.report_fd is not None and self.ppid != os.getppid()

    def start_accepting(self) -> None:
        if not self.accepting and self.phase is SERVING:
            self.selector.register(self.listener, selectors.EVENT_READ, None)
            self.accepting = True
            self.full_since = 0.0

    def stop_accepting(self) -> None:
        if self.accepting:
            self.selector.unregister(self.listener)
            self.accepting = False

    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            idle = None
            if len(self.connections) >= self.settings.max_connections:
                idle = self.idle_connection()
                if idle is None:
                    self.stop_accepting()
                    self.full_since = self.full_since or time.monotonic()
                    return
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("worker %d: accept failed: %s", self.number, error)
                return
            if not self.client_allowed(sock, peer):
                continue
            if idle is not None:  # the web server opens a new one when it needs one
                self.close(idle)
            self.adopt(sock)

    def adopt(self, sock: socket.SocketType, shed: bool = False) -> None:
        """Take a new connection and read it at once: the web server writes its request
        right after connecting. Only one that is to carry more input is registered.
        A ``shed`` one gets 503 for its request, then is closed."""
        fastcgi = protocol.Connection(self.settings.max_connections, self.settings.workers,
                                      self.maxpost, self.settings.max_params)
        connection = Connection(sock, fastcgi, self.lock, self.settings.timeout)
        connection.shed = shed
        self.connections[connection.fd] = connection
        self.read(connection)
        if not connection.last_request_in and self.connections.get(connection.fd) is connection:
            self.watch(connection, selectors.EVENT_READ)

    def idle_connection(self) -> Optional[Connection]:
        """At the cap: the oldest connection that sits between requests, to let go of for a
        new one (None when every connection is busy)."""
        for connection in self.connections.values():
            if (not connection.working and connection.request_id and not connection.outbox
                    and connection.fastcgi.between_requests and not connection.last_request_in
                    and not connection.shed):
                return connection
        return None

    def shed_overflow(self, now: float) -> None:
        """Full for SHED_AFTER s and connections still waiting: take them to answer 503."""
        if not self.full_since or now - self.full_since < SHED_AFTER or self.phase is not SERVING:
            return
        if not select.select([self.listener], [], [], 0)[0]:
            return
        shed = 0
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if self.client_allowed(sock, peer):
                self.adopt(sock, shed=True)
                shed += 1
        if shed:
            log.warning("worker %d: %d connections (max_connections) and more waiting for %g s: "
                        "answered %d with 503; raise max_connections or processes",
                        self.number, self.settings.max_connections, SHED_AFTER, shed)

    def client_allowed(self, sock: socket.SocketType, peer: object) -> bool:
        allowed = self.settings.allowed_clients
        if not allowed or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True
        address = peer[0] if isinstance(peer, tuple) else str(peer)
        if address in allowed:
            return True
        log.warning("connection from %s refused: not in allowed_clients", address)
        sock.close()
        return False

    def read(self, connection: Connection) -> None:
        try:
            data = connection.sock.recv(READ_SIZE, DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if connection.lingering:
            if not data:
                self.close(connection)
            return  # what a finished connection still sends is read only to be dropped
        if not data:
            if not connection.fastcgi.between_requests:
                log.warning("worker %d: a FastCGI connection ended inside a request "
                            "(truncated record or stream): the request is dropped",
                            self.number)
            self.close(connection)
            return
        try:
            events = connection.fastcgi.receive(data)
        except protocol.ProtocolError as error:
            log.warning("worker %d: closing a FastCGI connection: %s", self.number, error)
            self.close(connection)
            return
        for event in events:
            if isinstance(event, protocol.Request):
                if not event.keep_conn or connection.shed:
                    connection.last_request_in = True
                if connection.shed:
                    event = protocol.response_records(event.request_id, self.overloaded)
                self.dispatch(connection, event)
            elif isinstance(event, protocol.Reply):
                self.dispatch(connection, event.data)
            elif isinstance(event, protocol.Abort):
                self.abort(connection, event)

    def abort(self, connection: Connection, abort: protocol.Abort) -> None:
        """ABORT_REQUEST: a request that reached the pool ends with its own answer
        (Lua cannot be stopped half-way); one dropped while being read is ended here."""
        if not abort.handed_out:
            self.dispatch(connection, protocol.end_request(abort.request_id))

    def dispatch(self, connection: Connection, job: Job) -> None:
        """Queue a request (or bytes to send), in order per connection."""
        with self.lock:
            if connection.working:
                connection.pending.append(job)
                return
            connection.working = True
            self.working_connections += 1
            self.ready.append((connection, job))

    def watch(self, connection: Connection, events: int) -> None:
        """Have the selector watch a connection for ``events`` (0: not at all)."""
        if events == connection.events:
            return
        if not connection.events:
            self.selector.register(connection.sock, events, connection)
        elif not events:
            self.selector.unregister(connection.sock)
        else:
            self.selector.modify(connection.sock, events, connection)
        connection.events = events

    def close(self, connection: Connection) -> None:
        self.watch(connection, 0)
        del self.connections[connection.fd]
        self.start_accepting()
        with self.lock:
            connection.outbox.clear()
            if connection.working:
                connection.closed = True
                return
        connection.sock.close()

    def close_idle(self) -> None:
        """While stopping: let go of kept-alive connections that sit between requests.

        A connection that has not carried a request yet stays until it does: nginx
        retries a request on a failed *cached* connection, but answers 502 when a
        fresh one is closed under it.
        """
        for connection in list(self.connections.values()):
            if (not connection.working and connection.request_id and not connection.outbox
                    and connection.fastcgi.between_requests):
                self.close(connection)

    # -- answers the client has not taken yet ---------------------------------------------

    def settle(self, connection: Connection) -> None:
        """A thread handed a connection over: write its outbox, or close it if it is done."""
        # The loop may have let the connection go meanwhile (its thread then closed it).
        if self.connections.get(connection.fd) is not connection:
            return
        with self.lock:
            waiting = bool(connection.outbox)
            done = connection.last_request_in and not connection.working
        if waiting:
            self.watch(connection, connection.events | selectors.EVENT_WRITE)
        elif done:
            self.end(connection)

    def write(self, connection: Connection) -> None:
        """The socket has room: send from the outbox; close a finished connection once empty."""
        while True:
            with self.lock:
                if not connection.outbox:
                    close = connection.last_request_in and not connection.working
                    break
                view = connection.outbox[0]
            try:
                sent = connection.sock.send(view, DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.close(connection)
                return
            with self.lock:
                connection.stalled_since = time.monotonic()
                if sent < len(view):
                    connection.outbox[0] = view[sent:]
                    return
                connection.outbox.popleft()
        if close:
            self.linger(connection)
        else:
            self.watch(connection, connection.events & ~selectors.EVENT_WRITE)

    def end(self, connection: Connection) -> None:
        """Close a connection whose last request was answered."""
        if connection.big:
            self.linger(connection)
        else:
            self.close(connection)

    def linger(self, connection: Connection) -> None:
        """Close a finished connection whose answer may not all be on its way yet (large,
        streamed, or left to the outbox): end our side, then read until the client
        closes (at most LINGER s).

        Closing a socket that has unread input resets the connection, and the reset drops
        what the kernel still holds of the answer: a client that sends anything after its
        last request (flup's FCGIApp sends an empty DATA record) would lose the end of a
        large answer. Small answers are closed at once: the client already has them, and
        lingering costs a few system calls and a round of the loop."""
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(connection)
            return
        connection.lingering = time.monotonic()
        self.watch(connection, selectors.EVENT_READ)

    def drop_stalled(self, now: float) -> None:
        """Let go of clients that took nothing of their answer for `timeout`, and of
        lingering ones that did not close within LINGER."""
        for connection in list(self.connections.values()):
            if connection.lingering and now - connection.lingering > LINGER:
                self.close(connection)
            elif connection.outbox and now - connection.stalled_since > connection.send_timeout:
                log.info("worker %d: a client took no part of its answer for %g s: closing "
                         "its connection", self.number, connection.send_timeout)
                self.close(connection)

    # -- running requests -----------------------------------------------------------------

    def run_job(self, connection: Connection, job: Job, thread_number: int) -> None:
        """Run a job and whatever queued behind it on the same connection.

        A connection answered without KEEP_CONN is closed here when this thread still holds
        the loop (clearing the baton's ``running_since`` keeps the standby from taking it
        meanwhile); otherwise it is handed to the loop to close.
        """
        while job is not None:
            self.run_one(connection, job, thread_number)
            with self.lock:
                job = connection.pending.popleft() if connection.pending else None
                if job is None:
                    connection.working = False
                    self.working_connections -= 1
                    orphaned = connection.closed
                    # With an outbox left, the loop closes it once the client took it all.
                    ending = (connection.last_request_in and not orphaned
                              and not connection.outbox)
                    close_now = ending and self.baton.holder == thread_number
                    if close_now:
                        self.baton.running_since = 0.0
        if orphaned:
            connection.sock.close()
        elif close_now:
            self.end(connection)
        elif ending:
            self.hand_to_loop(connection)
        if self.phase is not SERVING:
            self.wake()

    def run_one(self, connection: Connection, job: Job, thread_number: int) -> None:
        """Answer one job: run a request, or send bytes that end one."""
        try:
            if isinstance(job, bytes):
                self.finish(connection, job)
            else:
                self.respond(connection, job, thread_number)
        except OSError as error:
            log.info("worker %d: client connection lost while answering: %s", self.number, error)
            shut_down(connection.sock)

    def respond(self, connection: Connection, request: protocol.Request,
                thread_number: int) -> None:
        request_id = request.request_id
        connection.request_id = request_id
        assert self.app is not None
        access_log = self.access_log
        if access_log is None:
            sink = connection.sink
        else:
            sink = connection.logged_sink
            connection.streamed = 0
            started = time.perf_counter()
        output = b""
        try:
            try:
                output = self.app.handle(request, sink, thread_number)
            except OSError:
                raise  # the client is gone (a flush failed): run_one lets it go
            except Exception:
                log.exception("worker %d: internal error answering a request", self.number)
                output = error_page(500, self.settings.headers)
            records = protocol.response_records(request_id, output)
            if len(records) > LINGER_ABOVE:
                connection.big = True
            self.finish(connection, records)
        finally:
            if access_log is not None:  # the line is written for a lost client too
                log_access(access_log, request, connection, output,
                           time.perf_counter() - started)
        self.request_done()

    def finish(self, connection: Connection, data: bytes) -> None:
        """Send what ends a job; what the client does not take now the loop writes later."""
        if not connection.send_final(data):
            self.hand_to_loop(connection)

    def hand_to_loop(self, connection: Connection) -> None:
        """Have the loop look at a connection: write its outbox, or close it."""
        with self.lock:
            self.handed_over.append(connection)
        self.wake()

    def busy_threads(self) -> int:
        """Threads running a request now (``working_connections`` also counts requests
        waiting to run)."""
        with self.lock:
            return self.working_connections - len(self.ready)


def log_access(access_log: AccessLog, request: protocol.Request, connection: Connection,
               output: bytes, duration: float) -> None:
    """The access log's line: the answer's status, and the bytes sent past its head."""
    head = connection.head if connection.streamed else output
    sent = connection.streamed + len(output)
    access_log.write(request.params, status_of(head), body_bytes(head, sent), duration)


def shut_down(sock: socket.SocketType) -> None:
    """End both directions; the loop then sees end of stream and closes the socket."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
