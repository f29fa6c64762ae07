"""The state cache (SPEC §2): caps, eviction by value, transient states, threads, sweep.

Real lupa runtimes and real files in tmp_path; time is an injected clock, never a sleep.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

from luafcgid.config import from_mapping
from luafcgid.lua import ScriptError, State, StateCache

COUNTER = """
loads = (loads or 0) + 1
function main(env, con)
    hits = (hits or 0) + 1
    con:puts(NAME .. " " .. hits)
end
"""


class Clock:
    """A settable monotonic clock, in seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, source: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return str(path)


def script(directory: Path, name: str) -> str:
    """A script that says its name and how many requests its state served."""
    return write(directory / f"{name}.lua", f'NAME = "{name}"\n' + COUNTER)


def body(state: State) -> bytes:
    return state.run({}, b"", [].append, 1).split(b"\r\n\r\n", 1)[1]


def bump(path: str, source: str) -> None:
    """Rewrite ``path`` and move its mtime on, as an editor would a second later."""
    info = os.stat(path)
    Path(path).write_text(source)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def cache_with():
    """``cache_with(clock=None, **settings)``: a StateCache, closed after the test."""
    made: List[StateCache] = []

    def make(clock=None, **settings) -> StateCache:
        extra = {"clock": clock} if clock else {}
        made.append(StateCache(from_mapping(settings), **extra))
        return made[-1]

    yield make
    for cache in made:
        cache.close()


# --- caps ---------------------------------------------------------------------------------


def test_idle_state_is_reused(tmp_path, cache_with):
    cache = cache_with(states=4)
    page = script(tmp_path, "a")
    first = cache.acquire(page, str(tmp_path))
    assert body(first) == b"a 1"
    cache.release(first)
    again = cache.acquire(page, str(tmp_path))
    assert again is first
    assert body(again) == b"a 2"
    cache.release(again)
    assert len(cache) == 1 and cache.loaded() == {page: 1}


def test_clones_cap_then_transient(tmp_path, cache_with):
    cache = cache_with(states=4, clones=2)
    page = script(tmp_path, "a")
    held = [cache.acquire(page, str(tmp_path)) for _ in range(3)]
    assert [state.transient for state in held] == [False, False, True]
    assert len({state.number for state in held}) == 3
    assert cache.loaded() == {page: 2} and len(cache) == 2
    for state in held:
        cache.release(state)
    assert len(cache) == 2
    # the transient state was dropped: its runtime is gone
    assert held[2]._runtime is None and held[0]._runtime is not None


def test_states_cap_evicts_an_idle_state(tmp_path, cache_with):
    cache = cache_with(states=2)
    pages = [script(tmp_path, name) for name in "abc"]
    for page in pages:
        cache.release(cache.acquire(page, str(tmp_path)))
    assert len(cache) == 2
    assert sum(cache.loaded().values()) == 2 and pages[2] in cache.loaded()


def test_transient_when_every_state_is_busy(tmp_path, cache_with):
    cache = cache_with(states=1)
    a, b = script(tmp_path, "a"), script(tmp_path, "b")
    busy = cache.acquire(a, str(tmp_path))
    other = cache.acquire(b, str(tmp_path))  # cache full, nothing idle to evict
    same = cache.acquire(a, str(tmp_path))   # clones = states = 1
    assert not busy.transient and other.transient and same.transient
    assert body(other) == b"b 1" and body(same) == b"a 1"
    cache.release(other)
    cache.release(same)
    cache.release(busy)
    assert cache.loaded() == {a: 1}


def test_retries_never_wait_without_bound(tmp_path, cache_with):
    cache = cache_with(states=1, retries=1000)
    page = script(tmp_path, "a")
    busy = cache.acquire(page, str(tmp_path))
    extra = cache.acquire(page, str(tmp_path))  # looks 1000 times, then goes transient
    assert extra.transient
    cache.release(extra)
    cache.release(busy)


def test_load_failure_frees_the_reserved_slot(tmp_path, cache_with):
    cache = cache_with(states=1)
    broken = write(tmp_path / "broken.lua", "function main(")
    with pytest.raises(ScriptError):
        cache.acquire(broken, str(tmp_path))
    assert len(cache) == 0 and cache.loaded() == {}
    page = script(tmp_path, "a")
    state = cache.acquire(page, str(tmp_path))
    assert not state.transient
    cache.release(state)


def test_a_stale_state_is_dropped_at_release(tmp_path, cache_with):
    cache = cache_with()
    page = script(tmp_path, "a")
    state = cache.acquire(page, str(tmp_path))
    state.stale = True
    cache.release(state)
    assert len(cache) == 0 and state._runtime is None


