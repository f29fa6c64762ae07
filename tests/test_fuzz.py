"""A short run of scripts/fuzz_protocol: mutated nginx-like streams raise only ProtocolError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FUZZ = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_protocol"


def test_fuzzing_the_parser_raises_nothing_but_protocol_errors() -> None:
    result = subprocess.run([sys.executable, str(FUZZ), "--runs", "30000", "--seed", "7"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inputs: 30000 " in result.stdout
    assert "non-ProtocolError exceptions: 0" in result.stdout


def test_the_fuzzer_reports_an_exception_that_is_not_a_protocol_error(tmp_path: Path) -> None:
    # The fuzzer must notice a parser bug: break decode_pairs and run it once more.
    broken = tmp_path / "sitecustomize.py"
    broken.write_text(
        "from luafcgid import protocol\n"
        "def _decode_pairs(data): raise KeyError('planted bug')\n"
        "protocol.decode_pairs = _decode_pairs\n")
    result = subprocess.run([sys.executable, str(FUZZ), "--runs", "50"],
                            capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "non-ProtocolError exceptions: 50" in result.stdout
    assert "planted bug" in result.stderr
