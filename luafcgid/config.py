"""The config file: a Lua script whose globals are the settings (SPEC §6).

The file runs once in a fresh Lua 5.4 runtime of its own that cannot reach Python.
Every global it leaves behind that the standard library did not define is a setting;
``local`` variables are free for the file's own use. luafcgid2's names are accepted
as aliases of luafcgid's, and luafcgid2's settings that have no counterpart here are
accepted (type-checked) so its config files load unchanged.

The originals read the globals they knew and ignored every other one (config.c:57-78,
settings.cpp:153-184), and luafcgid's manual lets a config define functions. So a global
that is no setting is ignored with one warning naming it, unless its name is a likely
typo of a setting (``wrkers``): that is refused, with the setting it resembles. The
warning and the line about luafcgid2's settings that have no effect here are logged once
the log is set up (:func:`luafcgid.log.config_notices`).

Every setting is one row of :data:`KEYS`: name → (check, default). A check takes the
value (plain Python data: ``str``, ``int``, ``float``, ``bool``, ``dict`` for tables)
and the config file's directory, and returns the canonical value or raises
:class:`Invalid` with the reason. Adding a setting is one row here and one field on
:class:`Settings` (a test keeps the two in step).

Choices the spec leaves open:

- Lua tables become ``dict`` (nested tables too); a sequence is a dict with int keys
  1..n, so ``Config`` converts back to the very same Lua table. Strings become ``str``
  and must be UTF-8.
- Relative paths (``startup``, ``logfile``, ``pidfile``, ``root``, a unix socket
  ``listen``) resolve against the config file's directory, not the current directory,
  which a daemon leaves.
- ``listen`` as a bare port means ``127.0.0.1:port``, like the default; ``":port"``
  or ``"*:port"`` means every interface.
- ``clones`` greater than ``states`` is refused rather than silently capped.
"""

from __future__ import annotations

import difflib
import grp
import http
import ipaddress
import logging
import math
import os
import pwd
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import lupa.lua54

from luafcgid import sessions
from luafcgid.log import DEFAULT_ACCESS_FORMAT, LEVELS, check_access_format, config_notices


class ConfigError(Exception):
    """A config file we refuse: ``str(e)`` is ``"<path>: <key>: <reason>"``."""

    def __init__(self, path: str, key: Optional[str], reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        parts = [part for part in (path, key) if part]
        super().__init__(": ".join([*parts, reason]))


class Invalid(ValueError):
    """Raised by a check: the value is refused for the reason given."""


Check = Callable[[Any, str], Any]

# Keys whose default is computed from other settings, in _derive().
DERIVED = object()

# The config runs on the master: a file that loops or eats memory must fail, not hang it.
CONFIG_CPU_SECONDS = 5.0
CONFIG_MAX_MEMORY = 64 * 1024 * 1024
MAX_TABLE_DEPTH = 32

# AF_UNIX paths are limited to sizeof(sun_path) - 1 bytes on Linux.
UNIX_PATH_MAX = 107


class _LuaFunction:
    """Stands for a Lua function among a config's values: no setting takes one."""

    def __repr__(self) -> str:
        return "function"


_FUNCTION = _LuaFunction()


class _NotASetting:
    """Stands for the value of a global that is no setting: it is not converted."""

    def __repr__(self) -> str:
        return "a value"


_NOT_A_SETTING = _NotASetting()


# --- checks --------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """The Lua name of a value's type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (dict, list, tuple)):
        return "a table"
    if isinstance(value, _LuaFunction):
        return "a function"
    return "nil" if value is None else type(value).__name__


def _as_integer(value: Any) -> int:
    # Lua 5.4 makes 8/2 the float 4.0: a whole float is an integer.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected an integer, got {_kind(value)} ({value!r})")
    return value


# Lua's string → number conversion (lua_isnumber, tonumber): around the number, C's
# whitespace; decimal or hexadecimal, integer or float. Nothing else: no "inf", no "1_0".
_LUA_SPACE = " \t\n\v\f\r"
_LUA_DECIMAL_INTEGER = re.compile(r"[+-]?[0-9]+")
_LUA_DECIMAL_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_LUA_HEX_INTEGER = re.compile(r"[+-]?0[xX][0-9a-fA-F]+")
_LUA_HEX_FLOAT = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)"
                            r"([pP][+-]?[0-9]+)?")


