"""The Lua a worker runs: lupa's module for the configured ``lua``, linked so that Lua C
modules load, and the module search paths its states start with.

C modules. A Lua C module (``cjson.so``, ``luasql/postgres.so``) does not link against a
Lua library: it expects the host program to export the Lua C API (``lua_gettop``, ...).
lupa's extension modules carry their Lua inside, and Python imports them with local
symbols, so no C module can find that API (``undefined symbol: lua_checkstack``). A worker
process therefore makes its runtime's symbols global (:func:`link_globally`) before its
first state; the master never does (it only checks the config with a local import). One
runtime per process at most: two Lua libraries exporting the same names would resolve a C
module against whichever came first, and a lupa module imported after the promotion would
bind its own calls to the promoted one's (a crash). States of any other runtime in a
process (tests, tools) get their C searchers turned off with a message instead.

Search paths (:func:`base_paths`, :func:`package_paths`). A state's ``package.path`` and
``package.cpath`` are, in this order: the script's directory, the document root, the
application's LuaRocks tree ``<document root>/lua_modules/`` (as ``luarocks --tree
lua_modules`` makes it) when it exists, then ``lua_path``/``lua_cpath`` from the config,
where ``;;`` stands for the defaults. The defaults are what that Lua version's ``lua``
interpreter searches on this OS (Debian's multiarch directory included), replaced by the
environment's ``LUA_PATH_5_4``/``LUA_PATH`` (and ``LUA_CPATH...``) as ``lua.c`` replaces
them. Entries relative to the current directory (``./?.lua``) are never searched: a worker's
current directory means nothing to a script.

Compiled speed-ups (:func:`speedups`). ``speedups.c``, built by ``setup.py`` for each Lua
C API when a C compiler is there, holds a ``string.format`` that does the common
conversions itself and hands every other call to Lua's own (PUC Lua only: LuaJIT's is
compiled by its JIT), and a decoder of the request's PARAMS into its env table. A worker
process opens it right after :func:`link_globally`, before it drops privileges (the
package may be readable by root only); its states then load it by the same path, which
the dynamic loader finds open already. ``LUAFCGID_PURE=1`` in the environment turns it
off (CI runs the tests both ways).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import sysconfig
from types import ModuleType
from typing import Any, Dict, List, Mapping, Optional, Tuple

# The ``lua`` setting → lupa's modules for it, in order of preference.
LUA_MODULES: Dict[str, Tuple[str, ...]] = {
    "5.1": ("lua51",),
    "5.2": ("lua52",),
    "5.3": ("lua53",),
    "5.4": ("lua54",),
    "5.5": ("lua55",),
    "luajit": ("luajit21", "luajit20"),
}

# The ``lua`` setting → the Lua version its modules are built for (LuaJIT runs 5.1's).
MODULE_VERSIONS: Dict[str, str] = {
    "5.1": "5.1", "5.2": "5.2", "5.3": "5.3", "5.4": "5.4", "5.5": "5.5", "luajit": "5.1",
}

# The directory Debian (and Ubuntu) install Lua C modules under: /usr/lib/<triplet>/lua/5.x.
MULTIARCH: Optional[str] = sysconfig.get_config_var("MULTIARCH") or None

# The runtime whose symbols this process made global (None: none yet).
_global_runtime: Optional[str] = None

HERE = os.path.dirname(os.path.abspath(__file__))
# The ``lua`` setting → the C API its speed-ups are built for (setup.py): LuaJIT has 5.1's.
SPEEDUP_APIS: Dict[str, str] = {"5.1": "51", "luajit": "51", "5.3": "53", "5.4": "54"}
# The runtimes whose string.format is replaced: not LuaJIT, whose own is compiled by its
# JIT (a C function there would end the trace).
FAST_FORMAT = ("5.1", "5.3", "5.4")
# Set in the environment, the compiled speed-ups are not used.
PURE_VARIABLE = "LUAFCGID_PURE"
# The speed-ups this process opened (link_globally): name → path; the handles stay open.
_speedups: Dict[str, str] = {}
_speedup_handles: List[ctypes.CDLL] = []


class UnknownRuntime(LookupError):
    """``lua`` names no Lua that this lupa ships; ``str(e)`` says which ones it does."""


def module(name: str) -> ModuleType:
    """lupa's module for Lua ``name`` ("5.4", "luajit", ...), imported as Python imports it."""
    if name not in LUA_MODULES:
        raise UnknownRuntime(f"expected one of {', '.join(map(repr, LUA_MODULES))}, "
                             f"got {name!r}")
    for candidate in LUA_MODULES[name]:
        try:
            return importlib.import_module(f"lupa.{candidate}")
        except ImportError:
            continue
    raise UnknownRuntime(f"this lupa build does not ship Lua {name}; choose another or "
                         "install a lupa that has it")


