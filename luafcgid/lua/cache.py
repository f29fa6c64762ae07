"""The Lua state cache of one worker process (SPEC §2).

States are kept by script real path and lent to one request at a time. A request
takes an idle state of its script; if there is none, a clone is loaded while the
script has fewer than ``clones`` states and the cache fewer than ``states``; a full
cache evicts its least valuable idle state (:meth:`State.value`) to make room; when
nothing may be loaded or evicted, the request gets a transient state, dropped at
release. A request never waits for a state: it always gets one at once.

Thread safety: ``acquire``/``release`` run in the worker's thread pool, ``sweep`` in its
event loop. The lock guards only bookkeeping; loading and closing states (tens to
hundreds of microseconds, or a script's whole top level) happen outside it, in a slot
reserved under it.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from itertools import chain, count
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from luafcgid.log import log
from luafcgid.lua.session import SessionBridge
from luafcgid.lua.state import Blueprint, DocRoot, State


def _thread_data(cache_ref: weakref.ReferenceType) -> tuple:
    """ThreadData()'s Python side: script, count, script, count, ... for Lua to pair up.

    A weak reference: states hold this function, and the cache holds the states.
    """
    cache = cache_ref()
    counts = cache.loaded() if cache is not None else {}
    return tuple(chain.from_iterable((os.fsencode(path), number)
                                     for path, number in counts.items()))


class StateCache:
    """The Lua states of one worker process, keyed by script real path.

    ``clock`` (seconds, monotonic) dates each state's last use for :meth:`State.value`.
    """

    def __init__(self, settings: Any, worker_number: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 sessions: Optional[SessionBridge] = None) -> None:
        self._blueprint = Blueprint(settings, worker_number, sessions)
        self.sessions = self._blueprint.sessions  # the Session store's bridge its states use
        self._states = settings.states
        self._clones = settings.clones
        # retries = 0 still looks once: a request must look before it loads.
        self._lookups = max(1, settings.retries)
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: Dict[str, List[State]] = {}
        self._count: Dict[str, int] = {}  # kept states per script: idle, busy and loading
        self._total = 0
        self._busy: Set[State] = set()  # states lent to a request, transient ones too
        # State number → wall clock at the start of its load, while a request loads it: a
        # script's top level can run away too (a C call, a loop LuaJIT compiled).
        # state number → (when its load began, the params of the request it is for)
        self._loading: Dict[int, Tuple[float, Optional[Dict[bytes, bytes]]]] = {}
        self._closed = False
        self._numbers = count(1)
        self._thread_data = functools.partial(_thread_data, weakref.ref(self))

    def acquire(self, script: str, docroot: DocRoot,
                params: Optional[Dict[bytes, bytes]] = None) -> State:
        """A state of ``script`` (a checked real path) for one request; may load one.

        Raises :class:`ScriptError` when the script fails to load.
        """
        for _ in range(self._lookups - 1):
            with self._lock:
                state = self._take_idle(script)
                waiting = state is None and script in self._count
            if state is not None:
                return state
            if not waiting:
                break
            time.sleep(0)  # let a busy state of this script come back
        with self._lock:
            state = self._take_idle(script)
            if state is not None:
                return state
            victim, kept = self._reserve(script)
        if victim is not None:
            log.debug("%s: state %d evicted for %s", victim.script, victim.number, script)
            victim.close()
        return self._load(script, docroot, kept, params)

    def release(self, state: State) -> None:
        """Give ``state`` back; a transient or stale one (changed on disk, timed out, over
        state_memory) is dropped."""
        with self._lock:
            self._busy.discard(state)
            drop = state.transient or state.stale or self._closed
            if drop:
                if not state.transient:  # a transient state was never counted
                    self._uncount(state.script)
            else:
                state.last_used = self._clock()
                self._idle.setdefault(state.script, []).append(state)
        if drop:
            state.close()

    def sweep(self) -> int:
        """Drop idle states whose script or required module changed on disk (or vanished);
        busy ones are marked and dropped at release. Returns how many were dropped."""
        with self._lock:
            states = [*chain.from_iterable(self._idle.values()), *self._busy]
        seen: dict = {}
        changed = [state for state in states if state.changed(seen)]
        if not changed:
            return 0
        dropped = []
        with self._lock:
            for state in changed:
                if self._remove_idle(state):
                    self._uncount(state.script)
                    dropped.append(state)
                else:
                    state.stale = True
        for script in sorted({state.script for state in changed}):
            log.info("%s: changed on disk, its states are reloaded on their next request",
                     script)
        for state in dropped:
            state.close()
        return len(dropped)

    def loaded(self) -> Dict[str, int]:
        """Script path → number of states held (luafcgid2's ThreadData())."""
        with self._lock:
            return dict(self._count)

    def oldest_running(self) -> float:
        """Seconds the longest-running request of this worker has run; 0.0 when none runs."""
        return self.longest_running()[0]

    def longest_running(self) -> Tuple[float, Dict[bytes, bytes]]:
        """The request running longest: (seconds it has run, its params); (0.0, {}) when
        none runs. The master replaces a worker whose request overran ``timeout`` (a C call
        the watchdog cannot stop) and names that request in its log."""
        now = time.time()
        longest, params = 0.0, None
        with self._lock:
            # A script's top level being loaded counts too (no request params yet): a
            # runaway load is the master's to end as well.
            for started, request in self._loading.values():
                if now - started > longest:
                    longest, params = now - started, request
            for state in self._busy:
                seconds = state.running_for(now)
                if seconds > longest:
                    longest, params = seconds, state.params
        return longest, params or {}

    def __len__(self) -> int:
        return self._total

    def close(self) -> None:
        """Drop every state: idle ones now, busy ones at release."""
        with self._lock:
            self._closed = True
            idle = [*chain.from_iterable(self._idle.values())]
            self._idle.clear()
            for state in idle:
                self._uncount(state.script)
        for state in idle:
            state.close()

    # --- under the lock -------------------------------------------------------------------

    def _take_idle(self, script: str) -> Optional[State]:
        idle = self._idle.get(script)
        if not idle:
            return None
        state = idle.pop()  # the most recently used: its memory is the warmest
        if not idle:
            del self._idle[script]
        self._busy.add(state)
        state.hits += 1
        return state

    def _reserve(self, script: str) -> Tuple[Optional[State], bool]:
        """Reserve a slot for a new state of ``script``: (state to evict, kept or transient)."""
        if self._count.get(script, 0) >= self._clones:
            return None, False
        victim = None
        if self._total >= self._states:
            victim = self._least_valuable()
            if victim is None:
                return None, False
            self._remove_idle(victim)
            self._uncount(victim.script)
        self._count[script] = self._count.get(script, 0) + 1
        self._total += 1
        return victim, True

    def _least_valuable(self) -> Optional[State]:
        now = self._clock()
        idle = chain.from_iterable(self._idle.values())
        return min(idle, key=lambda state: state.value(now), default=None)

    def _remove_idle(self, state: State) -> bool:
        idle = self._idle.get(state.script)
        if not idle or state not in idle:
            return False
        idle.remove(state)
        if not idle:
            del self._idle[state.script]
        return True

    def _uncount(self, script: str) -> None:
        self._total -= 1
        left = self._count[script] - 1
        if left:
            self._count[script] = left
        else:
            del self._count[script]

    # --- outside the lock -----------------------------------------------------------------

    def _load(self, script: str, docroot: DocRoot, kept: bool,
              params: Optional[Dict[bytes, bytes]]) -> State:
        number = next(self._numbers)
        with self._lock:
            self._loading[number] = (time.time(), params)
        try:
            state = State(self._blueprint, script, docroot, number, self._thread_data)
        except BaseException:
            if kept:
                with self._lock:
                    self._uncount(script)
            raise
        finally:
            with self._lock:
                del self._loading[number]
        state.hits = 1
        state.transient = not kept
        with self._lock:
            self._busy.add(state)
        if not kept:
            log.debug("%s: every state busy or the cache full, state %d is transient",
                      script, state.number)
        return state
