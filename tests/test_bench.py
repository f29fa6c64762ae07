"""Smoke test of scripts/bench: a quick run against luafcgid measures requests, no errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import NGINX

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def test_quick_hello_run_on_luafcgid_reports_requests_and_no_errors(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--duration", "1", "--servers", "luafcgid",
         "--cases", "hello", "--connections", "32", "--json", str(report)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

    rows = json.loads(report.read_text())["results"]
    assert [(row["case"], row["server"]) for row in rows] == [
        ("hello c32 keep", "luafcgid"), ("hello c32 close", "luafcgid")]
    for row in rows:
        assert row["req_per_s"] > 0, row
        assert row["errors"] == 0, row
        assert row["rss_mib"] > 0, row
        assert row["cpu_us_per_req"] > 0, row
        assert len(row["rounds"]) == 1, row
    assert "hello c32 keep" in result.stdout   # the table


def test_bench_memory_loads_the_states_it_reports() -> None:
    script = BENCH.parent / "bench_memory"
    result = subprocess.run([sys.executable, str(script), "--scripts", "12"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    rss = {label: float(value) for label, value in
           re.findall(r"^worker, (1 state|12 states)\D+([\d.]+)", result.stdout, re.M)}
    # twelve states take more memory than one: the requests really loaded them
    assert rss["12 states"] > rss["1 state"] > 0, result.stdout
