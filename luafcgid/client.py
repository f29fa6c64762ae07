"""A small FastCGI client: one request, the answer back (``luafcgid request`` uses it).

It speaks the web server's side of the protocol with luafcgid.protocol's encoders, so a
server can be asked for a page, its ping or its status without nginx or cgi-fcgi: by
hand, by a health check (systemd, a container's HEALTHCHECK) or by a test.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from luafcgid import __version__, protocol
from luafcgid.sock import tcp_address

REQUEST_ID = 1
# A "listen" address that means every interface is reached on loopback.
ANY_HOST = {"": "127.0.0.1", "*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class ClientError(Exception):
    """No answer: the server could not be reached, or broke off the exchange."""


@dataclass
class Answer:
    """A FastCGI response: the CGI head and body, and whatever came on STDERR."""

    status: int
    head: bytes
    body: bytes
    stderr: bytes

    @property
    def headers(self) -> List[Tuple[str, str]]:
        pairs = []
        for line in self.head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            pairs.append((name.strip(), value.strip()))
        return pairs


def cgi_params(script_name: str, script_filename: Optional[str], document_root: Optional[str],
               query: str = "", method: str = "GET", body: bytes = b"",
               headers: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The CGI params a web server sends for a request; ``headers`` become ``HTTP_*``
    (Content-Type and Content-Length become CONTENT_TYPE and CONTENT_LENGTH)."""
    uri = script_name + ("?" + query if query else "")
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": f"luafcgid-request/{__version__}",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": script_name,
        "DOCUMENT_URI": script_name,
        "REQUEST_URI": uri,
        "QUERY_STRING": query,
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "CONTENT_TYPE": "",
    }
    if script_filename is not None:
        params["SCRIPT_FILENAME"] = script_filename
    if document_root is not None:
        params["DOCUMENT_ROOT"] = document_root
    for name, value in (headers or {}).items():
        key = name.strip().upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            params[key] = value
        else:
            params["HTTP_" + key] = value
    return params


def connect(address: str, timeout: float) -> socket.socket:
    """A connection to a luafcgid ``listen`` address (``host:port``, ``[v6]:port``, a path)."""
    tcp = tcp_address(address)
    try:
        if tcp is None:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(timeout)
            try:
                client.connect(address)
            except OSError:
                client.close()
                raise
            return client
        host, port = tcp
        return socket.create_connection((ANY_HOST.get(host, host), port), timeout=timeout)
    except OSError as error:
        raise ClientError(f"cannot connect to {address}: {error.strerror or error}") from None


def request_bytes(params: Mapping[str, str], body: bytes = b"") -> bytes:
    """BEGIN_REQUEST (responder, connection closed after), PARAMS, STDIN."""
    return protocol.request_records(REQUEST_ID, [(os.fsencode(name), os.fsencode(value))
                                                 for name, value in params.items()], body)


def request(address: str, params: Mapping[str, str], body: bytes = b"",
            timeout: float = 30.0) -> Answer:
    """Send one request to ``address`` and read its answer; :class:`ClientError` if none."""
    with connect(address, timeout) as client:
        try:
            client.sendall(request_bytes(params, body))
            stdout, stderr = read_answer(client)
        except OSError as error:
            raise ClientError(f"{address}: {error.strerror or error}") from None
        except protocol.ProtocolError as error:
            raise ClientError(f"{address} does not answer in FastCGI: {error}") from None
    return parse_answer(stdout, stderr)


def read_answer(client: socket.socket) -> Tuple[bytes, bytes]:
    """STDOUT and STDERR streams up to END_REQUEST."""
    reader = protocol.ResponseReader()
    stdout: List[bytes] = []
    stderr: List[bytes] = []
    while True:
        chunk = client.recv(65536)
        if not chunk:
            raise ClientError("the server closed the connection before the end of the answer")
        for event in reader.receive(chunk):
            if isinstance(event, protocol.Stdout):
                stdout.append(event.data)
            elif isinstance(event, protocol.Stderr):
                stderr.append(event.data)
            elif isinstance(event, protocol.EndRequest):
                return b"".join(stdout), b"".join(stderr)


def parse_answer(stdout: bytes, stderr: bytes) -> Answer:
    """Split the CGI output at its blank line; the status comes from ``Status:`` (200 if
    there is none, as a web server assumes)."""
    head, separator, body = stdout.partition(b"\r\n\r\n")
    if not separator:
        head, separator, body = stdout.partition(b"\n\n")
    if not separator:
        raise ClientError("the answer has no CGI head (no blank line after the headers)")
    status = 200
    for line in head.splitlines():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"status":
            code = value.strip()[:3]
            status = int(code) if code.isdigit() else 500
    return Answer(status, head, body, stderr)
