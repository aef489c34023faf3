"""Every case of the README's bad-input table (scripts/bad_inputs.py, run as the user runs it): exit
code 2, one error line, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_bad_input_gets_one_clear_line_and_writes_nothing():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bad_inputs.py"), "--json"], capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    assert len(rows) >= 30
    for row in rows:
        assert row["exit_code"] == 2, row
        assert row["error_lines"] == 1 and row["message"].startswith("Error: "), row
        assert not row["traceback"], row
        assert row["written"] == [], row