def link_globally(name: str) -> None:
    """Make Lua ``name``'s C API (lupa's module for it) what Lua C modules link against in
    this process. Once per process, before the first state: a worker process does it as it
    starts. Other lupa runtimes must not be imported afterwards: their own calls would bind
    to this one's symbols, so a guard refuses them with an ImportError."""
    global _global_runtime
    if _global_runtime is not None:
        if _global_runtime != name:
            raise RuntimeError(f"this process already exports Lua {_global_runtime}'s C API")
        return
    lua = module(name)
    # RTLD_NOLOAD: the module is loaded already; only its symbols' scope changes.
    ctypes.CDLL(lua.__file__, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    _global_runtime = name
    sys.meta_path.insert(0, _OtherRuntimesRefused(lua.__name__))
    _open_speedups(name)


def _built(stem: str) -> Optional[str]:
    """The path of a speed-up setup.py built in this package (None: not built)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(HERE, stem + suffix)
        if os.path.exists(path):
            return path
    return None


def _open_speedups(name: str) -> None:
    """Open the speed-ups for Lua ``name`` now (their Lua symbols resolve against the
    runtime just made global), while this process may still read the package's files."""
    path = lua_speedups_built(name)
    if path is None or os.environ.get(PURE_VARIABLE):
        return
    _speedup_handles.append(ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL))
    _speedups["lua"] = path


def speedups() -> Dict[str, str]:
    """The compiled speed-ups this process uses: name → path (empty: the pure paths)."""
    return dict(_speedups)


def lua_speedups_built(name: str) -> Optional[str]:
    """The Lua speed-ups built for Lua ``name`` (None: none for it, or not built)."""
    api = SPEEDUP_APIS.get(name)
    return _built(f"_speedups{api}") if api else None


class _OtherRuntimesRefused(importlib.abc.MetaPathFinder):
    """Refuses importing a lupa runtime module once another one's symbols are global."""

    def __init__(self, allowed: str) -> None:
        self.allowed = allowed

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if (fullname.startswith("lupa.lua") and fullname != self.allowed
                and fullname not in sys.modules):
            raise ImportError(f"{fullname} cannot be imported in a process that exports "
                              f"{self.allowed}'s Lua C API (its calls would bind to it)")
        return None


def global_runtime() -> Optional[str]:
    """The runtime whose Lua C API this process exports (None: none; only worker processes
    export one)."""
    return _global_runtime


# --- search paths ------------------------------------------------------------------------------


def default_paths(name: str) -> Tuple[str, str]:
    """``package.path`` and ``package.cpath`` as ``lua`` of that version has them on this OS,
    without the entries relative to the current directory."""
    version = MODULE_VERSIONS[name]
    local_share, local_lib = f"/usr/local/share/lua/{version}", f"/usr/local/lib/lua/{version}"
    path = [f"{local_share}/?.lua", f"{local_share}/?/init.lua",
            f"{local_lib}/?.lua", f"{local_lib}/?/init.lua",
            f"/usr/share/lua/{version}/?.lua", f"/usr/share/lua/{version}/?/init.lua"]
    cpath = [f"{local_lib}/?.so"]
    if MULTIARCH:
        cpath.append(f"/usr/lib/{MULTIARCH}/lua/{version}/?.so")
    cpath += [f"/usr/lib/lua/{version}/?.so", f"{local_lib}/loadall.so"]
    return ";".join(path), ";".join(cpath)


