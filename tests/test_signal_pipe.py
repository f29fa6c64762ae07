"""luafcgid.signals, the self-pipe of the master and of each worker, with real signals in a
process of its own (the test process keeps its handlers)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import os, select, signal, threading
    from luafcgid import signals

    read_fd, write_fd = signals.open_signal_pipe([signal.SIGUSR1, signal.SIGTERM],
                                                 ignored=[signal.SIGUSR2])
    print("empty", list(signals.read_signals(read_fd)))
    os.kill(os.getpid(), signal.SIGUSR2)  # ignored: neither queued nor the default (death)
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: its default would end the process
    print("signals", list(signals.read_signals(read_fd)))
    threading.Thread(target=signals.wake, args=(write_fd,)).start()
    print("woken", select.select([read_fd], [], [], 10)[0] == [read_fd],
          list(signals.read_signals(read_fd)))
    for _ in range(100000):  # a full pipe drops wake-ups quietly
        signals.wake(write_fd)
    print("bounded", 0 < len(signals.read_signals(read_fd, 1 << 20)) < 100000)
""")


def test_handled_signals_reach_the_pipe_ignored_ones_do_not_and_wake_reads_as_zero() -> None:
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "empty []", f"signals [{signal.SIGUSR1:d}, {signal.SIGTERM:d}]", "woken True [0]",
        "bounded True"]
    assert result.stderr == ""  # no "Exception ignored ... wakeup fd" warnings
