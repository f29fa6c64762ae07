"""scripts/scaleout at small scale: three luafcgid instances with Redis sessions behind one
nginx upstream; one is killed with SIGKILL mid-load and nobody notices."""

from __future__ import annotations

from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import pytest

from tests import redis_server
from tests.support import NGINX

SCALEOUT = Path(__file__).resolve().parent.parent / "scripts" / "scaleout"

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def load_scaleout():
    loader = SourceFileLoader("scaleout", str(SCALEOUT))
    module = module_from_spec(spec_from_loader("scaleout", loader))
    loader.exec_module(module)
    return module


def test_killing_one_instance_mid_load_loses_no_session(tmp_path: Path) -> None:
    if not redis_server.installed():
        pytest.skip(redis_server.MISSING)
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    scaleout = load_scaleout()
    args = scaleout.parse_args(["--instances", "3", "--clients", "8", "--seconds", "4",
                                "--dir", str(tmp_path)])
    report = scaleout.run(args)
    summary = "\n".join(report.lines())

    assert report.requests > 500, summary
    assert report.lost == 0, summary
    assert report.failure_rate < 0.01, summary
    assert report.retried >= 1, summary  # the kill hit live traffic, nginx moved it
    assert report.passed, summary
    # All three answered before the kill; after it, only the two survivors did.
    assert len(report.served_before) == 3, summary
    assert min(report.served_before.values()) > 0, summary
    assert report.killed not in report.served_after, summary
    assert len(report.served_after) == 2, summary
    assert min(report.served_after.values()) > 100, summary
