"""The master's decisions (luafcgid/arbiter.py) with no process: os.fork, os.kill and
os.waitpid, the clock and the workers' memory are stand-ins, so a test drives
``supervise()`` turn by turn and reads what the master decided from the forks it made
and the signals it sent. tests/test_arbiter.py and tests/test_signals.py check the same
verbs end to end with real workers; these pin down which worker, in which order, when."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List, Tuple

import pytest

from luafcgid import arbiter
from luafcgid.arbiter import Arbiter, WorkerProcess
from luafcgid.config import from_mapping

# Above Linux's PID_MAX_LIMIT (4194304): no real process can have one of these pids, so
# even a signal that slipped past the stand-in could reach nobody.
FIRST_PID = 5_000_000
MIB = 1024 * 1024


class World:
    """What the master sees outside itself, made up by the test: the children it forks
    (pids from FIRST_PID), the signals it sends, the children that died, a clock that
    moves only when told, and each worker's memory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.next_pid = FIRST_PID
        self.forked: List[int] = []
        self.sent: List[Tuple[int, int]] = []
        self.dead: List[Tuple[int, int]] = []   # (pid, wait status) for the next reap
        self.rss: Dict[int, int] = {}
        monkeypatch.setattr(os, "fork", self.fork)
        monkeypatch.setattr(os, "kill", self.kill)
        monkeypatch.setattr(os, "waitpid", self.waitpid)
        # The module's own names only: pytest and the rest of the process keep real time.
        monkeypatch.setattr(arbiter, "time", SimpleNamespace(monotonic=lambda: self.now,
                                                             time=lambda: self.now))
        monkeypatch.setattr(arbiter, "rss_of", lambda pid: self.rss.get(pid, 0))

    def fork(self) -> int:
        pid = self.next_pid
        self.next_pid += 1
        self.forked.append(pid)
        return pid

    def kill(self, pid: int, signum: int) -> None:
        assert pid >= FIRST_PID, f"a real pid {pid} was about to be signalled"
        self.sent.append((pid, signum))

    def waitpid(self, pid: int, options: int) -> Tuple[int, int]:
        return self.dead.pop(0) if self.dead else (0, 0)

    def signalled(self, signum: int) -> List[int]:
        """Pids sent ``signum``, in order."""
        return [pid for pid, sent in self.sent if sent == signum]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # Arbiter() takes it from the env
    return World(monkeypatch)


@pytest.fixture
def make_master(world: World, tmp_path: Path) -> Iterator:
    """``make_master(**settings)``: an Arbiter as after prepare(), never run; its workers'
    report pipes are real (spawn makes them) and closed after the test."""
    made: List[Arbiter] = []

    def make(**settings: object) -> Arbiter:
        values = {"processes": 1, "pidfile": str(tmp_path / "luafcgid.pid"),
                  "graceful_timeout": 10, "timeout": 30, "sweep": 1000, **settings}
        master = Arbiter(str(tmp_path / "config.lua"), from_mapping(values))
        master.listener = socket.socket()  # never bound: spawn only hands it on
        made.append(master)
        return master

    yield make
    for master in made:
        for worker in master.workers.values():
            master.close_reports(worker)
        master.listener.close()


def by_number(master: Arbiter, generation: int = 0) -> Dict[int, WorkerProcess]:
    return {w.number: w for w in master.workers.values() if w.generation == generation}


def boot(master: Arbiter, worker: WorkerProcess) -> None:
    """The worker answers a heartbeat: its first report."""
    master.note_report(worker, {"requests": 0, "busy": 0})


def started_and_booted(master: Arbiter, world: World) -> Dict[int, WorkerProcess]:
    master.supervise(world.now)
    for worker in master.workers.values():
        boot(master, worker)
    return by_number(master)


def queue(master: Arbiter, *signums: int) -> None:
    """Signals as the loop finds them in its wakeup pipe."""
    master.signal_queue.extend(signums)
    master.handle_signals()


# --- how many workers: spawn_missing -----------------------------------------------------


def test_ttou_stops_the_highest_numbered_surplus_workers_and_starts_none(make_master, world):
    master = make_master(processes=3)
    workers = started_and_booted(master, world)
    assert sorted(workers) == [1, 2, 3] and len(world.forked) == 3
    queue(master, signal.SIGTTOU, signal.SIGTTOU)
    master.supervise(world.now)
    assert world.signalled(signal.SIGTERM) == [workers[3].pid, workers[2].pid]
    assert len(world.forked) == 3
    assert workers[3].stopping and workers[2].stopping and not workers[1].stopping
    # The deadline for KILL is graceful_timeout past the TERM, plus the margin.
    assert workers[3].stop_deadline == world.now + 10 + arbiter.STOP_MARGIN
    # Another turn decides nothing new; a third TTOU never goes below one worker.
    queue(master, signal.SIGTTOU)
    master.supervise(world.now)
    assert master.processes == 1
    assert world.signalled(signal.SIGTERM) == [workers[3].pid, workers[2].pid]


def test_ttin_and_a_dead_worker_get_the_lowest_free_numbers_at_once(make_master, world):
    master = make_master(processes=3)
    workers = started_and_booted(master, world)
    world.dead.append((workers[2].pid, signal.SIGKILL))  # wait status: killed by KILL
    master.reap()
    queue(master, signal.SIGTTIN)
    master.supervise(world.now)  # same instant: a crash after booting is no boot failure
    assert len(world.forked) == 5
    assert sorted(by_number(master)) == [1, 2, 3, 4]
    assert by_number(master)[2].pid == world.forked[3]
    assert by_number(master)[4].pid == world.forked[4]


