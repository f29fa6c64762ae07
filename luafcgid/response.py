"""CGI output for the answers the server gives itself: 403, 404, 413, 500.

Every page carries the config's ``headers``, like a script's response does, and
a plain-text body that says what happened (the Lua error text only when
``showerrors`` is on — the caller decides what goes into ``detail``).
"""

from __future__ import annotations

from http import HTTPStatus


def status_line(code: int) -> str:
    """``404`` → ``"404 Not Found"`` (just the number when the code has no phrase)."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def error_page(code: int, default_headers: bytes, detail: str = "") -> bytes:
    """A complete CGI response (head and body) for the server's own answer ``code``."""
    status = status_line(code)
    body = (status + "\n" + (detail + "\n" if detail else "")).encode("utf-8", "replace")
    head = (
        b"Status: " + status.encode() + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        + default_headers
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body
