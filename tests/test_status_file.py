"""The master's status file: status.py writes it and reads it back."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from luafcgid import status
from luafcgid.log import log


def test_a_written_snapshot_reads_back_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    pidfile = str(tmp_path / "luafcgid.pid")
    snapshot = {"pid": 123, "workers": [{"number": 1, "pid": 124, "state": "serving"}]}
    status.write_snapshot(pidfile, snapshot)
    assert status.read_snapshot_at(pidfile) == snapshot
    status.write_snapshot(pidfile, {**snapshot, "pid": 456})  # replaced, not appended to
    assert status.read_snapshot_at(pidfile)["pid"] == 456
    assert sorted(os.listdir(tmp_path)) == ["luafcgid.pid.status"]
    status.remove_status_file(pidfile)
    assert status.read_snapshot_at(pidfile) is None


def test_a_status_file_that_cannot_be_written_is_logged_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pidfile = str(tmp_path / "missing-directory" / "luafcgid.pid")
    log.addHandler(caplog.handler)  # the luafcgid logger does not propagate to the root
    try:
        with caplog.at_level(logging.WARNING, logger=log.name):
            status.write_snapshot(pidfile, {"pid": 1})
    finally:
        log.removeHandler(caplog.handler)
    assert f"cannot write the status file {pidfile}.status: No such file or directory" in (
        caplog.text)
    assert status.read_snapshot_at(pidfile) is None