# --- eviction by value --------------------------------------------------------------------


def serve(cache: StateCache, page: str, times: int, directory: Path) -> None:
    """``times`` requests to ``page``."""
    for _ in range(times):
        state = cache.acquire(page, str(directory))
        body(state)
        cache.release(state)


def test_hot_an_hour_ago_loses_to_used_a_second_ago(tmp_path, cache_with):
    clock = Clock()
    cache = cache_with(clock=clock, states=2)
    hot, recent, new = (script(tmp_path, name) for name in ("hot", "recent", "new"))
    serve(cache, hot, 1000, tmp_path)
    clock.now = 3599.0
    serve(cache, recent, 1, tmp_path)
    clock.now = 3600.0
    serve(cache, new, 1, tmp_path)
    assert set(cache.loaded()) == {recent, new}


def test_popularity_wins_between_states_of_like_age(tmp_path, cache_with):
    clock = Clock()
    cache = cache_with(clock=clock, states=2)
    hot, rare, new = (script(tmp_path, name) for name in ("hot", "rare", "new"))
    clock.now = 100.0
    serve(cache, rare, 1, tmp_path)
    clock.now = 101.0
    serve(cache, hot, 50, tmp_path)
    clock.now = 105.0
    serve(cache, new, 1, tmp_path)
    assert set(cache.loaded()) == {hot, new}


def test_busy_states_are_never_evicted(tmp_path, cache_with):
    clock = Clock()
    cache = cache_with(clock=clock, states=2)
    old, idle, new = (script(tmp_path, name) for name in ("old", "idle", "new"))
    busy = cache.acquire(old, str(tmp_path))
    serve(cache, idle, 100, tmp_path)
    clock.now = 10_000.0
    serve(cache, new, 1, tmp_path)  # evicts the idle state, however valuable
    assert set(cache.loaded()) == {old, new}
    cache.release(busy)


# --- threads ------------------------------------------------------------------------------


def test_concurrent_acquire_lends_each_state_to_one_request(tmp_path, cache_with):
    cache = cache_with(workers=8, states=4, clones=2)
    pages = [script(tmp_path, name) for name in "abc"]
    lent: Dict[int, int] = {}  # id(state) → thread ident
    lent_lock = threading.Lock()
    failures: List[str] = []
    start = threading.Barrier(8)

    def worker(offset: int) -> None:
        start.wait(timeout=10)
        for request in range(150):
            page = pages[(offset + request) % len(pages)]
            state = cache.acquire(page, str(tmp_path))
            with lent_lock:
                if id(state) in lent:
                    failures.append(f"state {state.number} lent twice")
                lent[id(state)] = threading.get_ident()
            out = body(state)
            if not out.startswith(os.path.basename(page)[:-4].encode() + b" "):
                failures.append(f"{page} answered {out!r}")
            with lent_lock:
                del lent[id(state)]
            cache.release(state)

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert len(cache) <= 4
    assert all(count <= 2 for count in cache.loaded().values())
    assert sum(cache.loaded().values()) == len(cache)


# --- sweep --------------------------------------------------------------------------------


def test_sweep_drops_states_of_a_changed_script(tmp_path, cache_with):
    cache = cache_with(states=4)
    page, other = script(tmp_path, "a"), script(tmp_path, "b")
    serve(cache, page, 1, tmp_path)
    serve(cache, other, 1, tmp_path)
    assert cache.sweep() == 0
    bump(page, 'NAME = "a2"\n' + COUNTER)
    assert cache.sweep() == 1
    assert cache.loaded() == {other: 1}
    state = cache.acquire(page, str(tmp_path))
    assert body(state) == b"a2 1"
    cache.release(state)


def test_sweep_drops_states_of_a_vanished_script(tmp_path, cache_with):
    cache = cache_with()
    page = script(tmp_path, "a")
    serve(cache, page, 1, tmp_path)
    os.unlink(page)
    assert cache.sweep() == 1 and len(cache) == 0


@pytest.mark.parametrize("where", ["script dir", "docroot", "docroot package"])
def test_sweep_drops_states_whose_required_module_changed(tmp_path, cache_with, where):
    docroot = tmp_path / "www"
    module_path = {
        "script dir": docroot / "app" / "helper.lua",
        "docroot": docroot / "helper.lua",
        "docroot package": docroot / "helper" / "init.lua",
    }[where]
    module = write(module_path, 'return {word = "old"}\n')
    page = write(docroot / "app" / "page.lua", """
        local helper = require("helper")
        function main(env, con) con:puts(helper.word) end
    """)
    cache = cache_with(states=4)
    state = cache.acquire(page, str(docroot))
    assert body(state) == b"old"
    cache.release(state)
    assert cache.sweep() == 0
    bump(module, 'return {word = "new"}\n')
    assert cache.sweep() == 1
    state = cache.acquire(page, str(docroot))
    assert body(state) == b"new"
    cache.release(state)