def lua_number(text: str) -> Optional[float]:
    """The number Lua reads in ``text`` ("4", " 4 ", "0x10", "1e3"), None when it reads
    none ("4x", "")."""
    text = text.strip(_LUA_SPACE)
    if _LUA_DECIMAL_INTEGER.fullmatch(text):
        return int(text)
    if _LUA_HEX_INTEGER.fullmatch(text):
        return int(text, 16)
    if _LUA_DECIMAL_FLOAT.fullmatch(text):
        return float(text)
    if _LUA_HEX_FLOAT.fullmatch(text):
        return float.fromhex(text)
    return None


def integer(minimum: int, maximum: Optional[int] = None) -> Check:
    """An integer in ``minimum``..``maximum``."""

    def check(value: Any, config_dir: str) -> int:
        number = _as_integer(value)
        if number < minimum:
            raise Invalid(f"must be >= {minimum}, got {number}")
        if maximum is not None and number > maximum:
            raise Invalid(f"must be <= {maximum}, got {number}")
        return number

    return check


def number(minimum: float, *, inclusive: bool) -> Check:
    """A finite number above (or, when ``inclusive``, at least) ``minimum``."""

    def check(value: Any, config_dir: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"expected a number, got {_kind(value)} ({value!r})")
        if not math.isfinite(value):
            raise Invalid(f"expected a finite number, got {value!r}")
        if value < minimum or (value == minimum and not inclusive):
            relation = ">=" if inclusive else ">"
            raise Invalid(f"must be {relation} {minimum:g}, got {value:g}")
        return float(value)

    return check


