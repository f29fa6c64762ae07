"""The event loop as a baton passed between a worker's threads (workers/threaded.py).

One thread at a time holds the baton: it runs the event loop and the requests the loop
reads, inline, with no thread switch. One other thread is the standby: it looks every
``handoff_after`` seconds whether the holder is still in the request it was running at the
last look, and past ``handoff_after`` takes the baton from it; the old holder finishes its
request, finds it no longer holds the baton, and comes back to :meth:`Baton.take` to wait
until it is needed again. The other threads wait on the baton. After ``park_after_polls``
looks with no request running the standby parks (an idle worker costs no CPU) until the
holder starts one.

The holder's side is plain attribute access under :attr:`Baton.lock` (no method call per
request): as it starts a request it sets ``running_since`` (``time.monotonic()``) and,
when ``parked``, calls :meth:`Baton.unpark`; once it is doing I/O again it sets
``running_since`` to 0.0. It checks ``holder`` to learn whether it still holds the baton.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

# How long a request may hold the event loop before the standby takes it over; also how
# often the standby looks (each look takes the GIL from the holder: docs/design.rst has
# what it costs).
HANDOFF_AFTER = 0.005
# Looks with no request running after which the standby parks until the next request.
PARK_AFTER_POLLS = int(1.0 / HANDOFF_AFTER)


class Baton:
    """Who runs the event loop: ``holder`` (thread number, 0: nobody), ``standby`` (the
    thread watching the holder, 0: nobody), ``running_since`` (when the holder started its
    current request, 0.0: doing I/O), ``parked`` (the standby waits for a request to
    start), ``ended`` (every thread leaves)."""

    def __init__(self, lock: Optional[threading.Lock] = None,
                 handoff_after: float = HANDOFF_AFTER,
                 park_after_polls: int = PARK_AFTER_POLLS) -> None:
        # The caller's lock when it has one: its own bookkeeping and the baton's change
        # together (the worker pops a request and sets running_since in one hold).
        self.lock = lock if lock is not None else threading.Lock()
        self.handoff_after = handoff_after
        self.park_after_polls = park_after_polls
        self.holder = 0
        self.standby = 0
        self.running_since = 0.0
        self.parked = False
        self.ended = False
        self._passed = threading.Condition(self.lock)    # the waiting threads
        self._unparked = threading.Condition(self.lock)  # the parked standby

    def take(self, me: int) -> bool:
        """Wait until thread ``me`` holds the baton; False once the baton has ended."""
        idle_polls = 0
        while True:
            with self.lock:
                if self.ended:
                    return False
                if not self.holder:
                    self.holder = me
                    return True
                if not self.standby:
                    self.standby = me
                if self.standby != me:
                    self._passed.wait()
                    continue
                if idle_polls >= self.park_after_polls:
                    self.parked = True
                    self._unparked.wait()
                    idle_polls = 0
                    continue
            # The standby looks without the lock: taking it at every look made the holder
            # wait for it.
            time.sleep(self.handoff_after)
            since = self.running_since
            if not since:
                idle_polls += 1
            elif time.monotonic() - since > self.handoff_after and self._take_over(me, since):
                return True
            else:
                idle_polls = 0

    def _take_over(self, me: int, since: float) -> bool:
        """The standby takes the baton from a holder still in the request begun at ``since``."""
        with self.lock:
            if self.ended or self.standby != me or self.running_since != since:
                return False
            self.holder, self.standby, self.running_since = me, 0, 0.0
            self._passed.notify()  # another thread becomes the standby
            return True

    def unpark(self) -> None:
        """Wake the parked standby (the holder calls it, holding the lock, as a request
        starts)."""
        self.parked = False
        self._unparked.notify()

    def end(self) -> None:
        """Every thread leaves: :meth:`take` returns False, now and from then on."""
        with self.lock:
            self.ended = True
            self._passed.notify_all()
            self._unparked.notify_all()
