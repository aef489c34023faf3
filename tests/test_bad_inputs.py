"""Every case of the README's bad-input table (scripts/bad_inputs.py): exit code 2, one error line,
no traceback, nothing written."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_every_bad_input_gets_one_clear_line_and_writes_nothing():
    from bad_inputs import run_cases

    rows = run_cases()
    assert len(rows) >= 30
    for r in rows:
        assert r["exit_code"] == 2, r
        assert r["error_lines"] == 1 and r["message"].startswith("Error: "), r
        assert not r["traceback"], r
        assert r["written"] == [], r