# --- replacing workers: heartbeat (max_memory) and stop_replaced --------------------------


def test_a_worker_over_max_memory_stops_only_once_its_replacement_has_booted(make_master,
                                                                              world):
    master = make_master(processes=2, max_memory=100, sweep=1000)
    workers = started_and_booted(master, world)
    world.rss[workers[1].pid] = 150 * MIB
    world.rss[workers[2].pid] = 99 * MIB
    world.now += 1.0  # the next heartbeat is due
    master.supervise(world.now)
    assert workers[1].replace == "over max_memory" and not workers[2].replace
    assert len(world.forked) == 3  # one replacement, for worker 1 only
    (replacement,) = [w for w in master.workers.values() if w.pid == world.forked[2]]
    assert replacement.number == 1
    assert world.signalled(signal.SIGTERM) == []  # it serves until the replacement does
    master.supervise(world.now)
    assert world.signalled(signal.SIGTERM) == [] and len(world.forked) == 3
    boot(master, replacement)
    master.supervise(world.now)
    assert world.signalled(signal.SIGTERM) == [workers[1].pid]
    assert world.signalled(signal.SIGUSR2).count(workers[2].pid) >= 1  # heartbeats only


def test_after_a_reload_the_oldest_old_worker_stops_first_one_per_booted_new_one(make_master,
                                                                                world):
    master = make_master(processes=3)
    old = started_and_booted(master, world)
    # Started in another order than their numbers (worker 1 is itself a replacement).
    old[1].started, old[2].started, old[3].started = 300.0, 100.0, 200.0
    master.generation = 1  # what reload() does once the new config is taken
    master.supervise(world.now)
    new = by_number(master, generation=1)
    assert sorted(new) == [1, 2, 3]
    assert world.signalled(signal.SIGTERM) == []  # none of the new ones serves yet
    for number in (3, 1, 2):
        boot(master, new[number])
        master.supervise(world.now)
    assert world.signalled(signal.SIGTERM) == [old[2].pid, old[3].pid, old[1].pid]
    assert len(world.forked) == 6


def test_a_worker_on_the_previous_config_stops_before_an_older_one_over_memory(make_master,
                                                                              world):
    """The order is (generation, started): the previous config's workers go first."""
    master = make_master(processes=2, max_memory=100)
    workers = started_and_booted(master, world)
    workers[1].started, workers[2].started = 100.0, 200.0
    master.generation = 1
    master.supervise(world.now)
    new_1, new_2 = by_number(master, generation=1)[1], by_number(master, generation=1)[2]
    boot(master, new_1)
    boot(master, new_2)
    # A worker of the new config over max_memory, started before both old ones.
    new_1.started = 50.0
    world.rss[new_1.pid] = 150 * MIB
    world.now += 1.0
    master.supervise(world.now)
    assert new_1.replace == "over max_memory"
    assert world.signalled(signal.SIGTERM) == [workers[1].pid, workers[2].pid]


# --- workers that die before they boot: boot_failed --------------------------------------


def fail_boot(master: Arbiter, world: World) -> None:
    """The newest worker exits 1 before its first report."""
    world.dead.append((world.forked[-1], 1 << 8))
    master.reap()


def test_boot_failures_back_off_doubling_then_the_master_gives_up(make_master, world):
    master = make_master(processes=1)
    master.supervise(world.now)
    delays = []
    for _ in range(arbiter.MAX_BOOT_FAILURES - 1):
        failed_at = world.now
        fail_boot(master, world)
        delays.append(round(master.spawn_after - failed_at, 6))
        forks = len(world.forked)
        world.now = master.spawn_after - 0.001
        master.supervise(world.now)
        assert len(world.forked) == forks, "started again before the delay was over"
        world.now = master.spawn_after
        master.supervise(world.now)
        assert len(world.forked) == forks + 1
    assert delays == [0.1, 0.2, 0.4, 0.8]
    assert master.stopping is None
    fail_boot(master, world)
    assert (master.stopping, master.exit_code) == ("fast", 1)


def test_after_a_boot_failure_workers_start_one_at_a_time(make_master, world):
    master = make_master(processes=3)
    master.supervise(world.now)
    assert len(world.forked) == 3
    boot(master, by_number(master)[1])
    boot(master, by_number(master)[2])
    fail_boot(master, world)  # worker 3
    world.now = master.spawn_after
    queue(master, signal.SIGTTIN)  # 4 wanted, 2 serve: still only one is started
    master.supervise(world.now)
    assert len(world.forked) == 4


# --- stuck workers: kill_unresponsive ------------------------------------------------------


def test_a_worker_silent_for_timeout_plus_graceful_timeout_is_killed_and_replaced(make_master,
                                                                                  world):
    master = make_master(processes=2, timeout=30, graceful_timeout=10, sweep=1000)
    workers = started_and_booted(master, world)
    world.now += 1.0
    master.supervise(world.now)  # heartbeat: USR2 to both
    silent_since = world.now
    for step in (1.0, 39.0):  # worker 2 answers every heartbeat, worker 1 never does
        world.now = silent_since + step
        boot(master, workers[2])
        master.supervise(world.now)
    assert world.signalled(signal.SIGKILL) == [] and len(world.forked) == 2  # 39 s: not yet
    world.now = silent_since + 40.5
    boot(master, workers[2])
    master.supervise(world.now)
    assert world.signalled(signal.SIGKILL) == [workers[1].pid]
    assert len(world.forked) == 3
    (replacement,) = [w for w in master.workers.values() if w.pid == world.forked[2]]
    assert replacement.number == 1
