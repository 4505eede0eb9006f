"""README.md: the two set-up commands, and tables that match the registries."""

from __future__ import annotations

import re
from pathlib import Path

from edgevlm.docs_tables import README, render

ROOT = Path(__file__).resolve().parents[1]


def test_generated_tables_are_in_sync():
    text = README.read_text()
    assert render(text) == text, "README.md tables are stale: run `python -m edgevlm.docs_tables`"
    assert "`mobilevlm-v2-7b`" in text


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