def test_module_required_during_a_request_is_watched(tmp_path, cache_with):
    module = write(tmp_path / "lazy.lua", 'return "old"\n')
    page = write(tmp_path / "page.lua", """
        function main(env, con) con:puts(require("lazy")) end
    """)
    cache = cache_with()
    serve(cache, page, 1, tmp_path)
    bump(module, 'return "new"\n')
    assert cache.sweep() == 1


def test_busy_state_of_a_changed_script_is_dropped_at_release(tmp_path, cache_with):
    cache = cache_with(states=4)
    page = script(tmp_path, "a")
    busy = cache.acquire(page, str(tmp_path))
    bump(page, 'NAME = "a2"\n' + COUNTER)
    assert cache.sweep() == 0  # busy: not dropped yet
    assert body(busy) == b"a 1"  # the request in flight finishes on the old code
    cache.release(busy)
    assert len(cache) == 0 and busy._runtime is None


def test_startup_script_runs_first_and_is_watched(tmp_path, cache_with):
    startup = write(tmp_path / "startup.lua", 'order = {"startup"}\n')
    page = write(tmp_path / "www" / "page.lua", """
        order[#order + 1] = "script"
        function main(env, con) con:puts(table.concat(order, ",")) end
    """)
    cache = cache_with(startup=startup)
    state = cache.acquire(page, str(tmp_path / "www"))
    assert body(state) == b"startup,script"
    cache.release(state)
    bump(startup, 'order = {"startup2"}\n')
    assert cache.sweep() == 1


def test_failing_startup_script_fails_the_load(tmp_path, cache_with):
    startup = write(tmp_path / "startup.lua", 'error("no database")\n')
    page = script(tmp_path, "a")
    cache = cache_with(startup=startup)
    with pytest.raises(ScriptError) as failure:
        cache.acquire(page, str(tmp_path))
    assert "startup.lua:1: no database" in failure.value.message
    assert len(cache) == 0


def test_package_path_has_the_script_dir_and_docroot_and_no_dot_slash(tmp_path, cache_with):
    docroot = tmp_path / "www"
    page = write(docroot / "app" / "page.lua", """
        function main(env, con) con:puts(package.path .. "\\n" .. package.cpath) end
    """)
    cache = cache_with()
    state = cache.acquire(page, str(docroot) + "/")
    path, cpath = body(state).decode().split("\n")
    cache.release(state)
    entries = path.split(";")
    assert entries[:4] == [f"{docroot}/app/?.lua", f"{docroot}/app/?/init.lua",
                           f"{docroot}/?.lua", f"{docroot}/?/init.lua"]
    assert not [entry for entry in entries + cpath.split(";") if entry.startswith("./")]


def test_close_drops_everything(tmp_path, cache_with):
    cache = cache_with(states=4)
    page = script(tmp_path, "a")
    serve(cache, page, 1, tmp_path)
    busy = cache.acquire(script(tmp_path, "b"), str(tmp_path))
    cache.close()
    assert len(cache) == 1  # the busy one goes at release
    cache.release(busy)
    assert len(cache) == 0 and busy._runtime is None


# --- memory -------------------------------------------------------------------------------


@pytest.mark.slow
def test_evicted_states_free_their_memory(tmp_path, cache_with):
    """3000 evictions: a leak of discarded runtimes (each holding ~100 KiB) would show."""
    pages = [write(tmp_path / f"s{number}.lua", f"""
        local ballast = {{}}
        for i = 1, 1000 do ballast[i] = "{number}:" .. i .. string.rep("x", 64) end
        function main(env, con) con:log(""); con:puts(#ballast) end
    """) for number in range(50)]
    cache = cache_with(states=2)
    process = psutil.Process()

    def cycle(count: int) -> None:
        for number in range(count):
            state = cache.acquire(pages[number % len(pages)], str(tmp_path))
            state.run({b"HTTP_COOKIE": b"a=1"}, b"body", [].append, 1)
            cache.release(state)

    cycle(200)  # warm up allocators
    gc.collect()
    before = process.memory_info().rss
    cycle(3000)
    gc.collect()
    growth = process.memory_info().rss - before
    assert growth < 40 * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MiB"
