"""CGI output of the server's own: the one place that writes a CGI head, and reads one.

The server answers some requests itself: errors (403, 404, 413, 500, ...), the 503 of a
worker over its connection cap, ``ping_path`` and ``status_path``. Every such answer
carries the config's ``headers``, like a script's response does; an error's plain-text
body says what happened (the Lua error text only when ``showerrors`` is on — the caller
decides what goes into ``detail``). The access log reads the status back out of an
answer's head (:func:`status_of`): every answer, a script's too, starts with ``Status:``.
"""

from __future__ import annotations

from http import HTTPStatus

STATUS_FIELD = b"Status: "
HEAD_END = b"\r\n\r\n"


def status_line(code: int) -> str:
    """``404`` → ``"404 Not Found"`` (just the number when the code has no phrase)."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def answer(code: int, content_type: bytes, default_headers: bytes, body: bytes,
           extra_headers: bytes = b"") -> bytes:
    """A complete CGI response (head and body): ``Status``, ``Content-Type``, the config's
    ``headers``, ``extra_headers`` (whole ``Name: value\\r\\n`` lines), ``Content-Length``."""
    return (STATUS_FIELD + status_line(code).encode() + b"\r\nContent-Type: " + content_type
            + b"\r\n" + default_headers + extra_headers + b"Content-Length: "
            + str(len(body)).encode() + HEAD_END + body)


def error_page(code: int, default_headers: bytes, detail: str = "",
               extra_headers: bytes = b"") -> bytes:
    """The server's own answer ``code``, with a plain-text body naming it and ``detail``."""
    body = (status_line(code) + "\n" + (detail + "\n" if detail else "")).encode(
        "utf-8", "replace")
    return answer(code, b"text/plain; charset=utf-8", default_headers, body, extra_headers)


def status_of(head: bytes) -> int:
    """The status code an answer's first output starts with (``Status: NNN ...``); 0 when
    it does not."""
    code = head[8:11]
    return int(code) if head.startswith(STATUS_FIELD) and code.isdigit() else 0


def body_bytes(head: bytes, sent: int) -> int:
    """Of ``sent`` bytes of an answer whose first output was ``head``: those past the head."""
    end = head.find(HEAD_END)
    return sent - end - 4 if end >= 0 else sent