def _environment_path(variable: str, name: str, default: str,
                      environ: Mapping[str, str]) -> str:
    """``lua.c``'s rule: ``LUA_PATH_5_4`` (versioned, 5.2 and later), else ``LUA_PATH``,
    replaces the default; ``;;`` in it stands for the default."""
    version = MODULE_VERSIONS[name]
    names = [variable] if version == "5.1" else [f"{variable}_{version.replace('.', '_')}",
                                                 variable]
    for candidate in names:
        value = environ.get(candidate)
        if value is not None:
            return expand(value, default)
    return default


def expand(value: str, default: str) -> str:
    """``value`` with its first ``;;`` standing for ``default`` (as Lua's own rule)."""
    if ";;" not in value:
        return value
    before, _, after = value.partition(";;")
    return ";".join(part for part in (before, default, after) if part)


def base_paths(name: str, lua_path: Optional[str], lua_cpath: Optional[str],
               environ: Mapping[str, str] = os.environ) -> Tuple[str, str]:
    """What every state of runtime ``name`` searches after its application's own directories:
    ``lua_path``/``lua_cpath`` (``;;`` = the defaults) or the defaults, where the defaults
    are the environment's ``LUA_PATH...`` or else :func:`default_paths`. Entries relative
    to the current directory are dropped."""
    default_path, default_cpath = default_paths(name)
    default_path = _environment_path("LUA_PATH", name, default_path, environ)
    default_cpath = _environment_path("LUA_CPATH", name, default_cpath, environ)
    path = expand(lua_path, default_path) if lua_path is not None else default_path
    cpath = expand(lua_cpath, default_cpath) if lua_cpath is not None else default_cpath
    return _absolute_only(path), _absolute_only(cpath)


def _absolute_only(path: str) -> str:
    return ";".join(entry for entry in path.split(";") if entry.startswith("/"))


def rocks_tree(docroot: str) -> Optional[str]:
    """The application's LuaRocks tree, ``<docroot>/lua_modules``, when it exists."""
    if not docroot:
        return None
    tree = os.path.join(docroot, "lua_modules")
    return tree if os.path.isdir(tree) else None


def package_paths(name: str, script_dir: str, docroot: str,
                  base: Tuple[str, str]) -> Tuple[str, str]:
    """``package.path`` and ``package.cpath`` of a state of ``name`` for a script in
    ``script_dir`` under ``docroot``: the application's directories, then ``base``
    (:func:`base_paths`)."""
    dirs: List[str] = [script_dir]
    if docroot and docroot != script_dir:
        dirs.append(docroot)
    path = [entry for directory in dirs for entry in (f"{directory}/?.lua",
                                                      f"{directory}/?/init.lua")]
    cpath: List[str] = []
    tree = rocks_tree(docroot)
    if tree is not None:
        version = MODULE_VERSIONS[name]
        path += [f"{tree}/share/lua/{version}/?.lua", f"{tree}/share/lua/{version}/?/init.lua"]
        cpath += [f"{tree}/lib/lua/{version}/?.so"]
    base_path, base_cpath = base
    return (";".join([*path, base_path]).strip(";"), ";".join([*cpath, base_cpath]).strip(";"))


# --- what to do about a module that does not load ------------------------------------------

_NOT_FOUND = re.compile(r"module '([^']+)' not found")
_OTHER_ABI = re.compile(r"error loading module '([^']+)' from file '([^']+)'"
                        r"[\s\S]*undefined symbol: (\w+)")


def advice(message: str, name: str) -> Optional[str]:
    """What to do about a Lua error ``message`` of a state of runtime ``name`` when it is a
    module that is missing or was built for another Lua; None for any other error."""
    version = MODULE_VERSIONS.get(name, name)
    found = _OTHER_ABI.search(message)
    if found:
        module_name, file, symbol = found.groups()
        return (f"{file} was built for another Lua than this server's lua = \"{name}\" "
                f"(it needs {symbol}, which Lua {version} lacks): install the module's build "
                f"for Lua {version}, or set lua to the version it was built for")
    found = _NOT_FOUND.search(message)
    if found:
        module_name = found.group(1)
        rock = module_name.split(".")[0]
        return (f"to install {module_name}: apt (Debian's Lua {version} modules are named "
                f"lua-<name>) or `luarocks --lua-version {version} --tree <document root>/"
                f"lua_modules install {rock}`; or add its directory to lua_path / lua_cpath "
                "(`luafcgid paths` shows where states look)")
    return None
