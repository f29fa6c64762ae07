"""One Lua state (luafcgid/lua/state.py): loading, the files it watches, references it keeps.

Real lupa runtimes and real files in tmp_path.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path
from typing import Iterator, List

import pytest

from luafcgid.config import from_mapping
from luafcgid.lua import ScriptError, State
from luafcgid.lua.state import Blueprint, signature


def write(path: Path, source: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return str(path)


def load(script: str, docroot: str = "", number: int = 1, **settings: object) -> State:
    return State(Blueprint(from_mapping(settings), worker_number=1), script, docroot, number,
                 tuple)


@pytest.fixture
def gc_off() -> Iterator[None]:
    """Python's cycle collector off: what is freed is freed by reference counting alone."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("lua", ["5.4", "5.1", "luajit"])
def test_state_records_every_lua_file_it_loaded(tmp_path, lua):
    startup = write(tmp_path / "startup.lua", "started = true\n")
    module = write(tmp_path / "www" / "lib" / "util.lua", "return {}\n")
    page = write(tmp_path / "www" / "page.lua", """
        require("lib.util")
        require("string")  -- a library: no file
        function main(env, con) end
    """)
    state = load(page, str(tmp_path / "www"), startup=startup, lua=lua)
    assert [path for path, _ in state.files] == [startup, page, module]
    assert all(seen == signature(path) for path, seen in state.files)
    assert not state.changed({})
    os.utime(module, ns=(0, 0))
    assert state.changed({})
    state.close()


@pytest.mark.parametrize("lua", ["5.4", "5.1", "luajit"])
def test_missing_module_is_a_load_error_listing_the_paths_tried(tmp_path, lua):
    page = write(tmp_path / "page.lua", 'require("nowhere")\n')
    with pytest.raises(ScriptError) as failure:
        load(page, str(tmp_path), lua=lua)
    assert "module 'nowhere' not found" in failure.value.message
    assert f"{tmp_path}/nowhere.lua" in failure.value.message
    assert "'./nowhere.lua'" not in failure.value.message


def test_script_error_carries_what_the_caller_needs(tmp_path):
    page = write(tmp_path / "page.lua", "function main() error('bad') end\n")
    state = load(page)
    with pytest.raises(ScriptError) as failure:
        state.run({}, b"", [].append, 1)
    error = failure.value
    assert (error.script, error.flushed, error.memory) == (page, False, False)
    assert str(error) == f"{page}: {error.message}"
    assert error.message.endswith("page.lua:1: bad")
    assert "in function" in error.traceback
    state.close()


def test_state_keeps_no_reference_to_the_sink(tmp_path, gc_off):
    page = write(tmp_path / "page.lua", "function main(env, con) con:puts('x') con:flush() end\n")
    state = load(page, buffering=False)

    class Sink:
        def __init__(self) -> None:
            self.data: List[bytes] = []

        def __call__(self, data: bytes) -> None:
            self.data.append(data)

    sink = Sink()
    gone = weakref.ref(sink)
    assert state.run({b"A": b"1"}, b"body", sink, 1) == b""
    assert sink.data
    del sink
    assert gone() is None
    state.close()


def test_dropped_state_is_freed_without_the_cycle_collector(tmp_path, gc_off, log_lines):
    """Nothing Lua holds points back at the state: reference counting frees the runtime."""
    page = write(tmp_path / "page.lua", """
        collected = setmetatable({}, {__gc = function() Log("runtime closed") end})
        function main(env, con) con:puts(#ThreadData()) end
    """)
    state = load(page, lua="5.4")
    state.run({}, b"", [].append, 1)
    del state  # no close(): only our references go
    assert log_lines == [f"{page}: runtime closed"]


@pytest.mark.parametrize("lua", ["5.4", "luajit"])
def test_state_works_again_after_a_memory_error(tmp_path, lua):
    page = write(tmp_path / "page.lua", """
        function main(env, con)
            if env.HOG then local t = {} for i = 1, 1e8 do t[i] = {} end end
            con:puts("ok")
        end
    """)
    state = load(page, lua=lua, state_memory=8 * 1024 * 1024)
    with pytest.raises(ScriptError) as failure:
        state.run({b"HOG": b"1"}, b"", [].append, 1)
    assert failure.value.memory
    assert state.run({}, b"", [].append, 1).endswith(b"\r\n\r\nok")
    state.close()


def test_close_is_idempotent(tmp_path):
    state = load(write(tmp_path / "page.lua", "function main() end\n"))
    state.close()
    state.close()


def test_value_formula(tmp_path):
    state = load(write(tmp_path / "page.lua", "function main() end\n"))
    state.hits, state.last_used = 99, 100.0
    assert state.value(100.0) == pytest.approx(4.60517, rel=1e-5)  # log(1 + 99) / 1
    assert state.value(101.0) == pytest.approx(4.60517 / 2, rel=1e-5)
    assert state.value(3700.0) == pytest.approx(4.60517 / 3601, rel=1e-5)
    state.close()


def test_without_document_root_the_root_setting_is_searched(tmp_path):
    www = tmp_path / "www"
    write(www / "shared.lua", 'return "from root"\n')
    page = write(www / "app" / "page.lua", """
        local shared = require("shared")
        function main(env, con) con:puts(shared) end
    """)
    state = load(page, "", root=str(www))
    assert state.run({}, b"", [].append, 1).endswith(b"\r\n\r\nfrom root")
    state.close()
