"""The listening socket: bound once by the master, before it forks, and shared by every worker.

``listen`` is ``"host:port"``, ``"[v6 address]:port"`` or the path of a unix socket. A unix
socket file left behind by a server that died is removed; one another live server listens on
is refused, as is a path that exists and is not a socket.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
from typing import Any, Optional, Tuple

# How long the kernel holds a new TCP connection that sent nothing before handing it over
# anyway (TCP_DEFER_ACCEPT); a FastCGI client always speaks first.
DEFER_ACCEPT_SECONDS = 5


class SocketError(Exception):
    """The address cannot be bound: the message says why and what to do."""


class Listener(socket.socket):
    """A listening socket whose ``family`` and ``type`` are read once, and whose
    :meth:`accept` hands out plain C socket objects.

    ``socket.socket.accept()`` builds each accepted socket from ``self.family`` and
    ``self.type``, properties that turn the C integers into enums on every call:
    ~1.2 of the ~3.4 µs an accept costs in Python. A listener's family and type never
    change, so they are kept (the same enum values the properties give).
    """

    __slots__ = ("_family", "_kind")

    def __init__(self, family: int = -1, kind: int = -1, proto: int = -1,
                 fileno: Optional[int] = None) -> None:
        super().__init__(family, kind, proto, fileno)
        self._family = super().family
        self._kind = super().type

    @property
    def family(self) -> socket.AddressFamily:
        return self._family

    @property
    def type(self) -> socket.SocketKind:
        return self._kind

    def accept(self) -> Tuple[socket.SocketType, Any]:
        """A new connection and its peer address. The connection is a ``socket.SocketType``
        (the C socket object under ``socket.socket``): no Python-level wrapper to build and
        tear down, and its blocking mode is left as the kernel made it (blocking on Linux,
        the listener's on BSD), so no syscall sets it. Whoever uses it passes
        ``socket.MSG_DONTWAIT`` to every recv and send. Measured: ~1.2 µs less per connection
        than ``socket.socket.accept`` plus ``setblocking(False)``."""
        fd, peer = self._accept()
        return socket.SocketType(self._family, self._kind, 0, fd), peer


def tcp_address(listen: str) -> Optional[Tuple[str, int]]:
    """``(host, port)`` when ``listen`` is a TCP address, None when it is a unix socket path."""
    if listen.startswith(("/", ".")):
        return None
    host, separator, port = listen.rpartition(":")
    if not separator or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def bind(listen: str, backlog: int, mode: int = 0o660, owner: Optional[str] = None
         ) -> socket.socket:
    """A socket bound to ``listen`` and listening; ``mode``/``owner`` apply to unix sockets."""
    address = tcp_address(listen)
    if address is None:
        return _bind_unix(listen, backlog, mode, owner)
    return _bind_tcp(listen, address, backlog)


def set_permissions(path: str, mode: int, owner: Optional[str]) -> None:
    """Give a unix socket file its ``socket_mode`` and ``socket_owner`` ("user[:group]")."""
    try:
        os.chmod(path, mode)
        if owner:
            os.chown(path, *_owner_ids(owner))
    except OSError as error:
        raise SocketError(f"cannot set the mode or owner of {path}: {error.strerror}") from None


def close(listener: socket.socket) -> None:
    """Close a listener for good; a unix socket's file is removed with it. Idempotent."""
    if listener.fileno() < 0:
        return
    path = listener.getsockname() if listener.family == socket.AF_UNIX else None
    listener.close()
    if path and _is_socket_file(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _bind_tcp(listen: str, address: Tuple[str, int], backlog: int) -> socket.socket:
    host, port = address
    try:
        infos = socket.getaddrinfo(host if host not in ("", "*") else None, port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise SocketError(f"cannot listen on {listen}: {error.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    listener = Listener(family, kind, proto)
    try:
        # A restarted server must not wait for the old connections' TIME_WAIT to end.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune_tcp(listener)
        listener.bind(sockaddr)
        listener.listen(backlog)
    except OSError as error:
        listener.close()
        hint = "; is another server running there?" if error.errno == errno.EADDRINUSE else ""
        raise SocketError(f"cannot listen on {listen}: {error.strerror}{hint}") from None
    return listener


def _tune_tcp(listener: socket.socket) -> None:
    """Options set once on the listener, which accepted connections inherit (Linux, BSD).

    TCP_NODELAY: a streamed answer (``con:flush()``) goes out in several writes; with
    Nagle's algorithm each write after the first waits for the peer's delayed ACK (up
    to 40 ms). TCP_DEFER_ACCEPT (Linux): a connection is handed to accept() only once
    its first bytes arrived, so the worker's first read finds the request (a web server
    writes it right after connecting) and no loop round is spent waiting for it.
    """
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_DEFER_ACCEPT"):
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)


def _bind_unix(path: str, backlog: int, mode: int, owner: Optional[str]) -> socket.socket:
    _remove_stale(path)
    listener = Listener(socket.AF_UNIX, socket.SOCK_STREAM)
    # The file is created by bind(): a umask keeps it from being wider than mode meanwhile.
    previous_umask = os.umask(0o777 & ~mode)
    try:
        listener.bind(path)
        listener.listen(backlog)
    except OSError as error:
        listener.close()
        raise SocketError(f"cannot listen on {path}: {error.strerror}") from None
    finally:
        os.umask(previous_umask)
    try:
        set_permissions(path, mode, owner)
    except SocketError:
        close(listener)
        raise
    return listener


def _remove_stale(path: str) -> None:
    """Remove a unix socket file nobody listens on; refuse a live one or a non-socket."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketError(f"cannot listen on {path}: the path exists and is not a socket; "
                          "remove it or choose another listen path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: a leftover of a server that died
    except OSError as error:
        raise SocketError(f"cannot tell whether a server listens on {path}: "
                          f"{error.strerror}") from None
    else:
        raise SocketError(f"another server is listening on {path}; stop it first")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _is_socket_file(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _owner_ids(owner: str) -> Tuple[int, int]:
    """``"user[:group]"`` → (uid, gid); gid -1 (unchanged) when no group is named."""
    user, _, group = owner.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        gid = -1
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketError(f"socket_owner {owner!r}: no such user or group") from None
    return uid, gid