def boolean(value: Any, config_dir: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected a boolean (true or false), got {_kind(value)} ({value!r})")
    return value


def string(value: Any, config_dir: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {_kind(value)} ({value!r})")
    return value


def one_line(value: Any, config_dir: str) -> str:
    """A non-empty string that can go into a response head."""
    text = string(value, config_dir).strip()
    if not text:
        raise Invalid("must not be empty")
    if "\r" in text or "\n" in text:
        raise Invalid("must be a single line")
    return text


def one_of(choices: Tuple[str, ...]) -> Check:
    def check(value: Any, config_dir: str) -> str:
        text = string(value, config_dir)
        if text not in choices:
            raise Invalid(f"expected one of {', '.join(map(repr, choices))}, got {text!r}")
        return text

    return check


def table(value: Any, config_dir: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"expected a table, got {_kind(value)} ({value!r})")
    return value


def _sequence(value: Any, example: str) -> list:
    """The items of a Lua sequence (a dict keyed 1..n) or of a Python list or tuple."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict) and set(value) == set(range(1, len(value) + 1)):
        return [value[index] for index in range(1, len(value) + 1)]
    raise Invalid(f"expected a list like {example}, got {_kind(value)} ({value!r})")


def _resolve(path: str, config_dir: str) -> str:
    return os.path.normpath(os.path.join(config_dir, path))


def required_path(value: Any, config_dir: str) -> str:
    """A path; a relative one is taken from the config file's directory."""
    text = string(value, config_dir)
    if not text:
        raise Invalid("must not be empty")
    return _resolve(text, config_dir)


def optional_path(value: Any, config_dir: str) -> Optional[str]:
    """Like :func:`required_path`; ``""`` means none (luafcgid2 has ``StartupScript = ""``)."""
    return required_path(value, config_dir) if string(value, config_dir) else None


def lua_file(value: Any, config_dir: str) -> Optional[str]:
    resolved = optional_path(value, config_dir)
    if resolved is not None and not os.path.isfile(resolved):
        raise Invalid(f"no such file: {resolved}")
    return resolved


def directory(value: Any, config_dir: str) -> Optional[str]:
    resolved = optional_path(value, config_dir)
    if resolved is None:
        return None
    real = os.path.realpath(resolved)
    if not os.path.isdir(real):
        raise Invalid(f"not a directory: {resolved}")
    return real


_HOST = re.compile(r"^(\*|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)?$")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise Invalid(f"port must be a number in 1..65535, got {text!r}")
    return int(text)


def listen(value: Any, config_dir: str) -> str:
    """``"host:port"``, ``"[v6]:port"``, a port number, or a unix socket path."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(_as_integer(value))
    text = string(value, config_dir).strip()
    if text.startswith(("/", "./", "../")):
        resolved = _resolve(text, config_dir)
        if len(os.fsencode(resolved)) > UNIX_PATH_MAX:
            raise Invalid(f"unix socket path longer than {UNIX_PATH_MAX} bytes: {resolved}")
        return resolved
    if text.isdigit():
        return f"127.0.0.1:{_port(text)}"
    host, separator, port = text.rpartition(":")
    if not separator:
        raise Invalid('expected "host:port", "[v6 address]:port", a port number or a unix '
                      f'socket path (starting with / or ./), got {text!r}')
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise Invalid(f"not an IPv6 address: {host}") from None
    elif not _HOST.match(host):
        raise Invalid(f"not a host name or address: {host!r} (write IPv6 as [::1]:port)")
    return f"{host}:{_port(port)}"


_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def headers(value: Any, config_dir: str) -> bytes:
    """Raw header lines → ``b"Name: value\\r\\n"`` lines; ``\\n`` or ``\\r\\n`` separate them."""
    lines = []
    for line in re.split(r"\r?\n", string(value, config_dir)):
        if not line.strip():
            continue
        if "\r" in line:
            raise Invalid(f"stray carriage return in header line {line!r}")
        name, colon, content = line.partition(":")
        if not colon or not _HEADER_NAME.match(name):
            raise Invalid(f'expected "Name: value" lines, got {line!r}')
        lines.append(f"{name}: {content.strip()}\r\n")
    return "".join(lines).encode("utf-8")


def handler(value: Any, config_dir: str) -> str:
    name = string(value, config_dir)
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise Invalid(f"expected the name of a Lua global function, got {name!r}")
    return name


def http_status(value: Any, config_dir: str) -> str:
    """``"404 Not Found"``, or a code (``404``) that gets its standard phrase."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(_as_integer(value))
    text = one_line(value, config_dir)
    code, _, phrase = text.partition(" ")
    if not code.isdigit() or not 100 <= int(code) <= 599:
        raise Invalid(f'expected a status like "200 OK", got {text!r}')
    if phrase.strip():
        return text
    try:
        return f"{code} {http.HTTPStatus(int(code)).phrase}"
    except ValueError:
        raise Invalid(f"no standard reason phrase for {code}: write it out") from None


def extensions(value: Any, config_dir: str) -> Tuple[str, ...]:
    names = _sequence(value, '{".lua"}')
    if not names:
        raise Invalid("must list at least one extension")
    for name in names:
        if not isinstance(name, str) or not name.startswith(".") or len(name) < 2:
            raise Invalid(f'expected extensions starting with ".", got {name!r}')
    return tuple(names)


def _known_user(name: str) -> str:
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise Invalid(f"no such user: {name!r}") from None
    return name


def _known_group(name: str) -> str:
    try:
        grp.getgrnam(name)
    except KeyError:
        raise Invalid(f"no such group: {name!r}") from None
    return name


def user(value: Any, config_dir: str) -> str:
    return _known_user(one_line(value, config_dir))


def group(value: Any, config_dir: str) -> str:
    return _known_group(one_line(value, config_dir))


def socket_owner(value: Any, config_dir: str) -> str:
    """``"user"`` or ``"user:group"``."""
    owner, colon, group_name = one_line(value, config_dir).partition(":")
    _known_user(owner)
    if colon:
        _known_group(group_name)
    return f"{owner}{colon}{group_name}"


def socket_mode(value: Any, config_dir: str) -> int:
    """An octal string (``"0660"``) or a number (Lua has no octal literals)."""
    if isinstance(value, str):
        if not re.match(r"^0?[0-7]{1,3}$", value):
            raise Invalid(f'expected an octal mode like "0660", got {value!r}')
        return int(value, 8)
    mode = _as_integer(value)
    if not 0 <= mode <= 0o777:
        # socket_mode = 0660 in Lua is decimal 660.
        raise Invalid(f'must be in 0..0o777, got {mode}; write the mode as a string, "0660"')
    return mode


def addresses(value: Any, config_dir: str) -> Tuple[str, ...]:
    """IP addresses, in the form the socket module reports peers."""
    items = _sequence(value, '{"127.0.0.1", "::1"}')
    if not items:
        raise Invalid("must list at least one address (leave it unset to allow every client)")
    try:
        return tuple(str(ipaddress.ip_address(item)) for item in items)
    except ValueError as error:
        raise Invalid(str(error)) from None


# The SQLite file of ``session_store = "sqlite"``: in this directory beside the pidfile.
SESSION_DIR = "luafcgid-sessions"


def session_store(value: Any, config_dir: str) -> str:
    """``"sqlite"`` (derived: beside the pidfile), ``"sqlite:PATH"`` or a Redis URL."""
    text = one_line(value, config_dir)
    if text == "sqlite":
        return DERIVED
    path = sessions.sqlite_path(text)
    if path:
        return sessions.sqlite_url(_resolve(path, config_dir))
    if text.startswith(sessions.REDIS_SCHEMES):
        return text
    raise Invalid('expected "sqlite", "sqlite:/path/to/sessions.db" or '
                  f'"redis://host:port/db", got "{text}"')


def lua_version(value: Any, config_dir: str) -> str:
    # Imported here: luafcgid.lua imports this module.
    from luafcgid.lua import runtime

    # lua = 5.4 (a number) means "5.4".
    if isinstance(value, float):
        value = f"{value:g}"
    name = string(value, config_dir)
    try:
        runtime.module(name)
    except runtime.UnknownRuntime as error:
        raise Invalid(str(error)) from None
    return name


def search_path(template_suffixes: Tuple[str, ...]) -> Check:
    """A Lua search path (``lua_path``, ``lua_cpath``): templates separated by ``;``, with
    ``;;`` once at most, standing for the defaults. A relative template is taken from the
    config file's directory (never from a worker's current directory)."""

    def check(value: Any, config_dir: str) -> str:
        text = one_line(value, config_dir)
        if text.count(";;") > 1:
            raise Invalid(f"write ;; (the defaults) once, got {text!r}")
        parts = []
        for part in text.split(";;"):
            entries = []
            for entry in filter(None, (item.strip() for item in part.split(";"))):
                if "?" not in entry and not entry.endswith(template_suffixes):
                    raise Invalid(f"{entry!r} is not a template: write the module's place as ?, "
                                  f"as in /srv/lib/?{template_suffixes[0]}")
                entries.append(_resolve(entry, config_dir))
            parts.append(";".join(entries))
        return ";;".join(parts)

    return check


def uri_path(value: Any, config_dir: str) -> Optional[str]:
    """A URL path such as ``"/status"`` (matched against SCRIPT_NAME); ``""`` means off."""
    text = string(value, config_dir)
    if not text:
        return None
    if not text.startswith("/") or any(c in text for c in "?# \r\n"):
        raise Invalid(f'expected a URL path such as "/status", got {text!r}')
    return text


def access_format(value: Any, config_dir: str) -> str:
    try:
        return check_access_format(one_line(value, config_dir))
    except ValueError as error:
        raise Invalid(str(error)) from None


# --- the key table ---------------------------------------------------------------------------

KEYS: Dict[str, Tuple[Check, Any]] = {
    "listen": (listen, "127.0.0.1:9000"),
    "processes": (integer(1), DERIVED),
    "workers": (integer(1), 4),
    "states": (integer(1), DERIVED),
    "clones": (integer(1), DERIVED),
    "sweep": (integer(100), 10000),
    "retries": (integer(0), 1),
    "showerrors": (boolean, False),
    "buffering": (boolean, True),
    "headersize": (integer(0), 64),
    "bodysize": (integer(0), 1024),
    "headers": (headers, b""),
    "elapsed_time_header": (boolean, DERIVED),
    "handler": (handler, "main"),
    "httpstatus": (http_status, "200 OK"),
    "contenttype": (one_line, "text/html"),
    "maxpost": (integer(0), 1048576),
    "max_params": (integer(1024), 1048576),
    "max_connections": (integer(1), 1024),
    "logfile": (optional_path, None),
    "startup": (lua_file, None),
    "Config": (table, {}),
    "root": (directory, None),
    "extensions": (extensions, (".lua",)),
    "pidfile": (required_path, "/run/luafcgid.pid"),
    "user": (user, None),
    "group": (group, None),
    "socket_mode": (socket_mode, 0o660),
    "socket_owner": (socket_owner, None),
    "allowed_clients": (addresses, None),
    "backlog": (integer(1), 1024),
    "timeout": (number(0, inclusive=False), 30.0),
    "graceful_timeout": (number(0, inclusive=True), 30.0),
    "max_requests": (integer(0), 0),
    "max_requests_jitter": (integer(0), 0),
    "max_memory": (integer(0), 0),
    "state_memory": (integer(0), 0),
    "slowlog": (optional_path, None),
    "slowlog_timeout": (number(0, inclusive=True), 0.0),
    "status_path": (uri_path, None),
    "ping_path": (uri_path, None),
    "access_log": (optional_path, None),
    "access_log_format": (access_format, DEFAULT_ACCESS_FORMAT),
    "loglevel": (one_of(tuple(LEVELS)), "info"),
    "lua": (lua_version, "5.4"),
    "jit": (boolean, False),
    "lua_path": (search_path((".lua",)), None),
    "lua_cpath": (search_path((".so",)), None),
    "session_store": (session_store, DERIVED),
}

# The Settings field of a key, where the names differ.
FIELDS = {"Config": "script_config"}

# luafcgid2's names (and the capitalised spellings its C++ reads) → luafcgid's.
ALIASES = {
    "WorkerThreads": "workers",
    "LuaMaxStates": "states",
    "LuaMaxSearchRetries": "retries",
    "HeadersSize": "headersize",
    "BodySize": "bodysize",
    "DefaultHeaders": "headers",
    "entrypoint": "handler",
    "Entrypoint": "handler",
    "DefaultHttpStatus": "httpstatus",
    "DefaultContentType": "contenttype",
    "MaxPostSize": "maxpost",
    "LogFilePath": "logfile",
    "StartupScript": "startup",
    "Listen": "listen",
}

# luafcgid2's session settings, kept in Settings.session; defaults are luafcgid2's.
SESSION_KEYS: Dict[str, Tuple[Check, Any]] = {
    "SessionName": (one_line, "XLuaSession"),
    "SessionTime": (integer(0), 3600),
    "SessionKeyLen": (integer(1), 24),
    "SessionCookieSecure": (boolean, True),
    "SessionCookieHttpOnly": (boolean, True),
    "SessionCookieSameSite": (one_of(("", "Strict", "Lax", "None")), ""),
    "SessionTargetScore": (integer(-(2**31)), 3),
    "SessionIpScore": (integer(-(2**31)), 3),
    "SessionUserAgentScore": (integer(-(2**31)), 2),
    "SessionLanguageScore": (integer(-(2**31)), 1),
}

# Settings of luafcgid2 (and luafcgid 2011) that mean nothing here: checked, then ignored.
IGNORED_KEYS: Dict[str, Check] = {
    "LuaStates": integer(0),
    "BodySectors": integer(0),
    "MinFileInfoTime": integer(0),
    "UseFileChecksum": boolean,
    "watchdog": integer(0),
    "daemonize": boolean,
    "maxcount": integer(0),
}

# luafcgid read these with lua_isnumber (config.c:59-78 through main.c:31-40): a string
# that reads as a number counts, so workers = "4" is 4 workers. luafcgid2 checked the type
# (settings.cpp:36-41), and nobody else's keys ever took a string: those stay refused.
LUA_ISNUMBER_KEYS = frozenset({"workers", "states", "clones", "sweep", "watchdog", "retries",
                               "headersize", "bodysize", "maxpost", "maxcount", "backlog"})

# luafcgid2's own names: a config that uses one is a luafcgid2 config, whose answers carry
# X-ElapsedTime unless elapsed_time_header says otherwise. Its session settings are left
# out: they are how anyone configures sessions.
LUAFCGID2_NAMES = frozenset({*ALIASES, "LuaStates", "BodySectors", "MinFileInfoTime",
                             "UseFileChecksum"})

# Every name a setting goes by.
KNOWN_NAMES = frozenset({*KEYS, *ALIASES, *SESSION_KEYS, *IGNORED_KEYS})
# The same lower-cased, for the typo check: the first spelling of a lower-cased name wins,
# so "listn" suggests listen, not luafcgid2's Listen.
_KNOWN_BY_LOWER: Dict[str, str] = {}
for _name in (*KEYS, *ALIASES, *SESSION_KEYS, *IGNORED_KEYS):
    _KNOWN_BY_LOWER.setdefault(_name.lower(), _name)
# How alike a global's name must be to a setting's to be taken for a typo of it: 0.85 holds
# wrkers, hanlder, max_post, showerror, config; it lets helpers, docroot, site_name pass.
TYPO_CUTOFF = 0.85


@dataclass(frozen=True)
class Settings:
    """Every setting of SPEC §6 under its canonical name, checked; see :data:`KEYS`."""

    path: str
    listen: str
    processes: int
    workers: int
    states: int
    clones: int
    sweep: int
    retries: int
    showerrors: bool
    buffering: bool
    headersize: int
    bodysize: int
    headers: bytes
    elapsed_time_header: bool
    handler: str
    httpstatus: str
    contenttype: str
    maxpost: int
    max_params: int
    max_connections: int
    logfile: Optional[str]
    startup: Optional[str]
    script_config: dict
    root: Optional[str]
    extensions: Tuple[str, ...]
    pidfile: str
    user: Optional[str]
    group: Optional[str]
    socket_mode: int
    socket_owner: Optional[str]
    allowed_clients: Optional[Tuple[str, ...]]
    backlog: int
    timeout: float
    graceful_timeout: float
    max_requests: int
    max_requests_jitter: int
    max_memory: int
    state_memory: int
    slowlog: Optional[str]
    slowlog_timeout: float
    status_path: Optional[str]
    ping_path: Optional[str]
    access_log: Optional[str]
    access_log_format: str
    loglevel: str
    lua: str
    jit: bool
    lua_path: Optional[str]
    lua_cpath: Optional[str]
    session_store: str
    session: dict
    # name → value as a script sees it through con:config(name); built once.
    _visible: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        visible = dict(self.script_config)
        visible.update(self.session)
        for key in KEYS:
            visible[key] = _as_script_sees(getattr(self, FIELDS.get(key, key)))
        for alias, key in ALIASES.items():
            visible[alias] = visible[key]
        object.__setattr__(self, "_visible", visible)

    def lookup(self, name: str) -> Any:
        """What ``con:config(name)`` returns: a setting (by luafcgid or luafcgid2 name),
        else the ``Config`` table's entry, else None."""
        return self._visible.get(name)


def _as_script_sees(value: Any) -> Any:
    """Settings in the plain data of ``script_config``: sequences as dicts keyed 1..n."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, tuple):
        return {index: item for index, item in enumerate(value, 1)}
    return value


# --- building Settings -------------------------------------------------------------------


def from_mapping(values: dict, path: str = "") -> Settings:
    """Settings from ``values`` (key → plain Python value) as if a file at ``path`` set them."""
    config_dir = os.path.dirname(path) if path else os.getcwd()
    given: Dict[str, Tuple[str, Any]] = {}  # canonical key → (name written, value)
    session = {key: default for key, (_, default) in SESSION_KEYS.items()}
    ignored, not_settings = [], []
    for name in sorted(values, key=str):
        value = values[name]
        key = ALIASES.get(name, name)
        if name in LUA_ISNUMBER_KEYS and isinstance(value, str):
            value = _lua_isnumber(value)
        if key in KEYS:
            if key in given:
                raise ConfigError(path, name, f"set twice, as {given[key][0]} and as {name}; "
                                  "keep one")
            given[key] = (name, value)
        elif key in SESSION_KEYS:
            session[key] = _checked(path, name, SESSION_KEYS[key][0], value, config_dir)
        elif key in IGNORED_KEYS:
            _checked(path, name, IGNORED_KEYS[key], value, config_dir)
            ignored.append(name)
        else:
            _not_a_typo(path, name, value)
            not_settings.append(f"{name}()" if value is _FUNCTION else str(name))
    settings = {}
    for key, (check, default) in KEYS.items():
        if key in given:
            name, value = given[key]
            settings[key] = _checked(path, name, check, value, config_dir)
        else:
            # Config's {} must not be shared between Settings.
            settings[key] = dict(default) if isinstance(default, dict) else default
    if settings["elapsed_time_header"] is DERIVED:
        settings["elapsed_time_header"] = not LUAFCGID2_NAMES.isdisjoint(map(str, values))
    _derive(settings, given, path)
    config_notices(_notices(path or "(defaults)", ignored, not_settings))
    return Settings(path=path, session=session,
                    **{FIELDS.get(key, key): value for key, value in settings.items()})


def _checked(path: str, name: str, check: Check, value: Any, config_dir: str) -> Any:
    try:
        return check(value, config_dir)
    except Invalid as error:
        raise ConfigError(path, name, str(error)) from None


def _lua_isnumber(text: str) -> Any:
    """A number-as-string read as Lua reads it; else the string, for the check to refuse."""
    number = lua_number(text)
    return text if number is None else number


def _not_a_typo(path: str, name: Any, value: Any) -> None:
    """Refuse a global that is no setting when its name looks like a setting's misspelt."""
    if value is _FUNCTION:
        return  # no setting takes a function: a global function is the file's own helper
    close = difflib.get_close_matches(str(name).lower(), _KNOWN_BY_LOWER, n=1,
                                      cutoff=TYPO_CUTOFF)
    if close:
        raise ConfigError(path, str(name),
                          f"unknown key (did you mean {_KNOWN_BY_LOWER[close[0]]}?)")


def _notices(where: str, ignored: list, not_settings: list) -> list:
    """The lines a config's load logs: (level, message)."""
    notices = []
    if not_settings:
        notices.append((logging.WARNING,
                        f"config {where}: ignoring globals that are not luafcgid settings: "
                        f"{', '.join(not_settings)} (make them local to silence this)"))
    if ignored:
        notices.append((logging.INFO, f"config {where}: {', '.join(ignored)} have no effect "
                                      "in luafcgid and are ignored"))
    return notices


def _derive(settings: dict, given: dict, path: str) -> None:
    """Fill the defaults computed from other settings; check settings against each other."""
    if settings["processes"] is DERIVED:
        settings["processes"] = os.cpu_count() or 1
    if settings["states"] is DERIVED:
        settings["states"] = 2 * settings["workers"]
    if settings["clones"] is DERIVED:
        settings["clones"] = settings["states"]
    if settings["session_store"] is DERIVED:
        sessions_dir = os.path.join(os.path.dirname(settings["pidfile"]), SESSION_DIR)
        settings["session_store"] = sessions.sqlite_url(os.path.join(sessions_dir,
                                                                      "sessions.db"))
    if settings["jit"] and settings["lua"] != "luajit":
        raise ConfigError(path, given["jit"][0], f"true needs lua = \"luajit\": lua = "
                          f"\"{settings['lua']}\" has no JIT compiler (remove jit, or set "
                          "lua = \"luajit\")")
    if settings["clones"] > settings["states"]:
        name = given["clones"][0]
        raise ConfigError(path, name, f"must be <= states ({settings['states']}), "
                          f"got {settings['clones']}")


def defaults() -> Settings:
    """The settings of an empty config file."""
    return from_mapping({})


# --- running the file ----------------------------------------------------------------------

# Makes the runtime a sandbox and returns the function that runs the config source.
# - No way to Python: lupa's `python` module goes, and so does `debug`, whose registry
#   holds Python objects (debug.getregistry().Py_None.__class__ ...).
# - No bytecode (load mode "t"), no os.exit, no C modules.
# - Bounded CPU: past the deadline the hook fires on every instruction, so a loop that
#   swallows errors with pcall still ends; it spares `run` itself, which reports the error.
_SANDBOX = """
local clock, getinfo, sethook = os.clock, debug.getinfo, debug.sethook
python, package.loaded.python = nil, nil
debug, package.loaded.debug = nil, nil
os.exit = function() error("os.exit is not allowed in the config file", 2) end
-- The master loads no C module: only workers link Lua C modules (lua/runtime.py).
package.cpath, package.loadlib = "", nil
local searchers = package.searchers
searchers[4], searchers[3] = nil, function()
    return "no C modules in the config file (it runs in the master, which loads none)"
end
local run
function run(source, cpu_seconds)
    local chunk, message = load(source, "=config", "t")
    if not chunk then return "syntax error", message end
    local deadline = clock() + cpu_seconds
    local function watchdog()
        if clock() > deadline and getinfo(2, "f").func ~= run then
            sethook(watchdog, "", 1)
            error("ran longer than " .. cpu_seconds .. " s of CPU", 2)
        end
    end
    sethook(watchdog, "", 1000000)
    local ok, err = pcall(chunk)
    sethook()
    if ok then return nil end
    if type(err) ~= "string" then err = "(error object is a " .. type(err) .. " value)" end
    return "error", err
end
return run
"""


def load(path: str) -> Settings:
    """Run the config file at ``path`` and check its settings; raises :class:`ConfigError`."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as file:
            source = file.read()
    except OSError as error:
        raise ConfigError(path, None, f"cannot read the config file: {error.strerror}") from None
    return from_mapping(_run(source, path), path)


def _run(source: bytes, path: str) -> dict:
    """The globals a config file's source sets, as plain Python data."""
    runtime = lupa.lua54.LuaRuntime(encoding=None, register_eval=False,
                                    register_builtins=False, max_memory=CONFIG_MAX_MEMORY)
    run = runtime.execute(_SANDBOX)
    lua_globals = runtime.globals()
    standard = set(lua_globals.keys())
    try:
        failure, message = _pair(run(source, CONFIG_CPU_SECONDS))
    except lupa.lua54.LuaError as error:  # out of memory outside the chunk's pcall
        raise ConfigError(path, None, f"error: {error or 'not enough memory'}") from None
    if failure:
        raise ConfigError(path, None, _where(failure, message.decode("utf-8", "replace")))
    values = {}
    for raw_name, value in lua_globals.items():
        if raw_name in standard:
            continue
        name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else raw_name
        if name in KNOWN_NAMES:
            values[name] = _plain(value, path, str(name), 0)
        else:  # no setting: whatever it holds (userdata, a table of functions) is the file's
            kind = lupa.lua54.lua_type(value)
            values[name] = _FUNCTION if kind == "function" else _NOT_A_SETTING
    return values


def _pair(result: Any) -> Tuple[Optional[str], bytes]:
    if result is None:
        return None, b""
    failure, message = result
    return failure.decode(), message


def _where(failure: str, message: str) -> str:
    """``config:3: boom`` → ``error at line 3: boom``."""
    located = re.match(r"^config:(\d+): (.*)$", message, re.DOTALL)
    if located:
        return f"{failure} at line {located.group(1)}: {located.group(2)}"
    return f"{failure}: {message}"


def _plain(value: Any, path: str, where: str, depth: int) -> Any:
    """A Lua value as plain Python data; ``where`` names it in errors (``Config.list.2``)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(path, where, "string is not valid UTF-8") from None
    kind = lupa.lua54.lua_type(value)
    if kind is None:  # bool, int, float: already Python
        return value
    if kind == "function":
        return _FUNCTION
    if kind != "table":
        raise ConfigError(path, where, f"a Lua {kind} cannot be a setting")
    if depth >= MAX_TABLE_DEPTH:
        raise ConfigError(path, where, f"tables nested deeper than {MAX_TABLE_DEPTH} "
                          "(a table that contains itself?)")
    converted = {}
    for raw_key, item in value.items():
        key = _plain(raw_key, path, where, depth + 1)
        if key is _FUNCTION or isinstance(key, dict):
            raise ConfigError(path, where, "table keys must be strings, numbers or booleans")
        converted[key] = _plain(item, path, f"{where}.{key}", depth + 1)
        if converted[key] is _FUNCTION:
            raise ConfigError(path, f"{where}.{key}", "a function cannot be a setting")
    return converted


def pidfile_of(path: str) -> Tuple[str, str]:
    """The pidfile a config file names even when the file is refused as a whole (an
    unknown key, a bad value elsewhere): ``(path, where it came from)``.

    ``stop``, ``status`` and ``reload`` use it to find a server whose config file was
    broken after it started. Only when the Lua itself does not run does it fall back to
    the default pidfile.
    """
    path = os.path.abspath(path)
    default = KEYS["pidfile"][1]
    try:
        with open(path, "rb") as file:
            values = _run(file.read(), path)
        value = values.get("pidfile")
        if value is None:
            return default, "the default pidfile: the config sets none"
        return required_path(value, os.path.dirname(path)), "the config's pidfile setting"
    except (OSError, ConfigError, Invalid):
        return default, "the default pidfile: the config file does not run"
